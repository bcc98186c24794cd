"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small branch on a sublayer's output,
`out + up(f(down(out)))`, with the up-projection at zero so that attaching changes no output.

Where the branches go is a table, not code per model: `PLACEMENTS` maps a placement to `deltatune.arch` roles
  * houlsby   after the attention output projection and after the feed-forward output of every layer (two);
  * pfeiffer  after the feed-forward output only (one per layer, about half the parameters).
The wrapped module is the output projection itself (GPT-2 `attn.c_proj`/`mlp.c_proj`, Llama `o_proj`/`down_proj`,
BERT `attention.output.dense`/`output.dense`), so the adapter sees the projected sublayer output and its result
goes into the model's own residual add: "after the projection, before the skip connection" as in Houlsby.
BERT's dropout and LayerNorm(residual) come after the adapter (the adapter-transformers library applies the
sublayer dropout first; the difference is only where that dropout sits). `modules: [...]` names the wrapped
modules explicitly instead, for architectures `deltatune.arch` does not know. Nonlinear, so not mergeable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.arch import describe
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import TargetError
from deltatune.registry import register
from deltatune.schema import MAX_WIDTH, NonEmptyPatterns
from deltatune.targeting import WrapperModule, exact_pattern, find_modules

PLACEMENTS: dict[str, tuple[str, ...]] = {"houlsby": ("attention_output", "ffn_output"), "pfeiffer": ("ffn_output",)}
NONLINEARITIES: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                                                      "tanh": nn.Tanh}
DEFAULT_REDUCTION = 16


class Adapter(DeltaConfig):
    """Adapter settings: placement, bottleneck size, nonlinearity, which layers (or explicit modules)."""

    placement: Literal[tuple(PLACEMENTS)] = Field(  # type: ignore[valid-type]
        "pfeiffer", description="houlsby: after attention and FFN outputs; pfeiffer: after the FFN output only")
    reduction_factor: int | None = Field(None, ge=1, le=MAX_WIDTH, description="bottleneck size = hidden size // "
                                         "reduction_factor (16 when neither this nor bottleneck_size is given)")
    bottleneck_size: int | None = Field(None, gt=0, le=MAX_WIDTH,
                                        description="explicit bottleneck size (instead of the factor)")
    nonlinearity: Literal[tuple(NONLINEARITIES)] = Field(  # type: ignore[valid-type]
        "relu", description="activation between the down and up projections")
    layer_norm: bool = Field(False, description="a LayerNorm on the adapter input, before the down-projection "
                             "(helps where sublayer outputs are small, e.g. randomly initialised models)")
    layers: str | list[int] | None = Field(None, description="restrict to these layer indices, e.g. '0-3' or [0, -1]")
    modules: NonEmptyPatterns | None = Field(None, description="wrap these modules (name, dot-suffix, 're:...') "
                                             "instead of the placement's arch roles; needed for unknown models")

    @model_validator(mode="after")
    def _one_size(self) -> Adapter:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("give either bottleneck_size or reduction_factor, not both")
        return self

    def bottleneck(self, hidden: int) -> int:
        factor = self.reduction_factor or DEFAULT_REDUCTION
        size = self.bottleneck_size or hidden // factor
        if size < 1:
            raise TargetError(f"reduction_factor {factor} leaves no bottleneck for hidden size "
                              f"{hidden}; use a smaller factor or set bottleneck_size")
        return size


class Bottleneck(nn.Module):
    """up(f(down(x))), x optionally layer-normed first; `up` starts at zero, so the branch starts at 0."""

    def __init__(self, hidden: int, size: int, nonlinearity: str, layer_norm: bool, like: dict):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, **like) if layer_norm else None
        self.down = nn.Linear(hidden, size, **like)  # default (Kaiming-uniform) init, as LoRA's A
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(size, hidden, **like)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @classmethod
    def from_config(cls, cfg: Adapter, hidden: int, like: dict) -> Bottleneck:
        return cls(hidden, cfg.bottleneck(hidden), cfg.nonlinearity, cfg.layer_norm, like)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h if self.norm is None else self.norm(h))))


def on_output(out: torch.Tensor | tuple, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | tuple:
    """Apply `fn` to a module's output tensor (the first element when the module returns a tuple)."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


class AdapterModule(WrapperModule):
    """A frozen `base_layer` whose output h becomes h + adapter(h)."""

    owner_method = "adapter"

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple:
        return on_output(self.base_layer(x, *args, **kwargs), lambda h: h + self.adapter(h))


def adapter_sites(model: nn.Module, cfg: Adapter) -> dict[str, nn.Module]:
    """The modules whose outputs get an adapter: `cfg.modules`, or the placement's roles in every chosen layer."""
    if cfg.modules:
        return find_modules(model, cfg.modules, layers=cfg.layers)
    arch = describe(model)
    names = [name for role in PLACEMENTS[cfg.placement] for name in arch.layer_role(role)]
    if not names:
        raise TargetError(f"adapter places bottlenecks after the attention and feed-forward outputs of each layer, and "
                          f"{type(model).__name__} has no transformer layers with those that deltatune can find; name "
                          "the modules to wrap with `modules: [...]` (e.g. each block's output Linear), or use lora")
    return find_modules(model, [exact_pattern(names)], layers=cfg.layers)


def output_size(name: str, module: nn.Module) -> int:
    """Features of the module's output: a Linear's out_features, a Conv1D's nf, or those of its last Linear."""
    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        raise TargetError(f"cannot tell the output size of {name!r} ({type(module).__name__}): adapters wrap "
                          "modules whose output comes from a Linear layer; name such a module instead")
    last = linears[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.nf


def like(module: nn.Module) -> dict:
    """device/dtype of a module's first parameter, for new layers living next to it."""
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


@register("adapter")
class AdapterDelta(Delta[Adapter]):
    """Bottleneck adapters after attention/FFN outputs (Houlsby: both; Pfeiffer: FFN only); not mergeable."""

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        sites = adapter_sites(self.model, cfg)
        # every branch is built (and every size checked) before the model is changed
        branches = {name: Bottleneck.from_config(cfg, output_size(name, m), like(m)) for name, m in sites.items()}
        self.wrappers: dict[str, AdapterModule] = {}
        for name, module in sites.items():
            self.wrappers[name] = AdapterModule(module, branches[name])
            self.swap(name, self.wrappers[name])
        return [p for branch in branches.values() for p in branch.parameters()]
