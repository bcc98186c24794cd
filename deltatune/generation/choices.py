"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores its `multiple_choice` tasks.

Each record of a multiple-choice file (.jsonl/.json/.csv/.parquet) holds a `question` (the context, written
as the model should read it, e.g. "Question: ...\\nAnswer:"), its `choices` (two or more strings) and the
`answer` (the right choice's index, or its text). Each choice is scored as the summed log-probability of its
tokens after the context (`delimiter` + choice, as lm-eval's `target_delimiter`; with a chat template the
question is the user's turn and the choice the assistant's reply, with no delimiter). Metrics:
`acc` (the most likely choice is the answer) and `acc_norm` (the same after dividing each log-likelihood by
the choice's length in characters, as lm-eval does).

Tokenisation follows lm-eval's rule for causal LMs, so the numbers are lm-eval's: whitespace at the end of the
context moves to the start of the continuation, context + continuation are encoded together and split after
as many tokens as the context alone encodes to; an empty context is the tokenizer's BOS (else EOS) token.
Pairs that exceed the model's context lose tokens on the left. Every (context, choice) pair is one row of a
batched forward pass (rows sorted by length, right-padded), with whatever delta is attached to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError, DataError

DELIMITER = " "  # between context and choice, lm-eval's default target_delimiter


@dataclass(frozen=True)
class ChoiceRecord:
    """One multiple-choice question; `answer` is the index of the right choice."""

    where: str  # file:line, for error messages and per-example output
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class ChoiceScores:
    """Accuracies over the records and, per record, each choice's log-likelihood."""

    metrics: dict[str, float]
    loglikelihoods: list[list[float]]

    def rows(self, records: Sequence[ChoiceRecord]) -> list[dict[str, Any]]:
        """One JSON-ready row per record: where it is, the answer, the predictions and the log-likelihoods."""
        return [{"where": r.where, "answer": r.answer, "predicted": _argmax(lls),
                 "predicted_norm": _argmax(_normalised(lls, r.choices)), "loglikelihoods": lls}
                for r, lls in zip(records, self.loglikelihoods)]


def read_choices(path: str | Path, limit: int | None = None, skip: int = 0) -> list[ChoiceRecord]:
    """The records of a multiple-choice file (or packaged alias) after the first `skip`, `limit` at most; a bad
    record is one DataError naming file and line."""
    from deltatune.models.assets import resolve_data_path
    from deltatune.data.load import read_table

    if skip < 0 or (limit is not None and limit < 1):
        raise ConfigError(f"skip must be 0 or more and limit 1 or more (got skip={skip}, limit={limit})")
    table = read_table(resolve_data_path(str(path)))
    for column in ("question", "choices", "answer"):
        table.column(column)  # a missing column: one error listing the file's columns
    rows = range(skip, len(table.data) if limit is None else min(len(table.data), skip + limit))
    records = [_record(table.data[i], table.where(i)) for i in rows]
    if not records:
        raise DataError(f"{path}: no records left after skipping {skip}")
    return records


def _record(row: dict[str, Any], where: str) -> ChoiceRecord:
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string (the context the choices follow), got {question!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of two or more non-empty strings, got {choices!r:.200}")
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{where}: answer {answer!r} is none of the choices; give the right choice's text "
                            f"exactly, or its index 0..{len(choices) - 1}")
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer!r} is not a choice index 0..{len(choices) - 1} (or a choice's "
                        "text)")
    return ChoiceRecord(where, question, tuple(choices), answer)


def contexts(records: Sequence[ChoiceRecord], tokenizer: Any = None, template: str | None = None) -> list[str]:
    """The text each record's choices continue: the question, or (with a chat `template`) the question as the
    user's turn rendered up to where the assistant's reply starts."""
    if template is None:
        return [r.question for r in records]
    from deltatune.generation.prompts import render_chat

    return [render_chat(tokenizer, [{"role": "user", "content": r.question}], template) for r in records]


def score_choices(model: nn.Module, tokenizer: Any, records: Sequence[ChoiceRecord], *,
                  template: str | None = None, delimiter: str | None = None, batch_size: int = 8,
                  on_batch: Callable[[int, int], None] | None = None) -> ChoiceScores:
    """acc / acc_norm of the model (with whatever delta is attached) on `records`; with a chat `template` the
    question is rendered as the user's turn. Choices follow the context after `delimiter`: by default " ", and
    nothing after a chat template (as lm-eval does)."""
    if delimiter is None:
        delimiter = DELIMITER if template is None else ""
    pairs = [(ctx, delimiter + choice) for ctx, r in zip(contexts(records, tokenizer, template), records)
             for choice in r.choices]
    flat = [ll for ll, _ in loglikelihoods(model, tokenizer, pairs, batch_size, on_batch)]
    per_record, start = [], 0
    for r in records:
        per_record.append(flat[start:start + len(r.choices)])
        start += len(r.choices)
    n = len(records)
    acc = sum(_argmax(lls) == r.answer for r, lls in zip(records, per_record)) / n
    acc_norm = sum(_argmax(_normalised(lls, r.choices)) == r.answer for r, lls in zip(records, per_record)) / n
    return ChoiceScores({"acc": acc, "acc_norm": acc_norm}, per_record)


def _normalised(lls: Sequence[float], choices: Sequence[str]) -> list[float]:
    return [ll / len(c) for ll, c in zip(lls, choices)]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by lm-eval's rule for causal LMs (see the module docstring)."""
    if not context:
        tokens = _encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_id(tokenizer)
        if prefix is None:
            raise ConfigError("an empty context needs the tokenizer's BOS or EOS token to stand for it; the "
                              "tokenizer has neither")
        return ([prefix], tokens) if not tokens or tokens[0] != prefix else (tokens[:1], tokens[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, start = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return start, whole[len(start):]


def prefix_id(tokenizer: Any) -> int | None:
    """The token that stands for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids with the tokenizer's own special-token default, except that a text that already starts with the
    BOS (else EOS) token gets no second one (as lm-eval's HFLM encodes)."""
    if add_special_tokens is None:
        prefix = prefix_id(tokenizer)
        add_special_tokens = prefix is None or not text.startswith(tokenizer.decode([prefix]))
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def loglikelihoods(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   on_batch: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) for each pair."""
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]
    for (ctx, cont), (_, tokens) in zip(pairs, encoded):
        if not tokens:
            raise DataError(f"the continuation {cont!r} after {ctx[-60:]!r} encodes to no tokens: a choice must "
                            "be non-empty text")
    return token_loglikelihoods(model, encoded, batch_size, on_batch)


def token_loglikelihoods(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                         on_batch: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation ids, greedy?) for (context ids, continuation ids) pairs,
    computed in batches of `batch_size` rows, longest first."""
    from deltatune.generation.sampling import context_length

    if batch_size < 1:
        raise ConfigError(f"batch size must be 1 or more, got {batch_size}")
    limit = context_length(model)
    rows = [_model_row(ctx, cont, limit) for ctx, cont in encoded]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, result in zip(batch, _score_batch(model, [rows[i] for i in batch])):
                results[i] = result
            if on_batch is not None:
                on_batch(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return results


def _model_row(context: list[int], continuation: list[int], limit: int | None) -> tuple[list[int], list[int]]:
    """(the model's input ids, the continuation ids they predict at their last positions): all tokens but the
    last, cut on the left to the model's context."""
    if limit is not None and len(continuation) > limit:
        raise DataError(f"a continuation of {len(continuation)} tokens does not fit the model's context of {limit} "
                        "tokens; shorten the choices")
    whole = context + continuation
    return whole[:-1][-limit:] if limit is not None else whole[:-1], continuation


@torch.no_grad()
def _score_batch(model: nn.Module, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    width = max(len(ids) for ids, _ in rows)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, (row, _) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits
    results = []
    for i, (row, continuation) in enumerate(rows):
        end = len(row)
        logprobs = torch.log_softmax(logits[i, end - len(continuation):end].float(), dim=-1)
        target = torch.tensor(continuation, device=device)
        results.append((logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())))
    return results
