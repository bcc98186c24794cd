"""The command line and YAML configs, end to end on a tiny model saved to disk (real loading code, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from deltatune.models.assets import resolve_model_path
from deltatune.cli import main
from deltatune.config import load_config
from deltatune.errors import ConfigError
from deltatune.registry import methods


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with the real MiniLM tokenizer, saved like any Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable toy sentiment file: the label follows the word "good" / "bad"."""
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    words = ["movie", "plot", "actors", "film", "story", "music"]
    rows = [{"text": f"the {words[i % 6]} was {'good' if i % 2 else 'bad'} {words[(i * 7) % 6]}",
             "label": "positive" if i % 2 else "negative"} for i in range(120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, model_dir: Path, data_file: Path, **sections) -> Path:
    config = {"model": {"path": str(model_dir)}, "data": {"train": str(data_file), "max_length": 32},
              "delta": [{"method": "lora", "r": 4, "targets": ["query", "value"]}, {"method": "head"}],
              "train": {"epochs": 2, "batch_size": 16, "optimizer": {"lr": 0.01}},
              "output_dir": str(tmp_path / "run")}
    for key, value in sections.items():
        config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in methods().items():
        assert name in out and method.description[:30] in out


def test_train_eval_merge_end_to_end(tmp_path, tiny_bert_dir, reviews, capsys):
    config = write_config(tmp_path, tiny_bert_dir, reviews)
    assert main(["train", str(config), "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "base model vs fine-tuned" in out and "trainable parameters" in out
    run = tmp_path / "run"
    for name in ["config.yaml", "metrics.jsonl", "metrics.csv", "results.json", "report.html", "best/delta.json"]:
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3 * 6  # 96 training rows / batch 16, three epochs (the --set took effect)
    assert results["test"]["accuracy"] > results["baseline"]["test"]["accuracy"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3

    assert main(["eval", str(run), "--split", "test"]) == 0
    assert f"{results['test']['accuracy']:.4f}" in capsys.readouterr().out

    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    from deltatune.runs.run import Run
    from deltatune.runs.session import run_session

    session = run_session(Run.open(run))
    batch = session.tokenizer(["the plot was good", "the film was bad"], return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, session.model.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_training_into_an_existing_run_needs_resume(tmp_path, tiny_bert_dir, reviews, capsys):
    config = write_config(tmp_path, tiny_bert_dir, reviews)
    assert main(["train", str(config), "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--set", "train.epochs=1"]) == 1
    assert "--resume" in capsys.readouterr().err


def test_bad_config_is_one_clear_error_on_the_command_line(tmp_path, tiny_bert_dir, reviews, capsys):
    config = write_config(tmp_path, tiny_bert_dir, reviews, trian={"epochs": 1})
    assert main(["train", str(config)]) == 1
    out = capsys.readouterr().err
    assert "trian: unknown key (did you mean 'train'?)" in out and "Traceback" not in out


@pytest.mark.parametrize("change, message", [
    ({"train": {"epochs": "three"}}, "train.epochs: Input should be a valid integer"),
    ({"train": {"optimizer": {"lr": 1e-3, "warmup": 0.1}}},
     "train.optimizer.warmup: unknown key (did you mean 'warmup_steps'?); allowed keys: name, lr, weight_decay"),
    ({"delta": [{"method": "lora", "rank": 8}]}, "delta.0.rank: unknown key; allowed keys: r, alpha, dropout"),
    ({"delta": [{"method": "lorra"}]}, "unknown method 'lorra'. Did you mean 'lora'?"),
    ({"delta": [{"r": 8}]}, "expected a mapping with a 'method' key"),
    ({"data": {"train": "missing.jsonl"}}, "data.train: file 'missing.jsonl' not found"),
    ({"model": {"path": "no/such/folder"}}, "model.path: folder 'no/such/folder' not found"),
    ({"data": {"train": "x.jsonl", "split": [0.5, 0.6, 0.1]}}, "must be three non-negative fractions"),
])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, tiny_bert_dir, reviews, change, message):
    config = write_config(tmp_path, tiny_bert_dir, reviews, **change)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.epochs", "expected key=value"),
    ("delta.5.r=4", "'5' is not an index of a list of 2 items"),
    ("train.epochs.x=1", "'epochs' is a value, not a section"),
])
def test_bad_overrides(tmp_path, tiny_bert_dir, reviews, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, tiny_bert_dir, reviews), [override])


def test_overrides_are_typed_and_reach_nested_lists(tmp_path, tiny_bert_dir, reviews):
    config = load_config(write_config(tmp_path, tiny_bert_dir, reviews),
                         ["delta.0.r=16", "train.optimizer.lr=3e-4", "train.epochs=5"])
    assert config.delta[0].r == 16 and config.train.optimizer.lr == 3e-4 and config.train.epochs == 5


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\n  data: [")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(bad)
    assert "line 1, column 8" in str(err.value)
