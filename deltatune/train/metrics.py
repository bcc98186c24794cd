"""Losses and metrics per task, computed by the loop from the model's logits (the model never sees `labels`).

Every loss is returned as (sum over units, number of units) so that gradient accumulation can divide by the
units of the whole optimizer step: the accumulated gradient then equals the one of a single big batch.
Units are examples for classification/regression and real (non -100) target tokens for causal LM ("text").
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from deltatune import storage
from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError
from deltatune.train.tensorboard import open_tensorboard

TASKS = ("classification", "regression", "text")
METRICS = {"classification": ("loss", "accuracy", "macro_f1"), "regression": ("loss", "mse"),
           "text": ("loss", "perplexity")}
MINIMISED = {"loss", "perplexity", "mse"}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; the training loop supports: {', '.join(TASKS)}")


def default_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "loss"


def check_metric(metric: str, task: str) -> None:
    if metric not in METRICS[task]:
        raise ConfigError(f"unknown metric {metric!r} for task {task!r}; available: {', '.join(METRICS[task])}")


def improved(value: float, best: float | None, metric: str) -> bool:
    """Strictly better than `best` (None = nothing yet); NaN never improves. `task/metric` names (multi-task)
    are judged by their metric."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric.rpartition("/")[2] in MINIMISED else value > best


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with `.logits`, or a tuple whose first item is them."""
    if isinstance(output, torch.Tensor):
        return output
    if (logits := getattr(output, "logits", None)) is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def units(labels: torch.Tensor, task: str) -> int:
    """How many terms `loss_sum` adds up: examples, or real next-token targets for causal LM.

    Ignored labels (-100, or NaN for regression) count for nothing, as in the loss."""
    if task == "text":
        return int((labels[:, 1:] != -100).sum())
    return int((~labels.isnan()).sum()) if labels.is_floating_point() else int((labels != -100).sum())


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Summed loss: cross-entropy, MSE on squeezed logits, or next-token CE (shifted, ignore_index=-100)."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels.long(), reduction="sum")
    if task == "regression":
        pred, target = logits.float().squeeze(-1), labels.to(torch.float).view(-1)
        kept = ~target.isnan()
        return F.mse_loss(pred.view(-1)[kept], target[kept], reduction="sum")
    logits, targets = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


class MetricState:
    """Accumulates one split's loss and predictions, batch by batch; `result()` gives the metrics dict."""

    def __init__(self, task: str):
        self.task = task
        self.loss = 0.0
        self.units = 0
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(loss_sum(logits, labels, self.task))
        self.units += units(labels, self.task)
        if self.task == "classification":
            self.preds.append(logits.argmax(-1).flatten())
            self.labels.append(labels.flatten())

    def add_loss(self, loss_sum: float, units: int) -> None:
        """Add a batch whose summed loss was computed without logits (chunked causal-LM loss)."""
        self.loss += loss_sum
        self.units += units

    def result(self) -> dict[str, float]:
        loss = self.loss / max(self.units, 1)
        if self.task == "regression":
            return {"loss": loss, "mse": loss}
        if self.task == "text":
            return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
        preds, labels = torch.cat(self.preds), torch.cat(self.labels)
        return {"loss": loss, "accuracy": float((preds == labels).float().mean()), "macro_f1": macro_f1(preds, labels)}


def macro_f1(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (as scikit-learn does)."""
    scores = []
    for c in torch.unique(torch.cat([preds, labels])):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


class MetricsLog:
    """`metrics.jsonl` (source of truth) and `metrics.csv`: one row per logged train step (every step by default)
    or evaluation; plus TensorBoard event files in `tensorboard/` when the package is installed.

    Row kinds: "baseline" (before training, step 0), "train", "eval" (validation during training), "final"
    (test split with the best delta). Files are appended to; `start(step)` on resume drops the rows written after
    the restored step (they are written again), so the curves have no duplicates.
    """

    BASE = ("kind", "split", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed")

    def __init__(self, out_dir: Path, metrics: Sequence[str]):
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.columns = [*self.BASE, *(m for m in metrics if m not in self.BASE)]
        self.tensorboard_dir, self.tensorboard = out_dir / "tensorboard", None  # event files too, if installed

    def start(self, resume_step: int | None) -> None:
        """Fresh files (None), or keep the rows up to `resume_step` of an interrupted run."""
        rows = []
        if resume_step is not None and self.jsonl.exists():
            rows = [r for r in _read_rows(self.jsonl) if r["step"] <= resume_step and r["kind"] != "final"]
        storage.write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        with storage.atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = open_tensorboard(self.tensorboard_dir, resume_step)

    def write(self, row: dict[str, Any]) -> None:
        """Append `row`; a full disk is one clear error (a row cut short is dropped and rewritten on resume)."""
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, self.columns, restval="", extrasaction="ignore").writerow(row)
        except OSError as exc:
            if exc.errno not in storage.DISK_FULL:
                raise
            raise DeltaTuneError(f"no space left on device for the metrics log in {self.jsonl.parent}: the last "
                                 "checkpoint is unchanged; free some space and continue with --resume") from exc
        if self.tensorboard is not None:
            self.tensorboard.write(row)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short (the process was killed while appending it) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise CheckpointError(f"{path}:{n}: not a JSON row; the metrics log is damaged") from None
    return rows
