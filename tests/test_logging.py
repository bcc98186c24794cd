"""Metrics logs: a CSV and a JSONL row every training step, and TensorBoard event files with the same numbers."""

from __future__ import annotations

import csv
import json

import pytest

import deltatune
from deltatune.methods.full import Full
from deltatune.optim import OptimizerConfig
from deltatune.train import TrainConfig, train
from tests.test_loop import COLLATE, task_data
from tests.tiny import tiny_model

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")  # test extra


def test_every_step_goes_to_csv_jsonl_and_tensorboard(tmp_path):
    model = tiny_model("bert")
    cfg = TrainConfig(epochs=1, batch_size=16, eval_every=2, optimizer=OptimizerConfig(lr=1e-2))  # 64 rows: 4 steps
    result = train(model, deltatune.attach(model, Full()), task_data("classification"), cfg, tmp_path,
                   collate=COLLATE)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, result.steps + 1)) == [1, 2, 3, 4]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"] == \
            pytest.approx([r["loss"] for r in train_rows], rel=1e-12)

    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/accuracy", "test/accuracy"} <= set(scalars)
    assert "train/epoch" not in scalars
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    validation = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "validation"]
    accuracy = events.Scalars("validation/accuracy")
    assert [e.step for e in accuracy] == [step for step, _ in validation]
    assert [e.value for e in accuracy] == pytest.approx([value for _, value in validation])
    assert validation[0][0] == 0  # the baseline is the curve's first point
