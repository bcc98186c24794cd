"""Preference data (`format: preference`): records of a `prompt`, a `chosen` and a `rejected` answer -> token ids
(without a prompt column: the beginning chosen and rejected share, as in TRL).

A record's parts are strings, or lists of chat turns (role/content) rendered with the chat template as SFT data is
(a string answer to a chat prompt is one assistant turn; with `data.chat_template` set, string records are rendered
as a user turn and an assistant turn). Tokenised as TRL's DPOTrainer does, so that the two libraries train on the
same ids: prompt alone, prompt + chosen and prompt + rejected are tokenised whole (plain strings with the tokenizer's
special tokens and an end-of-sequence token appended to each answer that lacks it; chat renderings without), and the
answer starts where the prompt's ids and the whole's part. Each sequence is cut to max_length from the end (keep the
start); a pair with no answer token left is dropped.

An example holds the chosen sequence as `input_ids` / `attention_mask` / `labels` (-100 on the prompt) and the
rejected one as `rejected_input_ids` / `rejected_labels`; `batching.Collator` lays a batch of B pairs out as 2B rows,
the B chosen sequences first (`pair_rows`), so that one forward scores both answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from datasets import Dataset

from deltatune.data.chat import has_targets, render, resolve_template
from deltatune.data.config import DataConfig
from deltatune.data.conversations import DEFAULT_COLUMNS, ROLES, Message, Reader, RecordError, missing, no_value
from deltatune.data.load import Table
from deltatune.data.truncation import FULL_LENGTH
from deltatune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PARTS = ("prompt", "chosen", "rejected")
REJECTED = ("rejected_input_ids", "rejected_labels")


@dataclass(frozen=True)
class Pair:
    """One record: the prompt and both answers, as strings (plain text) or as chat turns."""

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class PairReader:
    """Reads preference records with the configured column names (`data.columns`) and role mapping."""

    columns: dict[str, str]
    turns: Reader  # reads a list of turns (its `messages` column is set per part)

    @classmethod
    def of(cls, cfg: DataConfig) -> PairReader:
        names = {part: getattr(cfg.columns, part) or part for part in PARTS}
        given = cfg.columns.model_dump(exclude_none=True, include={"role", "content"})
        turns = DEFAULT_COLUMNS["messages"].model_copy(update={**given, "system": None})
        return cls(names, Reader("messages", turns, {**ROLES, **cfg.roles}))

    def __call__(self, record: dict[str, Any]) -> Pair:
        """The record's pair; RecordError says what is wrong with it. Without a prompt column, the prompt is what
        chosen and rejected begin with (TRL's extract_prompt: shared turns, or the shared text up to the space
        before the first difference)."""
        chosen, rejected = (self._part(record, part) for part in ("chosen", "rejected"))
        if self.columns["prompt"] in record:
            prompt = self._part(record, "prompt")
        else:
            prompt, chosen, rejected = self._implicit_prompt(chosen, rejected)
        chat = isinstance(prompt, list)
        chosen, rejected = (self._answer(answer, part, chat) for answer, part in ((chosen, "chosen"),
                                                                                  (rejected, "rejected")))
        if chosen == rejected:
            raise RecordError(f"{self.columns['chosen']!r} and {self.columns['rejected']!r} are the same answer: "
                              "a pair teaches a preference only if they differ")
        return Pair(prompt, chosen, rejected)

    def _part(self, record: dict[str, Any], part: str) -> str | list[Message]:
        column = self.columns[part]
        value = record.get(column)
        if missing(value):
            raise RecordError(no_value(record, column))
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            reader = Reader("messages", self.turns.columns.model_copy(update={"messages": column}), self.turns.roles)
            return reader.conversation(record)
        raise RecordError(f"{column!r} must be a string or a list of chat turns, got {type(value).__name__} "
                          f"{value!r:.60}")

    def _implicit_prompt(self, chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
        names = f"{self.columns['chosen']!r} and {self.columns['rejected']!r}"
        cut = _common_prefix(chosen, rejected) if type(chosen) is type(rejected) else 0
        if isinstance(chosen, str) and cut and chosen[cut - 1] == " ":
            cut -= 1
        if cut == 0:
            raise RecordError(f"no {self.columns['prompt']!r} column, and {names} do not begin with a shared prompt; "
                              "add the prompt column (or map it with data.columns.prompt)")
        return chosen[:cut], chosen[cut:], rejected[cut:]

    def _answer(self, answer: str | list[Message], part: str, chat: bool) -> str | list[Message]:
        if not answer:
            raise RecordError(f"{self.columns[part]!r} has no answer after the prompt")
        if isinstance(answer, list):
            if not chat:
                raise RecordError(f"{self.columns[part]!r} is a list of chat turns but {self.columns['prompt']!r} is "
                                  "a string: give the prompt as chat turns too (e.g. [{role: user, content: ...}])")
            if answer[-1]["role"] != "assistant":
                raise RecordError(f"{self.columns[part]!r} must end with an assistant turn, not {answer[-1]['role']!r}")
            return answer
        return [{"role": "assistant", "content": answer}] if chat else answer


def is_chat(table: Table, cfg: DataConfig) -> bool:
    """Whether the file's pairs are rendered with a chat template (chat-turn prompts, or data.chat_template set)."""
    return cfg.chat_template is not None or (len(table.data) > 0 and PairReader.of(cfg)(table.data[0]).chat)


def encode_preference(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                      names: list[str] | None = None) -> Dataset:
    """Token ids of every pair (see the module docstring); a record the template cannot render is a DataError at
    its file:line."""
    read = PairReader.of(cfg)
    template = resolve_template(tokenizer, cfg.chat_template) if is_chat(table, cfg) else None
    rows: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", *REJECTED, FULL_LENGTH)}
    for i, record in enumerate(table.data):
        try:
            prompt, chosen, rejected = _token_ids(read(record), tokenizer, template)
        except RecordError as e:
            raise DataError(f"{table.where(i)}: {e}") from None
        (ids, labels), (rejected_ids, rejected_labels) = (_sequence(prompt, answer, cfg.max_length)
                                                          for answer in (chosen, rejected))
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(labels)
        rows["rejected_input_ids"].append(rejected_ids)
        rows["rejected_labels"].append(rejected_labels)
        rows[FULL_LENGTH].append(len(prompt) + max(len(chosen), len(rejected)))
    return Dataset.from_dict(rows)


def _token_ids(pair: Pair, tokenizer: PreTrainedTokenizerBase,
               template: str | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen answer, rejected answer) ids, split where the prompt's ids and the whole sequence's part."""
    if template is None and not pair.chat:
        eos = tokenizer.eos_token or ""
        answers = (a if a.endswith(eos) else a + eos for a in (pair.chosen, pair.rejected))
        texts = [pair.prompt, *(pair.prompt + a for a in answers)]
        prompt, *wholes = tokenizer(texts, verbose=False)["input_ids"]
    else:
        as_turns = [pair.prompt if pair.chat else [{"role": "user", "content": pair.prompt}],
                    *([{"role": "assistant", "content": a}] if isinstance(a, str) else a
                      for a in (pair.chosen, pair.rejected))]
        texts = [render(as_turns[0], template, tokenizer, add_generation_prompt=True),
                 *(render(as_turns[0] + answer, template, tokenizer) for answer in as_turns[1:])]
        prompt, *wholes = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    cut = min(_common_prefix(prompt, whole) for whole in wholes)
    return prompt[:cut], wholes[0][cut:], wholes[1][cut:]


def _sequence(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt + answer cut to max_length, and its labels (-100 on the prompt)."""
    ids = (prompt + answer)[:max_length]
    return ids, ([-100] * len(prompt) + answer)[:max_length]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def keep_pairs_with_targets(dataset: Dataset) -> Dataset:
    """The pairs whose chosen and rejected sequences both keep an answer token after truncation."""
    keep = [i for i, (chosen, rejected) in enumerate(zip(dataset["labels"], dataset["rejected_labels"]))
            if has_targets(chosen) and has_targets(rejected)]
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def pair_rows(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """B pairs as 2B sequences for one forward: the chosen ones, then the rejected ones in the same order."""
    rejected = [{"input_ids": ex["rejected_input_ids"], "attention_mask": [1] * len(ex["rejected_input_ids"]),
                 "labels": ex["rejected_labels"]} for ex in examples]
    return [{k: ex[k] for k in ("input_ids", "attention_mask", "labels")} for ex in examples] + rejected
