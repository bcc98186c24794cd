"""Portable exports: PEFT adapters name their base portably, list compact target modules and carry the tokenizer;
merged exports take --dtype; GGUF exports from a run on the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from safetensors import safe_open

import deltatune
from deltatune.models.assets import MODEL_CARDS, PACKAGED_MODELS, portable_model_name
from deltatune.cli import main
from deltatune.config import load_config
from deltatune.errors import ConfigError
from deltatune.interop.peft import CONFIG_FILE, compact_names, export_peft
from deltatune.methods.lora import LoRA
from deltatune.runs.session import open_session
from tests.test_interop import perturb, run_dir  # noqa: F401  (fixture)
from tests.test_cli import reviews, tiny_bert_dir  # noqa: F401  (fixtures)
from tests.tiny import biased_tiny_model
from tests.tiny_lm import CHATML, CORPUS, save_tiny_lm

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal-LM run folder (config + best/ delta) with a perturbed LoRA on the tiny Llama, untrained."""
    folder = tmp_path_factory.mktemp("lm")
    lm_dir = save_tiny_lm(folder / "tiny-llama")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 3), encoding="utf-8")
    config = load_config_dict(folder, {"model": {"path": str(lm_dir)},
                                       "data": {"train": str(train), "format": "text", "max_length": 32},
                                       "delta": [{"method": "lora", "r": 4, "alpha": 8,
                                                  "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}],
                                       "output_dir": str(folder / "run")})
    session = open_session(config)
    perturb(session.delta)
    session.delta.save(folder / "run" / "best")
    (folder / "run" / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return folder / "run"


def load_config_dict(folder: Path, raw: dict):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_portable_model_names(tiny_bert_dir):  # noqa: F811
    assert MODEL_CARDS.keys() == PACKAGED_MODELS.keys()
    assert portable_model_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_name(str(PACKAGED_MODELS["minilm"]())) == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_name(str(tiny_bert_dir)) == tiny_bert_dir.name  # a local folder: its name only


def test_peft_export_of_a_run_is_portable(run_dir, tiny_bert_dir, tmp_path, capsys):  # noqa: F811
    assert main(["export", "--format", "peft", str(run_dir), str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == tiny_bert_dir.name  # never the absolute path of this machine
    assert config["target_modules"] == ["query", "value"]  # PEFT's short names, as PEFT writes them
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).is_file()
    assert main(["export", "--format", "peft", str(run_dir), str(tmp_path / "b"), "--base-name", "me/tiny-bert"]) == 0
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["base_model_name_or_path"] == "me/tiny-bert"


def test_compact_target_modules_fall_back_to_full_names_when_short_names_select_more(tmp_path):
    names = ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    candidates = names + ["h.0.attn", "h.0.mlp.c_fc", "h.2.attn.c_attn"]
    assert compact_names(names, candidates[:4]) == ["c_attn"]
    assert compact_names(names, candidates) == names  # c_attn would also select layer 2
    base = biased_tiny_model("gpt2", "lm")
    model = copy.deepcopy(base)
    delta = deltatune.attach(model, LoRA(r=2, targets=["c_attn"], layers=[0]))
    perturb(delta)
    export_peft(delta, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert [n for n, _ in loaded.named_modules() if n.endswith("lora_A")] == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_A"]  # PEFT adapts layer 0 only, as deltatune did


@pytest.mark.parametrize(("dtype", "torch_dtype"), [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_merge_dtype(run_dir, tmp_path, capsys, dtype, torch_dtype):  # noqa: F811
    assert main(["merge", str(run_dir), str(tmp_path / "m"), *(["--dtype", dtype] if dtype else [])]) == 0
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").dtype == torch_dtype


def test_export_dtype_errors(run_dir, tmp_path, capsys):  # noqa: F811
    assert main(["merge", str(run_dir), str(tmp_path / "m"), "--dtype", "q8_0"]) == 1
    assert "--dtype q8_0 is a GGUF quantization: use it with --format gguf" in capsys.readouterr().err
    assert main(["export", "--format", "peft", str(run_dir), str(tmp_path / "p"), "--dtype", "bf16"]) == 1
    assert "--dtype does not apply to --format peft" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", str(run_dir), str(tmp_path / "x.gguf")]) == 1
    out = " ".join(capsys.readouterr().err.split())
    assert "GGUF export supports LlamaForCausalLM, MistralForCausalLM models, not BertForSequenceClassification" in out
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists() and not (tmp_path / "x.gguf").exists()


def test_peft_export_carries_the_chat_template(lm_run, tmp_path, capsys):
    assert main(["export", "--format", "peft", str(lm_run), str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == CHATML
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_gguf_exports_of_a_run_on_the_command_line(lm_run, tmp_path, capsys):
    assert main(["export", "--format", "gguf", str(lm_run), str(tmp_path / "model.gguf"), "--dtype", "q8_0"]) == 0
    assert main(["export", "--format", "gguf-lora", str(lm_run), str(tmp_path / "lora.gguf")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "merged GGUF model written to" in out and "GGUF LoRA adapter written to" in out
    model = gguf.GGUFReader(tmp_path / "model.gguf")
    assert model.fields["general.name"].contents() == "tiny-llama"
    assert {t.tensor_type.name for t in model.tensors} == {"Q8_0", "F32"}
    lora = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert len(lora.tensors) == 2 * 4 * 2  # lora_a and lora_b of 4 projections in 2 layers
    assert main(["export", "--format", "gguf-lora", str(lm_run), str(tmp_path / "lora.gguf")]) == 1
    assert "lora.gguf already exists; choose a new file name" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", str(lm_run), str(tmp_path / "model")]) == 1
    assert "give a new path ending in .gguf" in capsys.readouterr().err


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tmp_path):
    from deltatune.interop.llamacpp import export_gguf_lora
    from tests.tiny_lm import tiny_llama, tiny_tokenizer

    model = tiny_llama(tiny_tokenizer())
    with pytest.raises(ConfigError, match="DoRA and rsLoRA have no GGUF adapter form"):
        export_gguf_lora(deltatune.attach(model, LoRA(r=2, targets=["q_proj"], dora=True)), tmp_path / "a.gguf")
    model = tiny_llama(tiny_tokenizer())
    with pytest.raises(ConfigError, match="LoRA on model.embed_tokens: llama.cpp adapters hold LoRAs of the "
                                          "attention and MLP projections only"):
        export_gguf_lora(deltatune.attach(model, LoRA(r=2, targets=["embed_tokens"])), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
