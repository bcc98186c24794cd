"""LoRA (Hu et al. 2021): a frozen weight W gets a trainable low-rank update, W + s·B·A, with B = 0 at start.

Variants are small strategy objects picked by the config, not flags spread through the code:
  * scaling  `SCALINGS`: s = alpha/r ("standard") or alpha/sqrt(r) ("rslora", Kalajdzievski 2023);
  * update   `Plain` or `DoRA` (Liu et al. 2024): W' = m · (W + s·BA) / ||W + s·BA|| per output unit,
             the norm detached from the graph as in the paper (section 4.3) and PEFT;
  * kind     how one module type stores its weight and applies A and B: `nn.Linear`, GPT-2's `Conv1D`
             (weight stored (in, out)), `nn.Conv2d` (A is a conv with the base's kernel, B a 1x1 conv), and
             `nn.Embedding` (A is looked up by token id, as in PEFT).
Tensor names follow PEFT's layout (`<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_magnitude_vector`)
so a PEFT export is a rename of prefixes (plus `lora_embedding_A/B` for embeddings).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import TargetError
from deltatune.registry import register
from deltatune.schema import MAX_SCALE, MAX_WIDTH, NonEmptyPatterns, Patterns
from deltatune.targeting import MergeableWrapper, find_modules


class LoRA(DeltaConfig):
    """LoRA settings: rank, scaling, which modules, and the rsLoRA / DoRA variants."""

    r: int = Field(8, gt=0, le=MAX_WIDTH, description="rank of the update B·A")
    alpha: float = Field(16.0, gt=0, le=MAX_SCALE,
                         description="scale numerator: s = alpha/r (or alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    targets: NonEmptyPatterns = Field(default_factory=lambda: ["all-linear"], description="module patterns (name, "
                                      "dot-suffix, 're:...', 'type:...', 'all-linear')")
    layers: str | list[int] | None = Field(None, description="restrict to these layer indices, e.g. '0-3' or [0, -1]")
    exclude: Patterns = Field(default_factory=list, description="patterns of modules to leave alone")
    scaling: Literal["standard", "rslora"] = Field("standard", description="alpha / r (standard) or "
                                                                           "alpha / sqrt(r) (rsLoRA)")
    dora: bool = Field(False, description="weight-decomposed LoRA (learned magnitude per output unit)")
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description="init of A (B starts at zero either way)")


SCALINGS: dict[str, Callable[[float, int], float]] = {
    "standard": lambda alpha, r: alpha / r,
    "rslora": lambda alpha, r: alpha / math.sqrt(r),
}


# ---- kinds: how each module type holds its weight and applies A, B ------------------------------------------
class LinearKind:
    """nn.Linear: weight (out, in); A = Linear(in, r), B = Linear(r, out)."""

    out_axis = 0  # axis of the base weight that indexes output units (DoRA norms, merge broadcasting)
    takes_dropout = True

    def sizes(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def make(self, base: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        n_in, n_out = self.sizes(base)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        return nn.Linear(n_in, r, bias=False, **like), nn.Linear(r, n_out, bias=False, **like)

    def init(self, a: nn.Module, b: nn.Module, how: str) -> None:
        if how == "gaussian":
            nn.init.normal_(a.weight, std=1 / a.weight.shape[0])
        else:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)

    def delta(self, a: nn.Module, b: nn.Module) -> torch.Tensor:
        """B·A laid out like the base weight."""
        return b.weight @ a.weight

    def apply(self, m: LoRAModule, x: torch.Tensor) -> torch.Tensor:
        return m.lora_B(m.lora_A(x))

    def out_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-unit vector shaped to broadcast against the module's output."""
        return v


class Conv1DKind(LinearKind):
    """GPT-2 Conv1D: weight stored transposed, (in, out)."""

    out_axis = 1

    def sizes(self, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    def delta(self, a: nn.Module, b: nn.Module) -> torch.Tensor:
        return (b.weight @ a.weight).T


class Conv2dKind(LinearKind):
    """nn.Conv2d: A = conv with the base's kernel/stride/padding/dilation into r channels, B = 1x1 conv to out."""

    def make(self, base: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        a = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, padding_mode=base.padding_mode, **like)
        return a, nn.Conv2d(r, base.out_channels, 1, bias=False, **like)

    def delta(self, a: nn.Module, b: nn.Module) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", b.weight[:, :, 0, 0], a.weight)

    def out_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, 1, 1)  # (C, H, W) or (N, C, H, W) output


class EmbeddingKind(LinearKind):
    """nn.Embedding: A (r, num_embeddings) is looked up by id, B is (embedding_dim, r); init A = 0, B ~ N(0, 1)."""

    out_axis = 1
    takes_dropout = False  # the input is token ids

    def sizes(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def init(self, a: nn.Module, b: nn.Module, how: str) -> None:
        nn.init.zeros_(a.weight)
        nn.init.normal_(b.weight)

    def delta(self, a: nn.Module, b: nn.Module) -> torch.Tensor:
        return (b.weight @ a.weight).T

    def apply(self, m: LoRAModule, x: torch.Tensor) -> torch.Tensor:
        base = m.base_layer
        out = F.embedding(x, m.lora_A.weight.T, base.padding_idx, base.max_norm, base.norm_type,
                          base.scale_grad_by_freq, base.sparse) @ m.lora_B.weight.T
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale the update too
        return out if scale is None else out * scale.to(out.dtype)


KINDS: dict[type, LinearKind] = {Conv1D: Conv1DKind(), nn.Linear: LinearKind(), nn.Conv2d: Conv2dKind(),
                                 nn.Embedding: EmbeddingKind()}


def kind_of(name: str, module: nn.Module) -> LinearKind:
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise TargetError(f"module {name!r} is a grouped Conv2d (groups={module.groups}); LoRA supports "
                                  "groups=1 only: exclude it or target other modules")
            return kind
    raise TargetError(f"module {name!r} is a {type(module).__name__}; LoRA supports "
                      f"{', '.join(c.__name__ for c in KINDS)}")


# ---- update variants --------------------------------------------------------------------------------------
def _out_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """L2 norm of every output unit's slice of `weight` (DoRA's column norm)."""
    return weight.movedim(axis, 0).reshape(weight.shape[axis], -1).norm(dim=1)


def _weight_view(v: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return v.view(shape)


class Plain:
    """W + s·BA."""

    def setup(self, m: LoRAModule) -> None:
        pass

    def forward(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + m.kind.apply(m, x) * m.scaling

    def merged_weight(self, m: LoRAModule, weight: torch.Tensor) -> torch.Tensor:
        return weight + m.delta_weight().to(weight.dtype)


class DoRA:
    """m · (W + s·BA) / ||W + s·BA||, with m initialised to that norm, so nothing changes at start."""

    def setup(self, m: LoRAModule) -> None:
        with torch.no_grad():
            m.lora_magnitude_vector = nn.Parameter(self._norm(m))

    def _norm(self, m: LoRAModule) -> torch.Tensor:
        weight = m.base_layer.weight
        return _out_norm(weight + m.delta_weight().detach().to(weight.dtype), m.kind.out_axis).detach()

    def forward(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = m.kind.out_view(m.lora_magnitude_vector / self._norm(m))
        bias = getattr(m.base_layer, "bias", None)
        plain = out if bias is None else out - m.kind.out_view(bias)
        # out + (scale - 1)·Wx rather than scale·Wx + b: exactly `out` while m equals the norm (as in PEFT)
        return out + (scale - 1) * plain + scale * m.kind.apply(m, x) * m.scaling

    def merged_weight(self, m: LoRAModule, weight: torch.Tensor) -> torch.Tensor:
        scale = (m.lora_magnitude_vector / self._norm(m)).to(weight.dtype)
        return _weight_view(scale, weight, m.kind.out_axis) * Plain().merged_weight(m, weight)


VARIANTS: dict[bool, type] = {False: Plain, True: DoRA}  # keyed by LoRA.dora


class LoRAModule(MergeableWrapper):
    """A frozen `base_layer` plus a low-rank update (`lora_A`, `lora_B`), applied per its kind and variant."""

    owner_method = "lora"

    def __init__(self, base: nn.Module, kind: LinearKind, variant: Plain | DoRA, config: LoRA):
        super().__init__()
        self.base_layer = base
        self.kind, self.variant = kind, variant
        self.scaling = SCALINGS[config.scaling](config.alpha, config.r)
        self.lora_A, self.lora_B = kind.make(base, config.r)
        kind.init(self.lora_A, self.lora_B, config.init)
        # dropout 0 means no module at all: the forward skips it instead of calling an identity
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 and kind.takes_dropout else None
        variant.setup(self)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the base weight's layout."""
        return self.kind.delta(self.lora_A, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        lora_in = x if self.lora_dropout is None else self.lora_dropout(x)
        return self.variant.forward(self, lora_in, out)

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.variant.merged_weight(self, self.base_layer.weight)}

    def extra_repr(self) -> str:
        return (f"r={self.lora_A.weight.shape[0]}, scaling={self.scaling:g}, "
                f"variant={type(self.variant).__name__}")


@register("lora")
class LoRADelta(Delta[LoRA]):
    """Low-rank updates B·A added to chosen linear/conv/embedding weights (LoRA, rsLoRA, DoRA); mergeable."""

    mergeable = True
    peft_type = "LORA"

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        found = self._find(cfg)
        kinds = {name: kind_of(name, module) for name, module in found.items()}  # check all before changing any
        self.wrappers: list[LoRAModule] = []
        for name, module in found.items():
            wrapper = LoRAModule(module, kinds[name], VARIANTS[cfg.dora](), cfg)
            self.swap(name, wrapper)
            self.wrappers.append(wrapper)
        return [p for w in self.wrappers for n, p in w.named_parameters() if not n.startswith("base_layer.")]

    def _find(self, cfg: LoRA) -> dict[str, nn.Module]:
        """'all-linear' means Linear/Conv1D (never the task head; a CNN's Conv2d layers when it has none), as in PEFT;
        named patterns may also pick Conv2d/Embedding."""
        return find_modules(self.model, cfg.targets, tuple(KINDS), cfg.layers, cfg.exclude)

    def merge_weights(self) -> None:
        self.fold_wrappers(self.wrappers)

    def unmerge_weights(self) -> None:
        self.unfold_wrappers(self.wrappers)
