"""Crash safety: `deltatune train` killed with SIGKILL (during a checkpoint save, or between saves) and continued
with `--resume` ends bitwise where an uninterrupted run ends: same weights, same logged curves, no step twice."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import best_delta, env, metrics, text_rows, write_config, write_jsonl
from tiny import save_tiny_model_dir

from deltatune.cli import main
from deltatune.storage import load_tensors
from deltatune.train.checkpoint import checkpoint_dirs

STEPS = 12  # 24 examples, batch 4, 2 epochs


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """GPT-2 with dropout and LoRA with dropout (the RNG state matters), a checkpoint after every step."""
    tmp = tmp_path_factory.mktemp("crash")
    model = save_tiny_model_dir(tmp / "gpt2", "gpt2", head="lm", dropout=0.1)
    data = {"train": str(write_jsonl(tmp / "train.jsonl", text_rows(24, 0))), "format": "text", "max_length": 32,
            "validation": str(write_jsonl(tmp / "validation.jsonl", text_rows(6, 1))), "split": [1.0, 0.0, 0.0]}
    return write_config(tmp / "config.yaml", model={"path": str(model)}, data=data,
                        delta=[{"method": "lora", "r": 4, "dropout": 0.1, "targets": ["c_attn", "c_proj"]}],
                        train={"epochs": 2, "batch_size": 4, "log_every": 1, "eval_every": 4, "checkpoint_every": 1,
                               "keep_checkpoints": 2, "optimizer": {"lr": 0.01, "warmup_ratio": 0.2}},
                        output_dir=str(tmp / "unused"))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert main(["train", str(config), "--set", f"output_dir={out}"]) == 0
    return out


def kill_when(ready, proc: subprocess.Popen) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 0.2 ms)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.0002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def saving(run: Path, step: int):
    """A checkpoint of `step` or later is being written: its temporary folder exists."""
    return lambda: max(saves_in_progress(run), default=-1) >= step  # one listing: a save may finish between two


def saves_in_progress(run: Path) -> list[int]:
    folder = run / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return [int(n[6:14]) for n in names if n.startswith(".step-") and ".tmp" in n]


def logged(run: Path, step: int):
    """The loss of `step` is in metrics.jsonl: the step is done, its evaluation / checkpoint may be running."""
    def ready() -> bool:
        log = run / "metrics.jsonl"
        return log.is_file() and f'"kind": "train", "step": {step},' in log.read_text()

    return ready


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("elapsed", "tokens_per_s")} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("moment", [saving, logged])
def test_sigkill_then_resume_equals_an_uninterrupted_run(config, reference, tmp_path, moment):
    step = random.Random(moment.__name__).randint(2, STEPS - 2)  # a seeded choice of the step to kill at
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(config), "--set", f"output_dir={run}"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(moment(run, step), proc)
    assert checkpoint_dirs(run / "checkpoints")  # something to resume from
    # `saving` almost always kills inside the save (a half-written .step-*.tmp folder stays behind and must never
    # be used), but the save may complete between the poll and the kill: the rest holds either way.
    assert not (run / "results.json").exists()

    assert main(["train", str(config), "--set", f"output_dir={run}", "--resume"]) == 0
    assert metrics(run) == metrics(reference)  # losses, lrs, grad norms, evaluations: bitwise, each row once
    assert [r["step"] for r in metrics(run) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert csv_rows(run) == csv_rows(reference)
    for name, value in best_delta(reference).items():
        assert torch.equal(best_delta(run)[name], value), name
    last = [load_tensors(checkpoint_dirs(r / "checkpoints")[-1] / "delta.safetensors") for r in (reference, run)]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    assert [p.name for p in (run / "checkpoints").iterdir()] == [p.name for p in (reference / "checkpoints").iterdir()]
    timing = ("wall_time_s", "train_tokens_per_s", "peak_rss_mb")
    results = [{k: v for k, v in json.loads((r / "results.json").read_text()).items() if k not in timing}
               for r in (reference, run)]
    assert results[0] == results[1]
