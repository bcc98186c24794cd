"""Hostile and careless inputs (issue #15): each is one deltatune error, class and message asserted, that reaches
stderr with exit code 1 through the command line and leaves every file on disk as it was; and none gives a silently
wrong result (a delta on another checkpoint of its base, a model of random weights, an encoder trained as a decoder,
a classifier of one class)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from launch import review_rows, write_jsonl
from safetensors.torch import load_file, save_file
from tiny import AllParams, TrainAll, save_tiny_model_dir, tiny_model
from torch import nn

import deltatune
from deltatune import storage
from deltatune.cli import main
from deltatune.data import Collator, TaskData
from deltatune.delta import CONFIG_FILE, TENSOR_FILE
from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError
from deltatune.fingerprint import SAMPLED_TENSORS, SAMPLES, fingerprint
from deltatune.methods.fusion import Fusion
from deltatune.models.load import load_model
from deltatune.registry import get_method
from deltatune.train import TrainConfig, train
from tests.saved_adapters import save_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("gpt2"), arch="gpt2", head="lm")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", review_rows(60))


def files(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (files or folders): compared before and after a refused command."""
    paths = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def write_config(tmp_path: Path, model_dir: Path, train_file: Path | str, **sections) -> Path:
    config = {"model": {"path": str(model_dir)}, "data": {"train": str(train_file), "max_length": 32},
              "delta": [{"method": "lora", "r": 4, "targets": ["query", "value"]}, {"method": "head"}],
              "train": {"epochs": 1, "batch_size": 16, "eval_baseline": False}, "output_dir": str(tmp_path / "run")}
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_fails(argv: list[str], capsys, message: str, *untouched: Path) -> str:
    """Run the CLI: exit code 1, `message` (a regex) on stderr in its one `error:` line, no traceback, nothing on
    stdout about it, and the files under `untouched` unchanged."""
    before = files(*untouched)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("error:") == 1, err
    assert re.search(message, err.splitlines()[0]), err  # the problem on the error line itself (not wrapped)
    assert "Traceback" not in err + out and "error" not in out
    assert files(*untouched) == before
    return err


# ---- 1. a delta loads only into the weights it was trained on --------------------------------------------------------
def lm(seed: int = 0) -> nn.Module:
    return tiny_model("llama", head="lm", seed=seed)


def lora(**kwargs):
    return get_method("lora").config_class(r=4, **kwargs)


def test_a_delta_does_not_load_into_another_checkpoint_of_its_architecture(tmp_path):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    before = files(saved)
    with pytest.raises(CheckpointError, match=r"^this delta was trained on a different base model: the given model "
                                              r"\(LlamaForCausalLM from an unknown source\) has the same parameter "
                                              r"names and shapes but other weights than the one the delta was trained "
                                              r"on .*e\.g\. in model\.embed_tokens\.weight, .*Load the base model"):
        deltatune.load(lm(seed=1), saved)
    assert files(saved) == before
    deltatune.load(lm(), saved)  # the right base loads


def test_one_slightly_changed_weight_tensor_is_noticed(tmp_path):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    other = lm()
    name = list(fingerprint(other)["weights"])[-2]
    with torch.no_grad():
        other.get_parameter(name).mul_(1.001)  # as a short fine-tuning would
    with pytest.raises(CheckpointError, match=rf"other weights .*e\.g\. in {name} \(another checkpoint"):
        deltatune.load(other, saved)


def test_the_fingerprint_samples_a_few_elements_of_a_few_tensors():
    weights = fingerprint(lm())["weights"]
    assert 1 < len(weights) <= SAMPLED_TENSORS and all(len(s["values"]) <= SAMPLES for s in weights.values())
    assert all(len(lm().get_parameter(name).shape) == 2 for name in weights)  # matrices, not all-ones norms


def test_the_fingerprint_is_taken_before_a_delta_trains_weights_in_place(tmp_path):
    model = lm()
    delta = deltatune.attach(model, get_method("full").config_class())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # full fine-tuning changes the base weights themselves
    trained = {k: v.clone() for k, v in delta.state_dict().items()}
    loaded = deltatune.load(lm(), delta.save(tmp_path / "full"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())


def test_a_base_loaded_in_lower_precision_still_matches(tmp_path):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    deltatune.load(lm().to(torch.bfloat16), saved)
    with pytest.raises(CheckpointError, match="trained on a different base model"):
        deltatune.load(lm(seed=1).to(torch.bfloat16), saved)


def test_deltas_saved_before_weight_fingerprints_load_by_names_and_shapes(tmp_path):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    meta = storage.read_json(saved / CONFIG_FILE)
    del meta["base"]["weights"]
    storage.write_json(saved / CONFIG_FILE, {**meta, "version": 1})
    deltatune.load(lm(seed=1), saved)  # format 1 recorded names and shapes only


class Toy(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.EmbeddingBag(16, 4, mode="sum"), nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        return self.out(self.emb(input_ids, per_sample_weights=attention_mask.float()))


def test_resuming_a_checkpoint_on_another_base_is_refused(tmp_path):
    rows = [{"input_ids": [i % 7 + 1, 9], "attention_mask": [1, 1], "labels": i % 2} for i in range(16)]
    data = TaskData(rows, rows[:4], [], task="classification", label_names=["a", "b"], num_labels=2, source={})
    cfg = TrainConfig(max_steps=2, batch_size=4, checkpoint_every=1, eval_baseline=False)
    model = Toy(seed=0)
    train(model, TrainAll(model, AllParams()).attach(), data, cfg, tmp_path, collate=Collator(0))
    before = files(tmp_path)
    other = Toy(seed=1)
    with pytest.raises(CheckpointError, match="this delta was trained on a different base model"):
        train(other, TrainAll(other, AllParams()).attach(), data, cfg.model_copy(update={"max_steps": 4}), tmp_path,
              collate=Collator(0), resume=True)
    assert files(tmp_path) == before


def test_fusion_refuses_stage_one_adapters_of_another_checkpoint(tmp_path):
    adapters = [str(save_adapter(tiny_model("bert"), tmp_path / f"a{i}", seed=i, std=0.3)) for i in range(2)]
    with pytest.raises(CheckpointError, match=r"adapter .*a0: this delta was trained on a different base model"):
        deltatune.attach(tiny_model("bert", seed=1), Fusion(adapters=adapters))
    deltatune.attach(tiny_model("bert"), Fusion(adapters=adapters))


def test_eval_on_a_model_folder_with_other_weights_is_refused(tmp_path, bert_dir, reviews, capsys):
    assert main(["train", str(write_config(tmp_path, bert_dir, reviews))]) == 0
    other = Path(shutil.copytree(bert_dir, tmp_path / "other"))
    tensors = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in tensors.items()}, other / "model.safetensors", metadata={"format": "pt"})
    cli_fails(["eval", tmp_path / "run", "--set", f"model.path={other}"], capsys,
              r"^error: this delta was trained on a different base model: the given model \(BertForSequenceClass"
              r"ification from .*other\) has the same parameter names and shapes but other weights", tmp_path)


# ---- 2. a model folder whose weights do not fit the model ------------------------------------------------------------
def test_weights_of_another_architecture_are_an_error(tmp_path, bert_dir, gpt2_dir):
    folder = Path(shutil.copytree(gpt2_dir, tmp_path / "gpt2"))
    shutil.copy(bert_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"the weights in .*gpt2' do not belong to GPT2ForSequenceClassification:"
                                              r" 28 of its parameters are not in the files \(e.g. transformer.h.0.attn"
                                              r".c_attn.bias, .*\), which hold others \(e.g. bert.embeddings.LayerNorm"
                                              r".bias, .*\); the model would be mostly random"):
        load_model(str(folder), "classification", 2)


def test_weights_of_another_shape_than_the_config_are_an_error(tmp_path, bert_dir):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "bert"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"the weights in .* do not fit its config.json: bert.encoder.layer.\d.* "
                                              r"is \[.*64.*\] in the files but \[.*48.*\] in the model \(6 such\); "
                                              r"use the config.json saved with these weights"):
        load_model(str(folder), "classification", 2)


def test_a_few_missing_weights_are_a_warning(tmp_path, bert_dir):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "bert"))
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pooler" not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"2 parameters of BertForSequenceClassification are not in .* and start "
                                         r"random: bert.pooler.dense.bias, bert.pooler.dense.weight"):
        model, _ = load_model(str(folder), "classification", 2)
    assert model.deltatune_new_weights == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]


def test_a_new_head_of_another_size_is_expected(bert_dir, recwarn):
    model, _ = load_model(str(bert_dir), "classification", 3)  # the folder's head has 2 classes
    assert model.deltatune_new_weights == ["classifier.bias", "classifier.weight"]
    assert model.classifier.weight.shape == (3, 32) and not recwarn.list


def test_a_tokenizer_larger_than_the_embeddings_is_an_error(tmp_path, bert_dir, reviews, capsys):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "bert"))
    tiny_model("bert").save_pretrained(folder)  # 96 embeddings, next to MiniLM's tokenizer of 30522 tokens
    cli_fails(["train", write_config(tmp_path, folder, reviews)], capsys,
              r"the tokenizer in .* has 30522 tokens but the model's embeddings only 96: they do not belong together",
              folder, reviews)


# ---- 3. an encoder is not a causal language model --------------------------------------------------------------------
def test_an_encoder_is_refused_for_causal_language_modelling(tmp_path, bert_dir, gpt2_dir, reviews, capsys):
    with pytest.raises(ConfigError, match=r"holds an encoder \(bert\): its prediction for a token depends on the tokens"
                                          r" after it, so causal language-model formats \(text, alpaca, sharegpt, "
                                          r"messages\) would train it to read the answer from the future. Use a "
                                          r"decoder model"):
        load_model(str(bert_dir), "causal_lm")
    load_model(str(gpt2_dir), "causal_lm")  # a decoder passes the same probe
    config = write_config(tmp_path, bert_dir, reviews, data={"format": "text"}, delta=[{"method": "lora"}])
    cli_fails(["train", config], capsys, r"holds an encoder \(bert\)", bert_dir, reviews)
    assert not (tmp_path / "run" / "checkpoints").exists()
    cli_fails(["generate", "--model", bert_dir, "--prompt", "hi"], capsys, r"holds an encoder \(bert\)")


# ---- 4. degenerate data and damaged deltas ---------------------------------------------------------------------------
def test_a_single_class_is_an_error(tmp_path, bert_dir, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": r["text"], "label": "pos"} for r in review_rows(30)])
    for labels in (None, ["pos", "neg"]):  # also when the configured labels name more classes
        config = write_config(tmp_path, bert_dir, data, data={"labels": labels})
        cli_fails(["train", config], capsys, r"one.jsonl: every training example has the same label \('pos', 24 "
                                             r"examples\): a classifier needs at least two classes", data)


@pytest.mark.parametrize("name, text, message", [
    ("r.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": NaN}\n',
     r"r.jsonl:2: NaN is not a JSON value \(JSON has no NaN or infinity\)"),
    ("r.jsonl", '{"text": "a", "label": -Infinity}\n', r"r.jsonl:1: -Infinity is not a JSON value"),
    ("r.json", '[{"text": "a", "label": Infinity}]', r"r.json: Infinity is not a JSON value"),
    ("r.csv", "text,label\na,1.5\nb,2\nc,inf\n", r"r.csv:4: regression label inf in column 'label' is not a finite"),
])
def test_non_finite_regression_labels(tmp_path, bert_dir, capsys, name, text, message):
    data = tmp_path / name
    data.write_text(text)
    cli_fails(["train", write_config(tmp_path, bert_dir, data, data={"format": "regression"})], capsys, message, data)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_delta_holding_non_finite_values_is_refused(tmp_path, value):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    tensors = load_file(saved / TENSOR_FILE)
    name = sorted(tensors)[1]
    tensors[name][0, 0] = value
    save_file(tensors, saved / TENSOR_FILE)
    storage.write_json(saved / CONFIG_FILE, {**storage.read_json(saved / CONFIG_FILE), "sha256": storage.sha256(saved / TENSOR_FILE)})
    model = lm()
    with pytest.raises(CheckpointError, match=rf"delta.safetensors holds NaN or infinite values in 1 tensor\(s\), "
                                              rf"e.g. {name}: the delta is damaged"):
        deltatune.load(model, saved)
    assert not any("lora" in name for name, _ in model.named_parameters())  # nothing was attached


# ---- 5. damaged model folders and delta files ------------------------------------------------------------------------
@pytest.mark.parametrize("file, content, error, message", [
    ("config.json", "[1, 2]", CheckpointError, r"config.json holds a JSON list, not a model config \(a JSON object"),
    ("config.json", "42", CheckpointError, r"config.json holds a JSON int, not a model config"),
    ("config.json", b"\x89PNG\r\n\x1a\n\x00\xff", CheckpointError, r"config.json is not valid JSON \('utf-8' codec"),
    ("config.json", '{"model_type": "bertx"}', CheckpointError,
     r"config.json: unknown model_type 'bertx': transformers .* knows no such architecture"),
    ("config.json", '{"hidden_size": 32}', CheckpointError, r"config.json: unknown model_type None"),
    ("tokenizer.json", "{ garbage", CheckpointError,
     r"cannot load a tokenizer from .* \(JSONDecodeError: .*\); its tokenizer files are damaged: save the tokenizer "
     r"again"),
    ("tokenizer.json", "[]", CheckpointError, r"cannot load a tokenizer from .*its tokenizer files are damaged"),
    ("model.safetensors", b"\x00" * 16, DeltaTuneError,
     r"cannot load model from .* for task 'classification': .*deserializing header"),
])
def test_damaged_model_folders(tmp_path, bert_dir, reviews, capsys, file, content, error, message):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=message):
        load_model(str(folder), "classification", 2)
    cli_fails(["train", write_config(tmp_path, folder, reviews)], capsys, message, folder, reviews)


@pytest.mark.parametrize("change, message", [
    (lambda meta: [meta], r"top level: Input should be a valid dictionary"),
    (lambda meta: {k: v for k, v in meta.items() if k != "deltas"}, r"deltas: Field required"),
    (lambda meta: {**meta, "deltas": {"lora": 1}}, r"deltas: Input should be a valid list"),
    (lambda meta: {**meta, "base": {**meta["base"], "shapes": "x"}}, r"base.shapes: Input should be a valid dict"),
    (lambda meta: {**meta, "base": {**meta["base"], "weights": {"w": {"dtype": "save", "index": [], "values": []}}}},
     r"base.weights.w.dtype: Input should be 'float64', 'float32', 'float16' or 'bfloat16'"),
    (lambda meta: {**meta, "format": "peft"}, r"format: Input should be 'deltatune-delta'"),
    (lambda meta: {**meta, "version": 99}, r"format version 99 is newer than this deltatune reads \(2\); upgrade"),
])
def test_delta_json_of_the_wrong_structure(tmp_path, change, message):
    saved = deltatune.attach(lm(), lora()).save(tmp_path / "lora")
    storage.write_json(saved / CONFIG_FILE, change(storage.read_json(saved / CONFIG_FILE)))
    with pytest.raises(CheckpointError, match=message):
        deltatune.load(lm(), saved)


# ---- 6. hostile data and config files through the command line -------------------------------------------------------
REVIEWS = review_rows(30)
COLUMNS = {"text": [r["text"] for r in REVIEWS], "label": [r["label"] for r in REVIEWS]}
RECORDS = "".join(json.dumps(r) + "\n" for r in REVIEWS)


def lines(change: Callable[[int, dict], dict]) -> str:
    return "".join(json.dumps(change(i, dict(r))) + "\n" for i, r in enumerate(REVIEWS))


DATA_FILES = [  # (file name, content, message)
    ("columns.json", json.dumps(COLUMNS), r"columns.json: one JSON object of columns \('text', 'label'\), not a list "
                                          r"of records; write one record per line"),
    ("columns.json", json.dumps(COLUMNS, indent=2), r"one JSON object of columns"),
    ("index.json", json.dumps({k: dict(enumerate(v)) for k, v in COLUMNS.items()}), r"one JSON object of columns"),
    ("wrapped.json", json.dumps({"data": REVIEWS}), r"wrapped.json: the records are inside the key 'data' of one"),
    ("number.json", "42", r"number.json: expected an array of records or JSON lines, got a JSON int"),
    ("empty.jsonl", "", r"empty.jsonl: no records"),
    ("blank.jsonl", "\n  \n\n", r"blank.jsonl: no records"),
    ("empty.json", "[]", r"empty.json: no records"),
    ("empty.csv", "", r"empty.csv: no records"),
    ("header.csv", "text,label\n", r"header.csv: no records"),
    ("ragged.csv", "text,label\nfine,a\n" + "bad,b,c\n", r"ragged.csv:3: malformed CSV \(Expected 2 fields"),
    ("binary.jsonl", bytes(range(256)) * 4, r"binary.jsonl: not UTF-8 text"),
    ("binary.csv", b"\xff\xfe" + bytes(range(200)), r"binary.csv: not UTF-8 text"),
    ("list.jsonl", lines(lambda i, r: {**r, "label": [r["label"]]}),
     r"list.jsonl:1: label in column 'label' is a list \(\['negative'\]\); each record needs one label"),
    ("dict.jsonl", lines(lambda i, r: {**r, "label": {"y": r["label"]}}), r"dict.jsonl:1: label in column 'label' is a"
                                                                          r" dict"),
    ("textlist.jsonl", lines(lambda i, r: {**r, "text": [r["text"]]}), r"textlist.jsonl:1: text in column 'text' is a"
                                                                       r" list"),
    ("nan.jsonl", lines(lambda i, r: {**r, "text": float("nan")} if i == 4 else r), r"nan.jsonl:5: NaN is not a JSON"),
    ("nolabel.csv", "text,label\n" + "".join(f"{r['text']},{'' if i == 2 else r['label']}\n"
                                             for i, r in enumerate(REVIEWS)),
     r"nolabel.csv:4: record has no 'label' \(columns: text\)"),
    ("mixed.jsonl", lines(lambda i, r: {**r, "label": 3} if i == 6 else r),
     r"mixed.jsonl:7: column 'label' holds 3 but earlier records hold str values"),
    ("data.txt", RECORDS, r"data.txt: unsupported file type"),
    ("data.parquet", RECORDS, r"data.parquet: cannot read file"),
    ("fake.jsonl.gz", RECORDS, r"fake.jsonl.gz: cannot read file \(Not a gzipped file"),
    ("records.csv", RECORDS, r"records.csv: no column 'label'"),
]


@pytest.mark.parametrize("name, content, message", DATA_FILES, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(DATA_FILES)])
def test_hostile_data_files(tmp_path, bert_dir, capsys, name, content, message):
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = write_config(tmp_path, bert_dir, data)
    cli_fails(["train", config], capsys, message, data, config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unseen_labels_in_validation_or_test_files(tmp_path, bert_dir, reviews, capsys):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "meh", "label": "neutral"}])
    for split in ("validation", "test"):
        cli_fails(["train", write_config(tmp_path, bert_dir, reviews, data={split: str(odd)})], capsys,
                  r"odd.jsonl:1: label 'neutral' is not in the training data \(known labels: negative, positive\)",
                  odd, reviews)


def test_a_label_column_of_free_text_warns(tmp_path, bert_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"review {i}", "label": f"words {i}"} for i in range(40)])
    assert main(["train", str(write_config(tmp_path, bert_dir, data))]) == 0
    assert "d.jsonl: 32 classes for 32 training examples (most classes have one example): is data.label_column the " \
           "label and not free text?" in " ".join(capsys.readouterr().out.split())


def test_data_with_bom_unicode_and_huge_lines_trains(tmp_path, bert_dir, capsys):
    """Not errors: a byte-order mark, odd unicode and one 1 MB line are data like any other."""
    rows = [{"text": "\u202e\u0000 😀 " + r["text"] + "\u2028", "label": r["label"]} for r in REVIEWS]
    rows[0]["text"] = "word " * 200_000
    data = tmp_path / "odd.jsonl"
    data.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["train", str(write_config(tmp_path, bert_dir, data))]) == 0
    assert "odd.jsonl are longer than 32 tokens" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("setup, argv, message", [
    (lambda t, b: (t / "model.json").write_text("{}") or [], ["generate", "--model", "{t}/model.json", "--prompt", "x"],
     r"model path '.*model.json' is a file: give the folder that holds config.json"),
    (lambda t, b: [(b / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
     ["generate", "--model", "{b}", "--prompt", "x"], r"no tokenizer in .*; save it next to the model"),
    (lambda t, b: (t / "c.yaml").write_bytes(bytes(range(128, 256))), ["train", "{t}/c.yaml"],
     r"c.yaml: not a UTF-8 text file \(invalid start byte at byte 0\); give a YAML config"),
    (lambda t, b: (t / "c.yaml").write_text(""), ["train", "{t}/c.yaml"], r"c.yaml: expected a mapping with keys model"),
    (lambda t, b: (t / "c.yaml").write_text("[1, 2]"), ["train", "{t}/c.yaml"], r"expected a mapping .* got list"),
    (lambda t, b: None, ["train", "{t}"], r"config file .* not found"),
    (lambda t, b: None, ["eval", "{b}"], r"is not a run folder: config.yaml not found"),
    (lambda t, b: None, ["export", "--format", "peft", "{b}", "{t}/out"], r"is not a saved deltatune delta: delta.json"),
    (lambda t, b: None, ["generate", "--model", "{g}", "--delta", "{b}/config.json", "--prompt", "x"],
     r"config.json is not a saved deltatune delta"),
    (lambda t, b: (t / "p.txt").write_text("\n\n"), ["generate", "--model", "{g}", "--prompts-file", "{t}/p.txt"],
     r"p.txt: no prompts"),
    (lambda t, b: None, ["convert", "{b}/config.json", "{t}/out"], r"config.json' is not a .gguf file"),
])
def test_hostile_command_lines(tmp_path, bert_dir, gpt2_dir, capsys, setup, argv, message):
    model = Path(shutil.copytree(bert_dir, tmp_path / "bert"))
    setup(tmp_path, model)
    cli_fails([a.format(t=tmp_path, b=model, g=gpt2_dir) for a in argv], capsys, message, model)


def test_a_real_process_prints_one_error_line_on_stderr(tmp_path, bert_dir):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": r["text"], "label": "pos"} for r in REVIEWS])
    config = write_config(tmp_path, bert_dir, data)
    done = subprocess.run([sys.executable, "-m", "deltatune", "train", str(config)], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                   "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every training example has the same label ('pos'" in errors[0]
    assert "Traceback" not in done.stderr and "error" not in done.stdout
