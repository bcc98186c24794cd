"""Optimizers for a delta: parameter groups (weight decay, layer-wise and per-pattern LRs, head LR) and schedules.

    cfg = OptimizerConfig(lr=2e-5, weight_decay=0.01, layer_decay=0.8, head_lr=1e-3, warmup_ratio=0.1)
    optimizer = build_optimizer(model, delta, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=1000)

GaLore (full fine-tuning with low-rank optimizer states; see galore.py):

    cfg = OptimizerConfig(name="galore_adamw", lr=1e-3, galore={"rank": 128, "update_proj_gap": 200})
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from deltatune.optim.galore import GaLoreConfig
from deltatune.schema import MAX_COUNT, MAX_LR, MAX_SCALE, Schema, nested

GALORE_NAMES = ("galore_adamw", "galore_adamw8bit")


class OptimizerConfig(Schema):
    """Optimizer, parameter groups and LR schedule. Unknown keys are rejected."""

    section = "optimizer"

    name: Literal["adamw", "sgd", "galore_adamw", "galore_adamw8bit"] = Field(
        "adamw", description="galore_*: GaLore low-rank gradient projection for full fine-tuning (8bit: 8-bit moments)")
    lr: float = Field(5e-4, gt=0, le=MAX_LR, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, le=MAX_SCALE, description="decoupled weight decay (not on `no_decay` names)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw only")
    eps: float = Field(1e-8, gt=0, le=1, description="adamw only")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    # Geometric layer-wise LR decay from the head down: layer i of L gets lr * decay**(L - i), the embeddings
    # (everything before the layer stack) lr * decay**(L + 1), everything after the stack (final norm, head) lr.
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay from the head down")
    head_lr: float | None = Field(None, gt=0, le=MAX_LR, description="LR of deltas with role 'head' (new task heads)")
    # Parameter-name regex (re.search) -> LR; the first matching pattern wins, and it wins over head_lr/layer_decay.
    lr_groups: dict[str, Annotated[float, Field(gt=0, le=MAX_LR)]] = Field(
        {}, description="parameter-name regex -> learning rate")
    no_decay: list[str] = Field(["bias", "LayerNorm.weight", "norm.weight", "ln_"],
                                description="name substrings without weight decay")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the steps with a rising LR")
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT, description="overrides warmup_ratio")
    galore: GaLoreConfig | None = Field(
        None, description="galore_adamw / galore_adamw8bit only; their default when left out")

    _galore_schema = nested("galore", GaLoreConfig)

    @model_validator(mode="after")
    def _galore_needs_galore_optimizer(self) -> OptimizerConfig:
        if self.name in GALORE_NAMES and self.galore is None:
            self.galore = GaLoreConfig()
        elif self.name not in GALORE_NAMES and self.galore is not None:
            raise ValueError(f"galore settings are given, but name is {self.name!r}; "
                             f"use name: {' or '.join(GALORE_NAMES)}, or remove galore")
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        return betas

    @field_validator("lr_groups")
    @classmethod
    def _patterns_compile(cls, groups: dict[str, float]) -> dict[str, float]:
        for pattern, lr in groups.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"lr_groups pattern {pattern!r} is not a valid regex: {exc}") from None
            if lr <= 0:
                raise ValueError(f"lr_groups[{pattern!r}] must be > 0, got {lr}")
        return groups


from deltatune.optim.galore import GaLoreAdamW, GaLoreAdamW8bit, check_train_settings  # noqa: E402
from deltatune.optim.groups import build_optimizer, describe_groups, stack_depths  # noqa: E402
from deltatune.optim.schedule import build_scheduler, lr_factor  # noqa: E402
from deltatune.optim.step import OptimizerStep, build_step  # noqa: E402

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreConfig", "OptimizerConfig", "OptimizerStep", "build_optimizer",
           "build_scheduler", "build_step", "check_train_settings", "describe_groups", "lr_factor", "stack_depths"]
