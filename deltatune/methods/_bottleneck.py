"""Bottleneck branches: the plumbing shared by adapters (adapter.py) and AdapterFusion (fusion.py), which loads
trained adapters' branches frozen. Not a method: the registry skips `_` modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.delta import DeltaConfig
from deltatune.errors import TargetError

NONLINEARITIES: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                                                      "tanh": nn.Tanh}


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
    def from_config(cls, cfg: DeltaConfig, hidden: int, like: dict) -> Bottleneck:
        """From an `adapter` config (its bottleneck(hidden) size, nonlinearity, layer_norm)."""
        return cls(hidden, cfg.bottleneck(hidden), cfg.nonlinearity, cfg.layer_norm, like)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h if self.norm is None else self.norm(h))))


def on_output(out: torch.Tensor | tuple, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | tuple:
    """Apply `fn` to a module's output tensor (the first element when the module returns a tuple)."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


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
