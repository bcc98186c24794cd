"""The bad-input catalogue: each mistake a user can make is one deltatune error (type and message asserted) that
says what is wrong, where (file:line, key path), and how to fix it; nothing is left half-written."""

from __future__ import annotations

import errno
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from launch import review_rows, write_jsonl
from tiny import AllParams, TrainAll, save_tiny_model_dir, tiny_model
from torch import nn

import deltatune
from deltatune import storage
from deltatune.config import load_config, validate_config
from deltatune.data import Collator, DataConfig, TaskData, prepare_data, read_table
from deltatune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeltaTuneError,
    TargetError,
)
from deltatune.models.load import load_model, load_tokenizer
from deltatune.registry import get_method
from deltatune.train import TrainConfig, train
from deltatune.train.checkpoint import checkpoint_dirs, load_latest, save_checkpoint
from deltatune.train.distributed import _check_fsdp


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


# ---- data files: file:line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "ok", "label": "a"}\n{"text": "broken", \n', r"a.jsonl:2: invalid JSON \(Expecting property"),
    ("a.jsonl", '{"text": "ok"}\n\n["a list"]\n', r"a.jsonl:3: expected a JSON object, got list"),
    ("a.json", '[{"text": "ok"},\n {"text": }]', r"a.json:2: invalid JSON \(Expecting value, column 11\)"),
    ("a.csv", 'text,label\nfine,a\n"a,b",c,d\n', r"a.csv:3: malformed CSV \(Expected 2 fields in line 3, saw 3\)"),
    ("a.jsonl", "", r"a.jsonl: no records"),
    ("a.csv", "", r"a.csv: no records"),
    ("a.txt", "text\n", r"a.txt: unsupported file type; supported: .jsonl, .json, .csv, .parquet"),
    ("a.jsonl", b'{"text": "caf\xe9"}\n', r"a.jsonl: not UTF-8 text \(invalid continuation byte at byte 13\)"),
    ("a.json", '{"text": ["x", "y"], "label": ["a", "b"]}', r"a.json: one JSON object of columns \('text', 'label'\), "
                                                            r"not a list of records; write one record per line"),
    ("a.jsonl", '{"text": "x", "label": NaN}\n', r"a.jsonl:1: NaN is not a JSON value \(JSON has no NaN or infinity"),
    ("a.jsonl", '{"label": 1}\n{"label": "two"}\n',
     r"a.jsonl:2: column 'label' holds 'two' but earlier records hold number values; use one type per column"),
])
def test_malformed_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        read_table(path)


# ---- data records -> examples --------------------------------------------------------------------------------------
def prepare(tmp_path, tokenizer, train, validation=None, model_max=None, **cfg):
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", train))}
    if validation is not None:
        files["validation"] = str(write_jsonl(tmp_path / "validation.jsonl", validation))
    return prepare_data(DataConfig(**files, split=(1.0, 0.0, 0.0), **cfg), tokenizer, model_max_length=model_max)


@pytest.mark.parametrize("train, validation, cfg, message", [
    ([{"review": "good", "label": "a"}], None, {},
     r"train.jsonl: no column 'text' \(columns: review, label\)"),
    ([{"text": "good", "label": "a"}, {"text": "bad"}], None, {},
     r"train.jsonl:2: record has no 'label' \(columns: text\)"),
    (review_rows(4), [{"text": "meh", "label": "neutral"}], {},
     r"validation.jsonl:1: label 'neutral' is not in the training data \(known labels: negative, positive\)"),
    ([{"text": "x", "label": "high"}], None, {"format": "regression"},
     r"train.jsonl:1: regression label 'high' in column 'label' is not a number"),
    ([{"text": "x", "label": "a"}], None, {"labels": ["b"]},
     r"train.jsonl:1: label 'a' is not in the configured `labels` \(known labels: b\)"),
])
def test_records_that_do_not_fit_the_task(tmp_path, tokenizer, train, validation, cfg, message):
    with pytest.raises(DataError, match=message):
        prepare(tmp_path, tokenizer, train, validation, **cfg)


def test_too_few_records_to_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "two.jsonl", review_rows(2))
    with pytest.raises(DataError, match=r"two.jsonl: 2 records are too few to split into train, validation, test"):
        prepare_data(DataConfig(train=str(path)), tokenizer)


def test_empty_training_split(tmp_path):
    empty = TaskData(*[[]] * 3, task="classification", label_names=["a", "b"], num_labels=2, source={})
    with pytest.raises(DataError, match="the training split is empty: nothing to train on"):
        train(nn.Linear(1, 2), None, empty, TrainConfig(), tmp_path, collate=Collator(0))


# ---- sequences longer than the model takes: data.truncation ---------------------------------------------------------
LONG = [{"text": "short", "label": "a"}, {"text": "a rather long review " * 10, "label": "b"}]


def test_long_records_are_truncated_with_a_warning_by_default(tmp_path, tokenizer):
    with pytest.warns(UserWarning, match=r"1 of 2 records in .*train.jsonl are longer than 16 tokens \(the model's "
                                         r"maximum; data.max_length is 256; the first is .*train.jsonl:2 with 42 "
                                         r"tokens\); they were truncated \(data.truncation: error stops instead"):
        data = prepare(tmp_path, tokenizer, LONG, model_max=16)
    assert [len(ex["input_ids"]) for ex in data.train] == [3, 16] and "full_length" not in data.train.column_names


def test_long_records_are_an_error_or_silent_by_config(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"1 of 2 records .* longer than 8 tokens \(data.max_length; the first is "
                                        r".*train.jsonl:2 with 42 tokens\); shorten them, raise data.max_length"):
        prepare(tmp_path, tokenizer, LONG, max_length=8, truncation="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(prepare(tmp_path, tokenizer, LONG, max_length=8, truncation="silent").train[1]["input_ids"]) == 8


def test_long_conversations_name_their_line(tmp_path):
    """Chat formats cut conversations too; one cut before its answer counts (it is then dropped, not kept)."""
    from tiny import tiny_chat_tokenizer

    from deltatune.data.chat import TEMPLATES

    def chat(question: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    rows = [chat("hi", "ok"), chat("x" * 60, "ok"), chat("hi", "y" * 60)]  # the second has no target left
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(train=str(path), format="messages", max_length=40, truncation="error", split=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"2 of 3 records in .*chat.jsonl are longer than 40 tokens \(data.max_length;"
                                        r" the first is .*chat.jsonl:2 with 83 tokens\)"):
        prepare_data(cfg, tiny_chat_tokenizer(TEMPLATES["chatml"]))
    with pytest.warns(UserWarning, match=r"2 of 3 records .* the first is .*chat.jsonl:2 .* they were truncated"):
        data = prepare_data(cfg.model_copy(update={"truncation": "warn"}), tiny_chat_tokenizer(TEMPLATES["chatml"]))
    assert [len(ex["input_ids"]) for ex in data.train] == [25, 40]  # the second conversation is left out


# ---- config ----------------------------------------------------------------------------------------------------
VALID = {"model": {"path": "minilm"}, "data": {"train": "rotten_tomatoes"}, "delta": [{"method": "lora"}]}


@pytest.mark.parametrize("change, message", [
    ({"trian": {}}, r"trian: unknown key \(did you mean 'train'\?\); allowed keys: model, data, delta, train"),
    ({"train": {"batch_sise": 8}}, r"train.batch_sise: unknown key \(did you mean 'batch_size'\?\)"),
    ({"train": {"epochs": "three"}}, r"train.epochs: Input should be a valid integer, unable to parse string as an integer \(got 'three'\)"),
    ({"train": {"optimizer": {"lr": -1}}}, r"train.optimizer.lr: Input should be greater than 0 \(got -1\)"),
    ({"data": {"train": "x.jsonl", "truncation": "cut"}}, r"data.truncation: Input should be 'warn', 'error' or"),
    ({"delta": [{"method": "lorra"}]}, r"delta.0.method: unknown method 'lorra'. Did you mean 'lora'\?"),
    ({"delta": [{"method": "lora", "rank": 8}]}, r"delta.0.rank: unknown key; allowed keys: r, alpha"),
    ({"delta": []}, r"delta: give at least one method, e.g. \[\{method: lora, r: 8\}\]"),
    ({"delta": [{"r": 8}]}, r"delta.0: expected a mapping with a 'method' key"),
    ({"model": {"path": "minilm", 3: "x"}}, r"keys must be names; model.3 is not \(quote it"),
    ({"model": {"path": "no/such/folder"}}, r"model.path: folder 'no/such/folder' not found \(give a local model"),
    ({"data": {"train": "missing.jsonl"}}, r"data.train: file 'missing.jsonl' not found"),
])
def test_invalid_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({**VALID, **change})


@pytest.mark.parametrize("text, overrides, message", [
    ("model: {path: minilm\n", [], r"not valid YAML: while parsing a flow mapping"),
    ("- model\n- data\n", [], r"expected a mapping with keys model, data, delta, train; got list"),
    ("model: !!python/object/apply:os.system ['echo pwned']\n", [],
     r"not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply"),
    ("model: {path: minilm}\n", ["model.path=!!python/name:os.system"],
     r"--set model.path: the value is not valid YAML: could not determine a constructor"),
    ("model: {path: minilm}\n", ["train.epochs"], r"--set 'train.epochs': expected key=value"),
])
def test_invalid_config_files_and_overrides(tmp_path, text, overrides, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


# ---- models and tokenizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("config.json", r"expected a folder with config.json \(a Hugging Face save_pretrained folder\)"),
    ("config.json=", r"config.json is not valid JSON \(Expecting property name .*\); restore the model's config.json"),
    ("model.safetensors=", r"model.safetensors is not a valid safetensors file: it states a header of "
                           r"7,527,520,986,630,856,827 bytes in a 23-byte file"),
    ("tokenizer.json tokenizer_config.json", r"no tokenizer in .* \(none of tokenizer.json, .*\); save it next to the"),
    ("config.json=[1]", r"config.json holds a JSON list, not a model config \(a JSON object with model_type"),
    ('config.json={"model_type": "bertx"}', r"config.json: unknown model_type 'bertx': transformers .* knows no such"),
])
def test_unreadable_model_folders(tmp_path, model_dir, damage, message):
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    for name in damage.split(" ") if "=" not in damage else [damage]:
        if "=" in name:
            file, content = name.split("=", 1)
            (folder / file).write_text(content or "{ not what it should be")
        else:
            (folder / name).unlink()
    with pytest.raises(DeltaTuneError, match=message):
        load_model(str(folder), "classification", num_labels=2)


def tokenizer_dir(tmp_path, **special) -> Path:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from deltatune.models.assets import resolve_model_path

    backend = Tokenizer.from_file(str(resolve_model_path("minilm") / "tokenizer.json"))
    backend.no_padding()
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(tmp_path)
    return tmp_path


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = load_tokenizer(str(tokenizer_dir(tmp_path, eos_token="[SEP]")))
    assert tokenizer.pad_token == "[SEP]"
    batch = Collator(tokenizer.pad_token_id)([{"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": 0},
                                              {"input_ids": [5], "attention_mask": [1], "labels": 1}])
    assert batch["input_ids"][1].tolist() == [5, 102, 102] and batch["attention_mask"][1].tolist() == [1, 0, 0]


def test_tokenizer_without_any_special_token(tmp_path):
    with pytest.raises(DeltaTuneError, match=r"has no pad, eos, unk or bos token to pad batches with; add one"):
        load_tokenizer(str(tokenizer_dir(tmp_path)))


# ---- deltas -----------------------------------------------------------------------------------------------------
def configs(*specs):
    return [get_method(name).config_class(**kwargs) for name, kwargs in specs]


@pytest.mark.parametrize("specs, error, message", [
    ([("lora", {"targets": ["quary"]})], TargetError,
     (r"target 'quary' matches no module of BertForSequenceClassification. Did you mean 'query'\? Candidates: "
      r"attention.output.dense, attention.self.key, attention.self.query")),
    ([("lora", {"targets": ["query"]}), ("lora", {"targets": ["query"]})], TargetError,
     r"'bert.encoder.layer.0.attention.self.query' already carries a lora delta; detach it first"),
    ([("prefix", {}), ("prompt", {})], TargetError,
     r"prompt: the input embeddings already carry a prefix delta; prompt and prefix both extend the input"),
    ([("full", {}), ("head", {})], ConfigError,
     r"the head tensors .* are already trained by another attached delta; attach the head first"),
])
def test_incompatible_or_unmatched_deltas(specs, error, message):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        deltatune.attach(model, configs(*specs))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as it was


def test_fsdp_is_for_full_finetuning():
    delta = deltatune.attach(tiny_model("bert"), configs(("lora", {"targets": ["query"]}), ("head", {})))
    with pytest.raises(ConfigError, match=r"train.parallel: fsdp shards full fine-tuning \(full, head\); lora trains"):
        _check_fsdp(delta, "adamw")


@pytest.fixture
def saved_lora(tmp_path) -> Path:
    return deltatune.attach(tiny_model("bert"), configs(("lora", {"targets": ["query"]}))).save(tmp_path / "lora")


def test_delta_saved_for_another_base(saved_lora):
    with pytest.raises(CheckpointError, match=r"this delta was saved for another base model .* Differences: "
                                              r"classifier.weight: saved \[2, 32\] vs model \[3, 32\]; "
                                              r"classifier.bias: saved \[2\] vs model \[3\]. Load the same base"):
        deltatune.load(tiny_model("bert", num_labels=3), saved_lora)


@pytest.mark.parametrize("damage, message", [
    ("delta.safetensors", r"delta.safetensors is missing or corrupted \(checksum differs from delta.json\)"),
    ("delta.json", r"is not a saved deltatune delta: delta.json not found"),
])
def test_damaged_saved_delta(saved_lora, damage, message):
    target = saved_lora / damage
    if damage == "delta.json":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=message):
        deltatune.load(tiny_model("bert"), saved_lora)


# ---- training: non-finite losses, resume, full disks ----------------------------------------------------------
class Poisoned(nn.Module):
    """`poison` is added to the logits on the `at`-th training forward."""

    def __init__(self, poison: list[float], at: int):
        super().__init__()
        self.emb, self.out = nn.EmbeddingBag(100, 4, mode="sum"), nn.Linear(4, 2)
        self.calls, self.poison, self.at = 0, torch.tensor(poison), at

    def forward(self, input_ids, attention_mask):
        self.calls += self.training
        logits = self.out(self.emb(input_ids, per_sample_weights=attention_mask.float()))
        return logits + self.poison if self.training and self.calls == self.at else logits


def toy_data(n: int = 16) -> TaskData:
    rows = [{"input_ids": [i % 7 + 1, 9], "attention_mask": [1, 1], "labels": i % 2} for i in range(n)]
    return TaskData(rows, rows[:4], [], task="classification", label_names=["a", "b"], num_labels=2, source={})


@pytest.mark.parametrize("poison, value", [([math.nan, 0.0], "nan"), ([-math.inf, 0.0], "inf")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, poison, value):
    model = Poisoned(poison, at=3)
    delta = TrainAll(model, AllParams()).attach()
    cfg = TrainConfig(epochs=1, batch_size=4, checkpoint_every=1, eval_baseline=False)
    with pytest.raises(DeltaTuneError, match=rf"the training loss is {value} .* at step 3 \(epoch 1\); training stopped"
                                             r" before the weights were updated. The last good checkpoint is kept: "
                                             r".*step-00000002. Try a lower learning rate"):
        train(model, delta, toy_data(), cfg, tmp_path, collate=Collator(0))
    assert load_latest(tmp_path / "checkpoints").step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_problems(tmp_path):
    model = Poisoned([0.0, 0.0], at=0)
    delta = TrainAll(model, AllParams()).attach()
    cfg = TrainConfig(max_steps=2, batch_size=4, eval_baseline=False)
    with pytest.raises(CheckpointError, match=r"nothing to resume in .*checkpoints: no checkpoints \(step-\*\) found"):
        train(model, delta, toy_data(), cfg, tmp_path, collate=Collator(0), resume=True)
    train(model, delta, toy_data(), cfg, tmp_path, collate=Collator(0))
    with pytest.raises(CheckpointError, match=r"holds checkpoints of an earlier run: continue it with resume=True"):
        train(model, delta, toy_data(), cfg, tmp_path, collate=Collator(0))
    with pytest.raises(ConfigError, match=r"cannot resume .* with other settings than the run used: "
                                         r"batch_size: 4 → 8; seed: 0 → 1$"):
        train(model, delta, toy_data(), cfg.model_copy(update={"batch_size": 8, "seed": 1}), tmp_path,
              collate=Collator(0), resume=True)
    for path in checkpoint_dirs(tmp_path / "checkpoints"):
        (path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*state.json is missing or corrupted"):
        train(model, delta, toy_data(), cfg, tmp_path, collate=Collator(0), resume=True)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    delta = TrainAll(model, AllParams()).attach()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = {"delta": delta, "optimizer": optimizer, "scheduler": scheduler, "state": {"epoch": 0}, "keep": 2}
    monkeypatch.setattr(storage.os, "fsync", disk_full)  # the disk fills up while the tensors are flushed
    with pytest.raises(CheckpointError, match=r"checkpoint step-00000001 was not written: No space left on device; "
                                              r"there is no earlier checkpoint. Free some space and start the run"):
        save_checkpoint(tmp_path, 1, **parts)
    monkeypatch.undo()
    save_checkpoint(tmp_path, 1, **parts)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=r"checkpoint step-00000002 was not written: No space left on device; "
                                              r"the previous checkpoint .*step-00000001 is unchanged. Free some "
                                              r"space and continue with --resume"):
        save_checkpoint(tmp_path, 2, **parts)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing new, nothing touched
    monkeypatch.undo()
    assert load_latest(tmp_path).step == 1


def test_disk_full_during_a_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    storage.write_json(path, {"accuracy": 0.5})
    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(DeltaTuneError, match=r"no space left on device for .*results.json: nothing was written \(a "
                                             r"previous version is unchanged\); free some space and try again"):
        storage.write_json(path, {"accuracy": 0.9})
    assert storage.read_json(path) == {"accuracy": 0.5} and [p.name for p in tmp_path.iterdir()] == ["results.json"]
