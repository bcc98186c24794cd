"""LR schedules: linear warmup, then linear decay to 0, cosine decay to 0, or constant."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.optim import OptimizerConfig


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base LR at `step` (0-based) of `total`, after `warmup` linear warmup steps."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"unknown schedule {kind!r}; allowed: linear, cosine, constant")


class Schedule:
    """The LR multiplier as a callable object (not a lambda), so LambdaLR.state_dict() saves its settings and a
    resumed run continues with exactly the saved warmup and total, even if the new run computed others."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        return lr_factor(self.kind, step, self.warmup, self.total)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR for `cfg.schedule` with linear warmup (`warmup_steps`, else ceil(warmup_ratio * total_steps))."""
    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    if warmup > total_steps:
        raise ConfigError(f"warmup_steps={warmup} is longer than the whole run ({total_steps} steps)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg.schedule, warmup, total_steps))
