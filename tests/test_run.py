"""Run: a finished run folder opened once (config, best delta, chat template, results) for every command that
reopens a run; open_session resolves its base model folder once and reads its config once."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from deltatune.config import validate_config
from deltatune.errors import CheckpointError, ConfigError
from deltatune.models import load as models
from deltatune.runs.run import Run
from deltatune.runs.session import open_session, run_session, run_training
from tests.tiny_lm import CHATML, CORPUS, save_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def chat_config(lm_dir: Path, folder: Path, **model: object) -> dict:
    train = folder / "train.jsonl"
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    train.write_text("".join(json.dumps(c) + "\n" for c in chats * 2), encoding="utf-8")
    return {"model": {"path": str(lm_dir), **model}, "data": {"train": str(train), "format": "messages",
                                                             "max_length": 64},
            "delta": [{"method": "lora", "r": 2, "targets": ["q_proj"]}],
            "train": {"epochs": 1, "batch_size": 4, "checkpoint_every": 1}, "output_dir": str(folder / "run")}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path) -> Path:
    """A finished LoRA SFT run (chat data: it saves its chat template) of two steps."""
    folder = tmp_path_factory.mktemp("run")
    run_training(validate_config(chat_config(lm_dir, folder)))
    return folder / "run"


def edited(run: Path, tmp_path: Path, **sections: dict) -> Path:
    """A copy of `run` whose config.yaml has `sections` merged into its own."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    for key, values in sections.items():
        config[key] = {**config[key], **values}
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def test_a_run_is_read_once_config_delta_template_and_results(lm_run, lm_dir):
    run = Run.open(lm_run)
    assert run.config.model.path == str(lm_dir) and run.config.data.format == "messages"
    assert run.best == lm_run / "best" and run.checkpoints == lm_run / "checkpoints"
    assert run.checkpoints.is_dir()
    assert run.template == CHATML == (lm_run / "best" / "chat_template.jinja").read_text()
    assert run.results["steps"] == 2 and run.results["metric"] == "loss"
    assert run.base_options() == {"dtype": "fp32", "compute_dtype": "auto", "quantize": None,
                                  "trust_remote_code": False}
    assert run.causal_lm() is run
    assert Run.open(lm_run, ["train.seed=7"]).config.train.seed == 7


def test_reopening_needs_a_run_folder_with_a_trained_delta(lm_run, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is not a run folder: config.yaml not found \(train one"):
        Run.open(tmp_path)
    copy = Path(shutil.copytree(lm_run, tmp_path / "run"))
    shutil.rmtree(copy / "best")
    with pytest.raises(ConfigError, match=rf"^{copy} has no trained delta yet \({copy}/best missing\): finish or "
                                          "resume the run first"):
        _ = Run.open(copy).best
    (copy / "best").symlink_to(lm_run / "best")
    with pytest.raises(CheckpointError, match="entry 'best' points outside its folder"):
        _ = Run.open(copy).best


def test_generating_needs_no_data_files_but_a_session_does(lm_run, tmp_path):
    run = Run.open(edited(lm_run, tmp_path, data={"train": str(tmp_path / "gone.jsonl")}))
    assert run.causal_lm().template == CHATML
    with pytest.raises(ConfigError, match=rf"data.train: file '{tmp_path}/gone.jsonl' not found"):
        run_session(run)


def test_only_a_causal_lm_run_generates_text(lm_run, tmp_path):
    run = Run.open(edited(lm_run, tmp_path, data={"format": "classification"}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/run is a classification run \(data.format: "
                                          r"classification\); generating text needs a run trained on text"):
        run.causal_lm()


@pytest.mark.parametrize("text, message", [("[1, 2]", r"\(a JSON list, not an object\)"),
                                           ("{", r"\(Expecting property name enclosed in double quotes")])
def test_results_json_that_is_not_an_object_is_one_error(lm_run, tmp_path, text, message):
    copy = Path(shutil.copytree(lm_run, tmp_path / "run"))
    (copy / "results.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"results.json: not the results of a finished run {message}"):
        _ = Run.open(copy).results


def counting(monkeypatch: pytest.MonkeyPatch, calls: Counter) -> None:
    """Count what loading a model reads: folder resolutions, folder safety checks, our own config and tokenizer
    reads (transformers' own reads inside from_pretrained are not ours)."""
    for name in ("resolve_model_path", "check_model_folder"):
        def spy(*args, original=getattr(models, name), name=name, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(models, name, spy)
    for name in ("AutoConfig", "AutoTokenizer"):
        def read(*args, original=getattr(models, name).from_pretrained, name=name, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(models, name, SimpleNamespace(from_pretrained=read))


def test_open_session_resolves_the_model_once_and_reads_its_config_once(lm_dir, tmp_path, monkeypatch):
    calls: Counter = Counter()
    counting(monkeypatch, calls)
    session = open_session(validate_config(chat_config(lm_dir, tmp_path)))
    assert calls == {"resolve_model_path": 1, "check_model_folder": 1, "AutoConfig": 1, "AutoTokenizer": 1}
    assert session.model.config.pad_token_id == session.tokenizer.pad_token_id


def test_reopening_a_run_for_generation_resolves_the_model_once(lm_run, monkeypatch):
    from deltatune.generation.generator import open_generator

    calls: Counter = Counter()
    counting(monkeypatch, calls)
    generator = open_generator(run=lm_run)
    assert calls == {"resolve_model_path": 1, "check_model_folder": 1, "AutoConfig": 1, "AutoTokenizer": 1}
    assert generator.template == CHATML and generator.delta is not None
