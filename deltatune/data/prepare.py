"""prepare_data: read the configured files, split them, and encode every split with the configured format."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from datasets import Dataset

from deltatune.data.batching import epoch_batches
from deltatune.data.chat import assistant_spans, has_targets, resolve_template
from deltatune.data.config import CHAT_FORMATS, DataConfig
from deltatune.data.conversations import RecordError, detect_format
from deltatune.data.formats import FORMATS
from deltatune.data.load import Table, read_table
from deltatune.data.truncation import check_truncation, effective_max_length
from deltatune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    """Tokenized splits (columns input_ids, attention_mask, labels; packed rows: input_ids, labels, position_ids)
    and what the model head needs to know."""

    train: Dataset
    validation: Dataset
    test: Dataset
    task: str
    label_names: list[str] | None
    num_labels: int | None
    # split -> file, records, examples, split_from_train; with skip_bad_records "skipped" (bad records of the split's
    # own file, else 0: a split cut from the training file is counted there) and "first_skipped" (file:line: why)
    source: dict[str, dict[str, Any]]
    format: str = ""  # the format used (the detected one for `format: auto`)
    chat_template: str | None = None  # the jinja chat template the examples were rendered with (chat formats)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int,
                      lengths: Sequence[int] | None = None) -> list[list[int]]:
        """The training batches of `epoch` (see batching.epoch_batches; MultiTaskData has the same method)."""
        return epoch_batches(len(self.train), batch_size, seed, epoch, lengths)


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                 model_max_length: int | None = None) -> TaskData:
    """Read, validate, split (seeded, by record) and tokenize the data described by `cfg`; sequences are cut to
    `cfg.max_length` or the model's maximum, whichever is smaller (see truncation.py)."""
    limit, origin = effective_max_length(cfg, model_max_length)
    cfg = cfg.model_copy(update={"max_length": limit})
    files = {s: _read(name, cfg.limit) for s in SPLITS if (name := getattr(cfg, s))}
    if cfg.format == "auto":
        cfg = cfg.model_copy(update={"format": detect_format(files["train"], cfg)})
    fmt = FORMATS[cfg.format]
    skipped = {s: [] for s in SPLITS}
    if fmt.reader:
        read = _rendered(fmt.reader(cfg), cfg, tokenizer) if cfg.format in CHAT_FORMATS else fmt.reader(cfg)
        for s, table in files.items():
            files[s], skipped[s] = _drop_bad_records(table, read, cfg.skip_bad_records)
    fractions = {s: f for s, f in zip(SPLITS, cfg.split) if s == "train" or s not in files}
    tables = {**files, **split_table(files["train"], fractions, seed if cfg.split_seed is None else cfg.split_seed)}
    names = fmt.label_names(files["train"], cfg) if fmt.label_names else None
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})  # a split of fraction 0
    data = {s: check_truncation(fmt.encode(tables[s], cfg, tokenizer, names), tables[s], cfg, origin)
            if len(tables[s].data) else empty for s in SPLITS}
    if cfg.format in CHAT_FORMATS:
        data = {s: _drop_without_targets(data[s]) for s in SPLITS}
    if len(data["train"]) == 0:
        raise DataError(f"{tables['train'].path}: no training example has a target token within the first "
                        f"max_length={cfg.max_length} tokens; raise data.max_length")
    if fmt.task == "classification":
        check_classes(data["train"]["labels"], names, tables["train"])
    source = {s: {"file": str(tables[s].path), "records": len(tables[s].data), "examples": len(data[s]),
                  "split_from_train": s not in files} for s in SPLITS}
    if cfg.skip_bad_records:
        for s in SPLITS:
            source[s] |= {"skipped": len(skipped[s]), "first_skipped": skipped[s][0] if skipped[s] else None}
    template = resolve_template(tokenizer, cfg.chat_template) if cfg.format in CHAT_FORMATS else None
    return TaskData(**data, task=fmt.task, label_names=names, num_labels=len(names) if names else fmt.num_labels,
                    source=source, format=cfg.format, chat_template=template)


def check_classes(labels: list[int], names: list[str], table: Table) -> None:
    """DataError if the training split holds a single class: the classifier would learn to always answer it (and
    score perfectly on data of that class), which is never what a classification run is for. A warning when most
    classes have a single example (e.g. data.label_column names a text column)."""
    if len(classes := set(labels)) < 2:
        only = names[next(iter(classes))] if classes else "none"
        raise DataError(f"{table.path}: every training example has the same label ({only!r}, {len(labels)} "
                        "examples): a classifier needs at least two classes to learn anything; add examples of the "
                        "other classes (or check data.label_column)")
    if len(classes) > max(20, len(labels) / 2):
        warnings.warn(f"{table.path}: {len(classes)} classes for {len(labels)} training examples (most classes have "
                      "one example): is data.label_column the label and not free text?", stacklevel=3)


def _rendered(read: Callable[[dict[str, Any]], Any], cfg: DataConfig,
              tokenizer: PreTrainedTokenizerBase) -> Callable[[dict[str, Any]], Any]:
    """With skip_bad_records, a chat reader that also renders the conversation, so that conversations the template
    rejects (e.g. roles that do not alternate) are skipped too; else `read` (encoding then stops at the first)."""
    if not cfg.skip_bad_records:
        return read
    template = resolve_template(tokenizer, cfg.chat_template)
    return lambda record: assistant_spans(read(record), template, tokenizer)


def _drop_without_targets(dataset: Dataset) -> Dataset:
    """The conversations that still have an assistant token after truncation (see truncation.py)."""
    keep = [i for i, labels in enumerate(dataset["labels"]) if has_targets(labels)]
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def _drop_bad_records(table: Table, read: Callable[[dict[str, Any]], Any], skip: bool) -> tuple[Table, list[str]]:
    """The table without its malformed records, and `file:line: problem` for each of them.

    DataError at the first malformed record unless `skip`, and when every record is malformed."""
    good, bad = [], []
    for i, record in enumerate(table.data):
        try:
            read(record)
            good.append(i)
        except RecordError as e:
            if not skip:
                raise DataError(f"{table.where(i)}: {e}") from None
            bad.append(f"{table.where(i)}: {e}")
    if not good:
        raise DataError(f"{table.path}: all {len(bad)} records are malformed, e.g. {bad[0]}")
    return (table.select(good) if bad else table), bad


def split_table(table: Table, fractions: dict[str, float], seed: int) -> dict[str, Table]:
    """Split records by a seeded permutation into parts sized by the (renormalised) fractions, keeping file order.

    Every part with a fraction > 0 gets at least one record; the "train" part gets the rest.
    """
    n = len(table.data)
    total = sum(fractions.values())
    order = np.random.default_rng(seed).permutation(n)
    sizes = {s: max(1, round(n * f / total)) if f > 0 else 0 for s, f in fractions.items() if s != "train"}
    if sum(sizes.values()) >= n:
        raise DataError(f"{table.path}: {n} records are too few to split into {', '.join(fractions)} "
                        f"by {list(fractions.values())}")
    bounds = np.cumsum([0, *sizes.values()])
    parts = {s: order[a:b] for s, a, b in zip(sizes, bounds, bounds[1:])}
    parts["train"] = order[bounds[-1]:]
    return {s: table.select(sorted(int(i) for i in rows)) for s, rows in parts.items()}


def _read(name: str, limit: int | None) -> Table:
    """Read a file, or a packaged dataset alias when no such file exists; keep the first `limit` records."""
    if not Path(name).exists():
        from deltatune.models.assets import resolve_data_path

        name = str(resolve_data_path(name))
    table = read_table(name)
    return table.select(list(range(min(limit, len(table.data))))) if limit else table
