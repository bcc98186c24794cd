"""GaLore-AdamW (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Every targeted 2-D weight W (m x n) keeps its Adam moments in a rank-r subspace of its gradient G: a basis P from
the SVD of G (refreshed every `update_proj_gap` steps) projects G to r x n (`left`: P = U[:, :r], R = P^T G) or
m x r (`right`: P = Vh[:r], R = G P^T); `std` projects the smaller side, as the reference does (`right` when
m >= n). Adam runs on R, and its normalised update is projected back and scaled: W -= lr * scale * P N.
Every other tensor of the optimizer (embeddings, norms, biases, the head by default) is stepped by torch's own
AdamW code, so it follows `torch.optim.AdamW` exactly. The projected Adam uses torch's formulas too, which differ
from the reference galore-torch in two details: eps is added to sqrt(v / bias_correction2) (the reference:
to sqrt(v), with the bias corrections folded into the step size), and decoupled weight decay is applied before the
update (the reference: after). tests/test_galore.py checks the trajectory against the reference.

`galore_adamw8bit` stores the moments in 8 bits, block-wise (`quant.py`): the projected moments, and, as in the
reference `GaLoreAdamW8bit` (bitsandbytes' 8-bit AdamW underneath), the moments of every other tensor with at
least `MIN_8BIT_SIZE` elements; smaller tensors keep 32-bit AdamW.

`per_layer: true` updates each tensor inside a post-accumulate-grad hook, as soon as its gradient is complete,
and frees the gradient, so the gradients of all layers never exist at once. `step()` is then a no-op for those
tensors. Consequences for a training loop (`check_train_settings` refuses the impossible ones):
  * no gradient clipping: the global norm is unknown until every tensor has already been updated;
  * no gradient accumulation: every backward pass updates (a second backward before `step()` raises);
  * the gradients are gone after `backward()`: read the norm from `optimizer.grad_norm()` (the training loop does,
    through optim/step.py's OptimizerStep). A tensor with a non-finite gradient is not updated, and `grad_norm()`
    is then non-finite, so the loop can stop.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.optim.adam import adam
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ConfigError
from deltatune.optim import quant
from deltatune.schema import MAX_COUNT, MAX_SCALE, MAX_WIDTH, Schema
from deltatune.targeting import find_modules

if TYPE_CHECKING:
    from deltatune.optim import OptimizerConfig

LINEAR_TYPES = (nn.Linear, Conv1D)  # what "all-linear" means (as for LoRA); named targets may also pick Embedding
NAMED_TYPES = (nn.Linear, Conv1D, nn.Embedding)
MIN_8BIT_SIZE = 4096  # as bitsandbytes: smaller tensors keep 32-bit moments in the 8-bit optimizer
GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")  # a parameter group with these is a GaLore group


class GaLoreConfig(Schema):
    """GaLore settings, under `optimizer.galore` (used when `optimizer.name` is galore_adamw or galore_adamw8bit)."""

    section = "optimizer.galore"

    rank: int = Field(128, gt=0, le=MAX_WIDTH,
                      description="rank of the projection (clipped to the smaller side of a matrix)")
    update_proj_gap: int = Field(200, gt=0, le=MAX_COUNT,
                                 description="recompute the projection from the gradient every N steps")
    scale: float = Field(0.25, gt=0, le=MAX_SCALE, description="multiplier of the projected-back update")
    proj_type: Literal["std", "left", "right"] = Field("std", description="std: project the smaller side")
    targets: list[str] = Field(["all-linear"], min_length=1,
                               description="weights to project (targeting patterns; 'all-linear' skips the head; "
                                           "Embedding modules by name, e.g. 'wte')")
    per_layer: bool = Field(False, description="update each tensor in its gradient hook (no clipping, no grad_accum)")

    @field_validator("targets", mode="before")
    @classmethod
    def _one_target(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


def check_train_settings(cfg: OptimizerConfig, *, grad_accum: int, max_grad_norm: float | None,
                         world_size: int = 1) -> None:
    """Refuse training settings that per-layer GaLore cannot honour (the loop should call this before training)."""
    if cfg.galore is None or not cfg.galore.per_layer:
        return
    problems = []
    if world_size > 1:
        problems.append(f"{world_size} processes: each one would update before the gradients are averaged "
                        "across processes; train in one process")
    if grad_accum > 1:
        problems.append(f"train.grad_accum={grad_accum}: each backward pass already updates the weights; "
                        "set grad_accum: 1 (use a bigger batch_size instead)")
    if max_grad_norm is not None:
        problems.append(f"train.max_grad_norm={max_grad_norm}: the weights are updated before the global gradient "
                        "norm is known, so nothing can be clipped; set max_grad_norm: null")
    if problems:
        raise ConfigError("optimizer.galore.per_layer=true cannot work with " + "; and ".join(problems)
                          + " (or set per_layer: false)")


def target_weights(model: nn.Module, trainable: Iterable[nn.Parameter], cfg: GaLoreConfig) -> set[int]:
    """ids of the trainable 2-D weights of the modules `cfg.targets` selects."""
    found: dict[str, nn.Module] = {}
    for targets, types in (([t for t in cfg.targets if t == "all-linear"], LINEAR_TYPES),
                           ([t for t in cfg.targets if t != "all-linear"], NAMED_TYPES)):
        if targets:
            found.update(find_modules(model, targets, types))
    weights = {id(m.weight) for m in found.values()}
    chosen = {id(p) for p in trainable if id(p) in weights}
    if not chosen:
        raise ConfigError(f"optimizer.galore.targets {cfg.targets} select {len(found)} module(s), but none of their "
                          "weights is trained: GaLore projects the gradients of full weights, so use it with the "
                          "`full` method (and do not freeze the targeted modules)")
    return chosen


def group_settings(cfg: GaLoreConfig) -> dict[str, Any]:
    """The keys that make a parameter group a GaLore group."""
    return {"rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale, "proj_type": cfg.proj_type}


def build(param_groups: list[dict[str, Any]], cfg: OptimizerConfig) -> GaLoreAdamW:
    kind = GaLoreAdamW8bit if cfg.name == "galore_adamw8bit" else GaLoreAdamW
    return kind(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                per_layer=cfg.galore.per_layer)


# ---- projection ------------------------------------------------------------------------------------------------
def projection_side(shape: torch.Size, proj_type: str) -> str:
    """'left' (P^T G: rows reduced) or 'right' (G P^T: columns reduced); std reduces the smaller side."""
    if proj_type == "std":
        return "right" if shape[0] >= shape[1] else "left"
    return proj_type


def orthonormal_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-`rank` left (m x r) or right (r x n) singular vectors of `grad`: orthonormal columns / rows."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = u[:, :rank] if side == "left" else vh[:rank]
    return basis.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis.T @ grad if side == "left" else grad @ basis.T


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis @ low if side == "left" else low @ basis


# ---- Adam moments: full precision or 8-bit (strategies) ------------------------------------------------------
def adam_direction(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta1: float, beta2: float, eps: float,
                   step: int) -> torch.Tensor:
    """Update the moments in place; return m / (sqrt(v / bias_correction2) + eps), as torch's AdamW computes it
    (the caller scales by lr / bias_correction1)."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return m / (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)


class FullMoments:
    """Moments stored like the gradient they follow (same shape and dtype)."""

    def direction(self, state: dict[str, Any], g: torch.Tensor, beta1: float, beta2: float, eps: float,
                  step: int) -> torch.Tensor:
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], g, beta1, beta2, eps, step)


class Moments8bit:
    """Moments stored block-wise in 8 bits (signed code for m, unsigned for v), updated chunk by chunk so the
    float32 copies never exceed `chunk` elements."""

    chunk = 1 << 20  # a multiple of quant.BLOCK

    def direction(self, state: dict[str, Any], g: torch.Tensor, beta1: float, beta2: float, eps: float,
                  step: int) -> torch.Tensor:
        if "exp_avg_codes" not in state:
            state["exp_avg_codes"], state["exp_avg_absmax"] = quant.zeros(g.numel(), True, g.device)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quant.zeros(g.numel(), False, g.device)
        flat, out = g.reshape(-1), torch.empty(g.numel(), dtype=g.dtype, device=g.device)
        for start in range(0, flat.numel(), self.chunk):
            part = slice(start, start + self.chunk)
            blocks = slice(start // quant.BLOCK, quant.num_blocks(min(flat.numel(), start + self.chunk)))
            m = quant.dequantize(state["exp_avg_codes"][part], state["exp_avg_absmax"][blocks], signed=True)
            v = quant.dequantize(state["exp_avg_sq_codes"][part], state["exp_avg_sq_absmax"][blocks], signed=False)
            out[part] = adam_direction(m, v, flat[part].float(), beta1, beta2, eps, step)
            quant.quantize_into(m, state["exp_avg_codes"][part], state["exp_avg_absmax"][blocks], signed=True)
            quant.quantize_into(v, state["exp_avg_sq_codes"][part], state["exp_avg_sq_absmax"][blocks], signed=False)
        return out.view_as(g)


# ---- the optimizer ---------------------------------------------------------------------------------------------
class GaLoreAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups with GaLore keys (rank, update_proj_gap, scale, proj_type) are projected.

        GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 128, "update_proj_gap": 200,
                     "scale": 0.25, "proj_type": "std"}], lr=1e-3, weight_decay=0.0)

    The state of a projected tensor is {"step": int, "side": str, "basis": P, moments...}, tensors and plain
    values only, so it round-trips through state_dict() / load_state_dict() (and safetensors + JSON) exactly.
    """

    moments: FullMoments | Moments8bit = FullMoments()

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, per_layer: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        for group in self.param_groups:
            if "rank" in group and (missing := [k for k in GROUP_KEYS if k not in group]):
                raise ConfigError(f"GaLore parameter group {group.get('name', '')!r} lacks {missing}")
        self.per_layer = per_layer
        self._hooks: list[Any] = []
        self._updated: set[int] = set()  # tensors updated by their hook since the last step()
        self._grad_sq = 0.0
        if per_layer:
            self._register_hooks()

    # -- stepping
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._hooks:  # per-layer mode: the hooks did the updates and freed the gradients
            for group in self.param_groups:
                self._update(group, [p for p in group["params"] if p.grad is not None])
        self._updated.clear()
        self._grad_sq = 0.0
        return loss

    def _update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        own = [p for p in params if self._is_own(p, group)]
        for p in own:
            self._own_update(p, group)
        if rest := [p for p in params if not self._is_own(p, group)]:
            self._torch_adamw(group, rest)

    def _is_own(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Stepped by this class (projected, or 8-bit moments) rather than by torch's AdamW code."""
        return "rank" in group or (isinstance(self.moments, Moments8bit) and p.numel() >= MIN_8BIT_SIZE)

    def _own_update(self, p: nn.Parameter, group: dict[str, Any]) -> None:
        state, grad = self.state[p], p.grad
        galore = "rank" in group
        if not state:
            state["step"] = 0
            if galore:
                state["side"] = projection_side(p.shape, group["proj_type"])
        if galore and ("basis" not in state or state["step"] % group["update_proj_gap"] == 0):
            state["basis"] = orthonormal_basis(grad, group["rank"], state["side"])
        g = project(grad, state["basis"], state["side"]) if galore else grad
        state["step"] += 1
        beta1, beta2 = group["betas"]
        direction = self.moments.direction(state, g, beta1, beta2, group["eps"], state["step"])
        if galore:
            direction = project_back(direction, state["basis"], state["side"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"] * group.get("scale", 1.0) / (1 - beta1 ** state["step"]))

    def _torch_adamw(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        """torch.optim.AdamW's own step (state init and functional kernel) for `params` of `group`."""
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
        has_complex = self._init_group({**group, "params": params}, *lists)
        beta1, beta2 = group["betas"]
        adam(*lists, amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
             foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
             fused=group["fused"], decoupled_weight_decay=True)

    # -- per-layer mode
    def _register_hooks(self) -> None:
        ref = weakref.ref(self)  # the hooks must not keep a discarded optimizer alive (and stepping)
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_hook, ref, index)))
        weakref.finalize(self, _remove, list(self._hooks))  # and a discarded optimizer leaves no hooks behind

    @torch.no_grad()
    def _update_in_backward(self, p: nn.Parameter, index: int) -> None:
        if id(p) in self._updated:
            raise ConfigError("per-layer GaLore got a second backward pass before optimizer.step(): gradient "
                              "accumulation is not possible when every backward updates the weights; "
                              "set train.grad_accum: 1 (or optimizer.galore.per_layer: false)")
        self._updated.add(id(p))
        norm_sq = float(p.grad.float().square().sum())
        self._grad_sq += norm_sq
        if math.isfinite(norm_sq):  # never step into NaN weights; grad_norm() tells the loop
            self._update(self.param_groups[index], [p])
        p.grad = None

    def grad_norm(self) -> float:
        """Per-layer mode: the global norm of the gradients the hooks consumed since the last step()."""
        return math.sqrt(self._grad_sq)

    def remove_hooks(self) -> None:
        """Per-layer mode: detach the gradient hooks; step() then updates from the gradients as usual."""
        _remove(self._hooks)
        self._hooks.clear()

    # -- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that this class's own states keep their saved dtypes (uint8 codes, float32 absmax)
        instead of being cast to the parameter's dtype."""
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, (group, p) in zip(saved, ((g, p) for g in self.param_groups for p in g["params"])):
            if index in state_dict["state"] and self._is_own(p, group):
                self.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v
                                 for k, v in state_dict["state"][index].items()}


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with block-wise 8-bit moments (projected ones, and those of other tensors >= MIN_8BIT_SIZE)."""

    moments = Moments8bit()


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _hook(ref: weakref.ref, index: int, p: nn.Parameter) -> None:
    optimizer = ref()
    if optimizer is not None:
        optimizer._update_in_backward(p, index)
