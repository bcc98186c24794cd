"""Formats: how the records of one task become tokenized examples. A format is picked by name from FORMATS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from datasets import Dataset

from deltatune.data.chat import encode_conversations, resolve_template
from deltatune.data.config import CHAT_FORMATS, DataConfig
from deltatune.data.conversations import Reader, RecordError, missing, no_value
from deltatune.data.load import Table
from deltatune.data.preference import PairReader, encode_preference
from deltatune.data.truncation import FULL_LENGTH
from deltatune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Encode = Callable[[Table, DataConfig, "PreTrainedTokenizerBase", "list[str] | None"], Dataset]


@dataclass(frozen=True)
class Format:
    """`encode(table, cfg, tokenizer, label_names)` -> Dataset with input_ids, attention_mask, labels.

    `label_names(train_table, cfg)` gives the class names (from the training file), if the task has classes;
    `num_labels` is the model's output size when there are no class names. `task` is the training loop's task.
    `reader(cfg)`, if given, returns a function that checks one record (raising RecordError with what is wrong),
    so that bad records can be reported with their line, or skipped, before encoding.
    """

    encode: Encode
    label_names: Callable[[Table, DataConfig], list[str]] | None = None
    num_labels: int | None = None
    task: str = "text"
    reader: Callable[[DataConfig], Callable[[dict[str, Any]], Any]] | None = None


def values(table: Table, column: str) -> list[Any]:
    """A column's values; DataError at the first record without one (absent, null, NaN or empty)."""
    result = table.column(column)
    for i, v in enumerate(result):
        if missing(v):
            raise DataError(f"{table.where(i)}: {no_value(table.data[i], column)}")
    return result


def texts(table: Table, column: str) -> list[str]:
    """A text column's values as strings (numbers are written out); DataError at the first list or object."""
    return [v if isinstance(v, str) else str(_scalar(table, i, column, v, "text"))
            for i, v in enumerate(values(table, column))]


def class_labels(table: Table, column: str) -> list[str]:
    """A classification label column as class names; DataError at the first list or object (one label per record)."""
    return [str(_scalar(table, i, column, v, "label")) for i, v in enumerate(values(table, column))]


def _scalar(table: Table, i: int, column: str, value: Any, what: str) -> Any:
    if isinstance(value, (list, dict)):
        raise DataError(f"{table.where(i)}: {what} in column {column!r} is a {type(value).__name__} ({value!r:.60}); "
                        f"each record needs one {what}: a string{' or number' if what == 'label' else ''}")
    return value


def _tokenize(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, labels: list[Any]) -> Dataset:
    """Tokenize the text (and pair) column, truncated to max_length, next to the given labels."""
    columns = {"labels": labels, "text": texts(table, cfg.text_column)}
    if cfg.text_pair_column:
        columns["pair"] = texts(table, cfg.text_pair_column)

    # segment ids tell BERT-style models which tokens belong to the second text of a pair
    segments = bool(cfg.text_pair_column) and "token_type_ids" in tokenizer.model_input_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        full = tokenizer(batch["text"], batch.get("pair"), return_attention_mask=False, return_token_type_ids=False,
                         verbose=False)["input_ids"]  # lengths before truncation, for data.truncation
        return {**tokenizer(batch["text"], batch.get("pair"), truncation=True, max_length=cfg.max_length,
                            return_token_type_ids=segments), FULL_LENGTH: [len(ids) for ids in full]}

    inputs = [c for c in columns if c != "labels"]
    return Dataset.from_dict(columns).map(tokenize, batched=True, remove_columns=inputs,
                                          desc=f"Tokenizing {table.path.name}")


def _class_names(table: Table, cfg: DataConfig) -> list[str]:
    """The configured labels, else the sorted unique labels of the training file."""
    if cfg.labels:
        return list(cfg.labels)
    class_labels(table, cfg.label_column)  # one scalar per record, so the values sort
    return [str(v) for v in sorted(set(values(table, cfg.label_column)))]


def _encode_classification(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                           names: list[str] | None) -> Dataset:
    ids = {name: i for i, name in enumerate(names or [])}
    labels = class_labels(table, cfg.label_column)
    for i, label in enumerate(labels):
        if label not in ids:
            origin = "the configured `labels`" if cfg.labels else "the training data"
            raise DataError(f"{table.where(i)}: label {label!r} is not in {origin} (known labels: {', '.join(ids)}); "
                            "add it to `labels` or fix the record")
    return _tokenize(table, cfg, tokenizer, [ids[label] for label in labels])


def _encode_regression(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                       names: list[str] | None) -> Dataset:
    labels = values(table, cfg.label_column)
    for i, v in enumerate(labels):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{table.where(i)}: regression label {v!r} in column {cfg.label_column!r} is not a number")
        if not math.isfinite(v):
            raise DataError(f"{table.where(i)}: regression label {v!r} in column {cfg.label_column!r} is not a finite "
                            "number; fix or remove the record")
    return _tokenize(table, cfg, tokenizer, [float(v) for v in labels])


def _encode_text(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                 names: list[str] | None) -> Dataset:
    """Causal LM: each text becomes consecutive blocks of at most max_length tokens; labels = input_ids."""
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        blocks = [seq[i:i + cfg.max_length] for seq in ids for i in range(0, len(seq), cfg.max_length)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}

    return Dataset.from_dict({"text": texts(table, cfg.text_column)}).map(
        tokenize, batched=True, remove_columns=["text"], desc=f"Tokenizing {table.path.name}")


def _text_reader(cfg: DataConfig) -> Callable[[dict[str, Any]], str]:
    def read(record: dict[str, Any]) -> Any:
        if missing(value := record.get(cfg.text_column)):
            raise RecordError(no_value(record, cfg.text_column))
        return value

    return read


def _chat_reader(cfg: DataConfig) -> Reader:
    return Reader.of(cfg.format, cfg)


def _encode_chat(table: Table, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, names: list[str] | None) -> Dataset:
    """Conversations rendered with the chat template; labels only on assistant turns unless train_on_prompt."""
    read = _chat_reader(cfg)
    return encode_conversations([read(record) for record in table.data], tokenizer,
                                resolve_template(tokenizer, cfg.chat_template), cfg.max_length, cfg.train_on_prompt,
                                where=table.where)


FORMATS: dict[str, Format] = {
    "classification": Format(_encode_classification, label_names=_class_names, task="classification"),
    "regression": Format(_encode_regression, num_labels=1, task="regression"),
    "text": Format(_encode_text, reader=_text_reader),
    **{name: Format(_encode_chat, reader=_chat_reader) for name in CHAT_FORMATS},
    "preference": Format(encode_preference, task="preference", reader=PairReader.of),
}
