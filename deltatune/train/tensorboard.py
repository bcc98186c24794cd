"""TensorBoard event files next to `metrics.jsonl`/`.csv`, written when the optional `tensorboard` package is
installed (`pip install deltatune[tensorboard]`): `tensorboard --logdir RUN/tensorboard`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SKIPPED = ("kind", "split", "step", "epoch", "elapsed")  # bookkeeping, not curves


class TensorBoardLog:
    """Every metrics row as scalars `<group>/<name>` at its step; group = train, validation or test."""

    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, row: dict[str, Any]) -> None:
        group = row.get("split") or row["kind"]  # a baseline row is step 0 of its split's curve
        for name, value in row.items():
            if name not in SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, row["step"])
        self.writer.flush()  # on disk at once: an interrupted run keeps its curves


def open_tensorboard(log_dir: Path, resume_step: int | None) -> TensorBoardLog | None:
    """A writer into `log_dir` (events after `resume_step` dropped, as they are written again), or None without
    the tensorboard package."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    return TensorBoardLog(log_dir, None if resume_step is None else resume_step + 1)
