"""LoRA (Hu et al. 2021): a frozen weight W gets a trainable low-rank update, W + s·B·A, with B = 0 at start.

Variants are small strategy objects picked by the config, not flags spread through the code:
  * scaling  `SCALINGS`: s = alpha/r ("standard") or alpha/sqrt(r) ("rslora", Kalajdzievski 2023);
  * update   `Plain` or `DoRA` (Liu et al. 2024): W' = m · (W + s·BA) / ||W + s·BA|| per output unit,
             the norm detached from the graph as in the paper (section 4.3) and PEFT;
  * kind     how one module type stores its weight and applies A and B: `nn.Linear`, GPT-2's `Conv1D`
             (weight stored (in, out)), `nn.Conv2d` (A is a conv with the base's kernel, B a 1x1 conv), and
             `nn.Embedding` (A is looked up by token id, as in PEFT);
  * init     `INITS`, PEFT's `init_lora_weights` names: kaiming (PEFT's default) or gaussian A with B = 0, or
             PiSSA (Meng et al. 2024: the top-r singular triplets of W; pissa_niter_N: randomized SVD) and OLoRA
             (Buyukakyuz 2024: QR of W), which move s·B0·A0 out of the base weight into the branch. The base then
             holds the residual W - s·B0·A0 (the original is kept: detach restores it bit for bit), and the delta
             saves as the plain LoRA of rank 2r that gives the same weights on the *untouched* base, as PEFT's
             `path_initial_model_for_weight_conversion` does: W_res + s·BA = W + s·[B | -B0]·[A ; A0].
Tensor names follow PEFT's layout (`<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_magnitude_vector`)
so a PEFT export is a rename of prefixes (plus `lora_embedding_A/B` for embeddings).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.delta import Delta, DeltaConfig, exchange_storage
from deltatune.errors import ConfigError, TargetError
from deltatune.models.quantize import QuantizedLinear, quantized_layers
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
    init: str = Field("kaiming", description="kaiming (alias default: PEFT's default) | gaussian: random A, B = 0; "
                                             "pissa | pissa_niter_N (N power iterations of a fast randomized SVD) "
                                             "| olora: principal factors of W, residual in the base")

    @field_validator("init")
    @classmethod
    def _known_init(cls, init: str) -> str:
        init = "kaiming" if init == "default" else init
        if init not in INITS and not NITER.fullmatch(init):
            raise ValueError(f"unknown init {init!r}; choose kaiming (or default), gaussian, pissa, pissa_niter_N "
                             "(N = 0..999, e.g. pissa_niter_4) or olora")
        return init

    @model_validator(mode="after")
    def _saved_form_fits(self) -> LoRA:
        if init_of(self.init).changes_base and (self.r > MAX_WIDTH // 2 or self.alpha > MAX_SCALE / 2):
            raise ValueError(f"init {self.init} saves a plain LoRA of rank 2r and alpha 2·alpha: r must be at most "
                             f"{MAX_WIDTH // 2} and alpha at most {MAX_SCALE / 2:g}")
        return self

    def needs_dense_base(self) -> str | None:
        if init_of(self.init).changes_base:
            return f"init {self.init} writes the residual W - BA into the base weights, which cannot be quantized"
        return None


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
        n_in, n_out = self.sizes(base)  # a QuantizedLinear computes in compute_dtype (fp32 over bf16-held weights)
        like = dict(device=base.weight.device, dtype=getattr(base, "compute_dtype", base.weight.dtype))
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

    def add_scaled(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + s·B·A·x for Linear and Conv1D, whose x and out are (..., in) and (..., out) rows (`_LowRankUpdate`)."""
        rows = _LowRankUpdate.apply(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), m.lora_A.weight,
                                    m.lora_B.weight, m.scaling)
        return rows.view(out.shape)

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

    def add_scaled(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return _add_applied(self, m, x, out)

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

    def add_scaled(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return _add_applied(self, m, x, out)


class _LowRankUpdate(torch.autograd.Function):
    """out + s·(x·Aᵀ)·Bᵀ on rows, in the dtype of `out` (the base layer's, so also under autocast), with every
    rank-r matmul arranged so that r is the outer size, never the inner or the last one: a BLAS handles a
    (tokens × r) result poorly, e.g. MKL on AMD spends 4–6× the time on dy·B and dyᵀ·(x·Aᵀ) as on their transposes
    (bench/README.md). B's matmul, the scale and the sum are one addmm."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        x, a, b = (t.to(out.dtype) for t in (x, a, b))
        with torch.autocast(out.device.type, enabled=False):
            low_t = a @ x.T  # (r, tokens)
            result = torch.addmm(out, low_t.T, b.T, alpha=scale)
        ctx.save_for_backward(x, a, b, low_t)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, low_t = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            grad_low_t = (b.T @ grad.T).mul_(ctx.scale)  # (r, tokens)
            if ctx.needs_input_grad[1]:
                grad_x = grad_low_t.T @ a
            if ctx.needs_input_grad[2]:
                grad_a = grad_low_t @ x
            if ctx.needs_input_grad[3]:
                grad_b = (low_t @ grad).mul_(ctx.scale).T
        return grad, grad_x, grad_a, grad_b, None


def _add_applied(kind: LinearKind, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + s·apply(x): the plain sum, for kinds whose update is not one matmul on rows."""
    return out + kind.apply(m, x) * m.scaling


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


# ---- initialisations --------------------------------------------------------------------------------------
class RandomInit:
    """A kaiming-uniform (PEFT's default) or gaussian, B = 0 (embeddings: A = 0, B normal); the base is untouched."""

    changes_base = False

    def __init__(self, how: str):
        self.how = how

    def apply(self, m: LoRAModule) -> None:
        m.kind.init(m.lora_A, m.lora_B, self.how)


@dataclass
class Initial:
    """What a base-changing init moved: the base weight before it (restored on detach) and B0, A0."""

    weight: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    def made(self, a0: torch.Tensor, b0: torch.Tensor) -> bool:
        """Whether (A0, B0) are exactly this init's factors."""
        return torch.equal(a0, self.a.to(a0.dtype)) and torch.equal(b0, self.b.to(b0.dtype))


class ResidualInit:
    """B0·A0 from the base weight W (as (out, in), in fp32) into the branch; the base keeps W - s·B0·A0 (as PEFT)."""

    changes_base = True

    def factors(self, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) of `w`."""
        raise NotImplementedError

    def apply(self, m: LoRAModule) -> None:
        weight, kind = m.base_layer.weight, m.kind
        w = weight.detach().float()
        w = w.T if kind.out_axis else w  # Conv1D stores (in, out)
        a, b = self.factors(w, m.lora_A.weight.shape[0], m.scaling)
        m.lora_A.weight.copy_(a)
        m.lora_B.weight.copy_(b)
        m.initial = Initial(weight.detach().clone(), m.lora_A.weight.detach().clone(),
                            m.lora_B.weight.detach().clone())
        m.rebase(m.initial.a, m.initial.b)


class PiSSAInit(ResidualInit):
    """PiSSA: W = V·S·Uh; A0 = sqrt(S_r / s)·Uh_r, B0 = V_r·sqrt(S_r / s) (niter: torch.svd_lowrank, seeded RNG)."""

    def __init__(self, niter: int | None = None):
        self.niter = niter

    def factors(self, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.niter is None:
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            v, s, uh = v[:, :r], s[:r], uh[:r]
        else:
            v, s, u = torch.svd_lowrank(w, r, niter=self.niter)
            uh = u.T
        root = torch.sqrt(s / scaling)
        return root[:, None] * uh, v * root


class OLoRAInit(ResidualInit):
    """OLoRA: W = Q·R; A0 = R_r (first r rows), B0 = Q_r (first r columns); as in PEFT, not divided by s."""

    def factors(self, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()


INITS: dict[str, RandomInit | ResidualInit] = {"kaiming": RandomInit("kaiming"), "gaussian": RandomInit("gaussian"),
                                               "pissa": PiSSAInit(), "olora": OLoRAInit()}
NITER = re.compile(r"pissa_niter_(\d{1,3})")


def init_of(name: str) -> RandomInit | ResidualInit:
    """The strategy of a (validated) `LoRA.init` name."""
    niter = NITER.fullmatch(name)
    return PiSSAInit(int(niter.group(1))) if niter else INITS[name]


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
        return m.kind.add_scaled(m, x, out)

    def merged_weight(self, m: LoRAModule, weight: torch.Tensor) -> torch.Tensor:
        return weight + m.delta_weight().to(weight.dtype)


class DoRA:
    """m · (W + s·BA) / ||W + s·BA||, with m initialised to that norm, so nothing changes at start."""

    def setup(self, m: LoRAModule) -> None:
        with torch.no_grad():
            m.lora_magnitude_vector = nn.Parameter(self._norm(m))

    def _norm(self, m: LoRAModule) -> torch.Tensor:
        base = m.base_layer  # a quantized layer's weight is read dequantized (as PEFT does for QLoRA + DoRA)
        weight = base.dequantized_weight() if isinstance(base, QuantizedLinear) else base.weight
        return _out_norm(weight + m.delta_weight().detach().to(weight.dtype), m.kind.out_axis).detach()

    def forward(self, m: LoRAModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = m.kind.out_view(m.lora_magnitude_vector / self._norm(m))
        bias = getattr(m.base_layer, "bias", None)
        plain = out if bias is None else out - m.kind.out_view(bias)
        # out + (scale - 1)·Wx rather than scale·Wx + b: exactly `out` while m equals the norm (as in PEFT); the
        # update in fp32 (m trains fp32), added in the base output's dtype (a bf16 base's next layers expect it)
        return out + ((scale - 1) * plain + scale * m.kind.apply(m, x) * m.scaling).to(out.dtype)

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
        self.initial: Initial | None = None  # set by a base-changing init
        with torch.no_grad():
            init_of(config.init).apply(self)
        # dropout 0 means no module at all: the forward skips it instead of calling an identity
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 and kind.takes_dropout else None
        variant.setup(self)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the base weight's layout."""
        return self.kind.delta(self.lora_A, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.add_update(x, self.base_layer(x, *args, **kwargs))

    def add_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out`, the base layer's output for `x`, with this update applied (also to a subset of a batch's rows)."""
        lora_in = x if self.lora_dropout is None else self.lora_dropout(x)
        return self.variant.forward(self, lora_in, out)

    def rebase(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Base weight := the original weight - s·B0·A0 (computed in fp32, stored in the base's dtype)."""
        weight, initial = self.base_layer.weight, self.initial
        moved = self.scaling * (b0.float() @ a0.float())
        weight.copy_(initial.weight.float() - (moved.T if self.kind.out_axis else moved))
        initial.a, initial.b = a0.clone(), b0.clone()

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
        if init_of(cfg.init).changes_base:
            self._check_residual(cfg.init, found, kinds)
        self.wrappers: list[LoRAModule] = []
        try:
            for name, module in found.items():
                self.wrappers.append(LoRAModule(module, kinds[name], VARIANTS[cfg.dora](), cfg))
                self.swap(name, self.wrappers[-1])
        except BaseException:
            self.restore()  # base weights a residual init changed
            raise
        return [p for w in self.wrappers for n, p in w.named_parameters() if not n.startswith("base_layer.")]

    def _find(self, cfg: LoRA) -> dict[str, nn.Module]:
        """'all-linear' means Linear/Conv1D (never the task head; a CNN's Conv2d layers when it has none), as in PEFT;
        named patterns may also pick Conv2d/Embedding."""
        return find_modules(self.model, cfg.targets, tuple(KINDS), cfg.layers, cfg.exclude)

    def _check_residual(self, init: str, found: dict[str, nn.Module], kinds: dict[str, LinearKind]) -> None:
        """A base-changing init needs float Linear / Conv1D weights (bf16-held ones too) that no other module shares."""
        shared = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        quantized = set(quantized_layers(self.model))
        for name, module in found.items():
            if type(kinds[name]) not in (LinearKind, Conv1DKind) or name in quantized:
                raise TargetError(f"init {init} supports Linear and GPT-2 Conv1D layers with float weights; {name!r} "
                                  f"is a {type(module).__name__}: exclude it, or use init kaiming or gaussian")
            if shared[id(module.weight)] > 1:
                raise ConfigError(f"init {init} would change the weight of {name!r}, which another module shares "
                                  "(tied weights): exclude it, or use init kaiming or gaussian")

    def lr_roles(self) -> dict[str, str]:
        """LoRA+ as PEFT groups it: embedding factors "embedding"; B factors and DoRA magnitudes "B"; A keeps its LR."""
        names, roles = {id(p): n for n, p in self._params.items()}, {}
        for w in self.wrappers:
            embedding = isinstance(w.kind, EmbeddingKind)
            roles[names[id(w.lora_A.weight)]] = "embedding" if embedding else "A"
            roles[names[id(w.lora_B.weight)]] = "embedding" if embedding else "B"
            if isinstance(w.variant, DoRA):
                roles[names[id(w.lora_magnitude_vector)]] = "B"
        return roles

    def switch_off(self) -> None:
        """After PiSSA / OLoRA the base layers hold the residual: their original weights come back while off."""
        super().switch_off()
        self._exchange_residuals()

    def switch_on(self) -> None:
        self._exchange_residuals()
        super().switch_on()

    def _exchange_residuals(self) -> None:
        exchange_storage([(part.base_layer.weight, part.initial.weight) for part, _, _ in self._residual_parts()])

    def restore(self) -> None:
        with torch.no_grad():
            for wrapper, _, _ in self._residual_parts():
                wrapper.base_layer.weight.copy_(wrapper.initial.weight)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """After a base-changing init: [A ; A0] and [B | -B0], the plain LoRA of these weights on the original base."""
        tensors = super().saved_tensors()
        for wrapper, a, b in self._residual_parts():
            a0, b0 = (t.to(tensors[a].dtype) for t in (wrapper.initial.a, wrapper.initial.b))  # A, B may train fp32
            tensors[a], tensors[b] = torch.cat([tensors[a], a0]), torch.cat([tensors[b], -b0], dim=1)
        return tensors

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `saved_tensors`; saved A0, B0 that differ from this init's (e.g. another machine's SVD on resume)
        become the init, and the base residual is recomputed from them."""
        tensors = dict(tensors)
        for wrapper, a, b in self._residual_parts():
            r = wrapper.initial.a.shape[0]
            a0, b0 = tensors[a][r:], -tensors[b][:, r:]
            if not wrapper.initial.made(a0, b0):
                wrapper.rebase(a0, b0)
            tensors[a], tensors[b] = tensors[a][:r], tensors[b][:, :r]
        super().load_saved(tensors)

    def _residual_parts(self) -> list[tuple[LoRAModule, str, str]]:
        """(wrapper, name of its A, name of its B) of every wrapper whose init changed the base."""
        names = {id(p): n for n, p in self._params.items()}
        return [(w, names.get(id(w.lora_A.weight), ""), names.get(id(w.lora_B.weight), ""))
                for w in self.wrappers if w.initial is not None]

    def saved_config(self, directory: Path) -> LoRA:
        """After a base-changing init: the plain LoRA (rank 2r, same scale s) that `saved_tensors` writes."""
        cfg: LoRA = self.config  # type: ignore[assignment]
        if not init_of(cfg.init).changes_base:
            return cfg
        alpha = cfg.alpha * (2 if cfg.scaling == "standard" else math.sqrt(2))
        return cfg.model_copy(update={"r": 2 * cfg.r, "alpha": alpha, "init": "kaiming"})

    def merge_weights(self) -> None:
        self.fold_wrappers(self.wrappers)

    def unmerge_weights(self) -> None:
        self.unfold_wrappers(self.wrappers)
