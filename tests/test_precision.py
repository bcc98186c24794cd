"""The frozen base's dtype (model.dtype: auto | bf16 | fp32): bf16 base, fp32 deltas, the fp32 fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import validate_config
from deltatune.models.precision import compute_in, resolve_base_precision
from deltatune.runs.session import open_session, run_training
from deltatune.train import compute
from tests.tiny_lm import CORPUS, save_tiny_lm

NO_BF16 = {"avx2", "fma"}  # this CI machine: AVX2 only
AMX = {"avx512f", "amx_bf16", "amx_tile"}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "model")


def run_config(lm_dir: Path, tmp_path: Path, *, delta: dict | None = None, **model) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 6))
    return {"model": {"path": str(lm_dir), **model},
            "data": {"train": str(data), "format": "text", "split": [0.75, 0.25, 0], "max_length": 32},
            "delta": [delta or {"method": "lora", "r": 4}],
            "train": {"epochs": 6, "batch_size": 6, "optimizer": {"lr": 5e-2}, "eval_baseline": False},
            "output_dir": str(tmp_path / "run")}


def base_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if "lora_" not in name}


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(("setting", "native", "trains_base", "expected"), [
    ("auto", True, False, torch.bfloat16),
    ("auto", False, False, torch.float32),  # no native bf16 matmuls: the fp32 fallback
    ("auto", True, True, torch.float32),  # full fine-tuning keeps an fp32 model
    ("bf16", False, False, torch.bfloat16),
    ("fp32", True, False, torch.float32),
    ("bfloat16", False, False, torch.bfloat16),  # the older spellings stay valid
    ("float32", True, False, torch.float32),
])
def test_base_dtype_resolution(setting, native, trains_base, expected):
    storage, _ = resolve_base_precision(setting, trained_by="full" if trains_base else None, bf16_native=native,
                                        ram_bytes=1 << 40)
    assert storage is expected


def test_auto_follows_the_cpu_flags(monkeypatch, lm_dir, tmp_path):
    for flags, expected in ((NO_BF16, torch.float32), (AMX, torch.bfloat16)):
        monkeypatch.setattr(compute, "cpu_flags", lambda flags=flags: flags)
        session = open_session(validate_config(run_config(lm_dir, tmp_path)))
        assert base_dtypes(session.model) == {expected}
    full = run_config(lm_dir, tmp_path, delta={"method": "full"})
    assert base_dtypes(open_session(validate_config(full)).model) == {torch.float32}


def test_lora_on_a_bf16_base_trains_fp32_deltas_like_fp32(monkeypatch, lm_dir, tmp_path):
    results, losses = {}, {}
    for flags, name in ((NO_BF16, "fp32"), (AMX, "bf16")):  # auto -> fp32 here, bf16 as on an AMX machine
        monkeypatch.setattr(compute, "cpu_flags", lambda flags=flags: flags)
        session, results[name] = run_training(validate_config(run_config(lm_dir, tmp_path / name)))
        assert base_dtypes(session.model) == {torch.__dict__[{"fp32": "float32", "bf16": "bfloat16"}[name]]}
        assert {p.dtype for p in session.delta.trainable_parameters().values()} == {torch.float32}
        rows = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows if row["kind"] == "train"]
        saved = load_file(tmp_path / name / "run" / "best" / "delta.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.float32}
    assert max(losses["bf16"][-3:]) < losses["bf16"][0] - 0.05  # it learns (a tiny random LM learns slowly)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    assert results["bf16"].best_validation["loss"] == pytest.approx(results["fp32"].best_validation["loss"], rel=0.02)


def test_bf16_base_logits_are_close_to_fp32(lm_dir, tmp_path):
    models = {dtype: open_session(validate_config(run_config(lm_dir, tmp_path, dtype=dtype,
                                                             compute_dtype=compute))).model
              for dtype, compute in (("fp32", "auto"), ("bf16", "bf16"))}  # bf16 autocast (emulated on AVX2)
    assert base_dtypes(models["bf16"]) == {torch.bfloat16}
    reference, bf16 = logits(models["fp32"]), logits(models["bf16"])
    assert not torch.equal(reference, bf16)
    torch.testing.assert_close(bf16, reference, atol=0.05, rtol=0.05)


def test_compute_in_runs_mixed_dtypes_under_autocast():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 2))  # bf16 base, fp32 delta
    with pytest.raises(RuntimeError):
        layer(torch.ones(1, 4, dtype=torch.bfloat16))
    compute_in(layer, torch.bfloat16)
    assert layer(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # left as found
