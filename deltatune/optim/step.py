"""The training loop's side of the optimizer: the same calls for every optimizer, whether it updates after the
backward passes (torch's AdamW / SGD, GaLore) or inside them (per-layer GaLore: galore.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from deltatune.optim.groups import build_optimizer
from deltatune.optim.schedule import build_scheduler

if TYPE_CHECKING:
    from deltatune.delta import DeltaBase
    from deltatune.optim import OptimizerConfig


class OptimizerStep:
    """An optimizer with its LR schedule, as the loop uses them once per step:

        norm = updates.grad_norm(clip)   # after the step's backward passes
        updates.step()                   # update, advance the schedule, drop the gradients
        ...
        updates.close()                  # after training: no later backward pass may update

    `in_backward`: the optimizer updated every tensor inside backward (in its gradient hooks) and freed the
    gradients, so there is nothing left to clip and it knows the norm itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.in_backward = bool(getattr(optimizer, "per_layer", False))

    @property
    def lr(self) -> float:
        """The learning rate of the step about to be taken (first parameter group)."""
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self, clip: Callable[[], float]) -> float:
        """The step's global gradient norm: `clip()` (which clips the gradients and returns their norm), or the
        norm of the gradients the optimizer consumed in backward."""
        return self.optimizer.grad_norm() if self.in_backward else clip()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def restore_schedule(self, state: dict[str, Any], total_steps: int) -> None:
        """Load a checkpoint's schedule state and give it the run's (possibly new) length, warmup unchanged; set the
        LRs of the current step."""
        self.scheduler.load_state_dict(state)
        for schedule in {id(f): f for f in self.scheduler.lr_lambdas}.values():
            schedule.total = total_steps
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)

    def close(self) -> None:
        """End of training: an optimizer that updates in backward takes its gradient hooks off the model."""
        if self.in_backward:
            self.optimizer.remove_hooks()


def build_step(model: nn.Module, delta: DeltaBase, cfg: OptimizerConfig, total_steps: int) -> OptimizerStep:
    """The optimizer of `cfg` for `delta`'s tensors, with its schedule over `total_steps`."""
    optimizer = build_optimizer(model, delta, cfg)
    return OptimizerStep(optimizer, build_scheduler(optimizer, cfg, total_steps))
