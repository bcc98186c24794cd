"""Mixed-adapter batches: several saved LoRA deltas attached to one model at once, every row of a batch computed
with its own delta (as PEFT's `adapter_names=`), so prompts for different deltas generate together.

    mixed = attach_mixed(model, {"legal": "runs/legal/best", "chat": "runs/chat/best"})
    mixed.route(["chat", "legal", "chat"])      # the rows of the next batches
    out = model.generate(...)                    # row 0 and 2 with "chat", row 1 with "legal"
    mixed.detach()

Each delta loads as `deltatune.load` loads it (base fingerprint, checksum, keys and shapes checked); its LoRA
modules then sit side by side in a `RoutedLoRA` per targeted layer, which adds to each row only the update of that
row's delta (rows whose delta does not touch the layer get the base output). Only LoRA deltas (with rsLoRA or DoRA)
route per row; other methods change the model in ways a row cannot opt out of and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import ConfigError
from deltatune.methods.lora import LoRAModule
from deltatune.targeting import WrapperModule


class Routes:
    """The delta of every row of the current batch, shared by all routed layers of a model."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.rows: int | None = None  # batch size the routes were set for
        self.groups: list[tuple[str, torch.Tensor]] = []  # (delta name, its row indices)

    def set(self, rows: Sequence[str]) -> None:
        if unknown := sorted(set(rows) - set(self.names)):
            raise ConfigError(f"unknown adapter {unknown[0]!r}; the attached deltas are: {', '.join(self.names)}")
        self.rows = len(rows)
        self.groups = [(name, torch.tensor([i for i, r in enumerate(rows) if r == name]))
                       for name in self.names if name in rows]


class RoutedLoRA(WrapperModule):
    """A base layer and the LoRA modules of several deltas for it; each row of the input gets its delta's update."""

    owner_method = "mixed_lora"

    def __init__(self, base: nn.Module, adapters: dict[str, LoRAModule], routes: Routes):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleDict(adapters)
        self.routes = routes

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.routes.rows != x.shape[0]:
            raise ConfigError(f"this batch has {x.shape[0]} rows but adapters were routed for {self.routes.rows}: "
                              "call route() with one delta name per row before each batch")
        result = out.clone()
        for name, rows in self.routes.groups:
            if name in self.adapters:
                result[rows] = self.adapters[name].add_update(x[rows], out[rows])
        return result


class MixedConfig(DeltaConfig):
    """The names of the deltas attached side by side (not a registered method: built by `attach_mixed`)."""

    names: list[str] = Field(description="delta names, in the order given")


class MixedLoRA(Delta):
    """Several LoRA deltas on one model, routed per row by `route()`; detach restores the model bit for bit."""

    config_class = MixedConfig
    method = "mixed LoRA"

    def __init__(self, model: nn.Module, config: MixedConfig, adapters: dict[str, dict[str, LoRAModule]]):
        super().__init__(model, config)
        self.adapters = adapters  # delta name -> {layer name: its LoRA module}
        self.routes = Routes(config.names)

    def build(self) -> list[nn.Parameter]:
        layers = [name for name, _ in self.model.named_modules() if any(name in m for m in self.adapters.values())]
        for layer in layers:
            adapters = {delta: found[layer] for delta, found in self.adapters.items() if layer in found}
            base = next(iter(adapters.values())).base_layer
            self.swap(layer, RoutedLoRA(base, adapters, self.routes))
        return [p for found in self.adapters.values() for m in found.values()
                for n, p in m.named_parameters() if not n.startswith("base_layer.")]

    def route(self, rows: Sequence[str]) -> None:
        """The delta (by name) of each row of the batches that follow."""
        self.routes.set(rows)

    def save(self, directory: str | Path) -> Path:
        raise ConfigError("a mixed-adapter model is not saved as one delta; each delta keeps its own folder "
                          "(merge-deltas combines LoRA deltas into one)")


def attach_mixed(model: nn.Module, deltas: Mapping[str, str | Path]) -> MixedLoRA:
    """Attach the saved LoRA deltas `deltas` (name -> folder) side by side for per-row routing."""
    if len(deltas) < 2:
        raise ConfigError("mixed-adapter routing needs at least two deltas")
    adapters = {name: _lora_modules(model, Path(folder), name) for name, folder in deltas.items()}
    return MixedLoRA(model, MixedConfig(names=list(deltas)), adapters).attach()  # type: ignore[return-value]


def _lora_modules(model: nn.Module, folder: Path, name: str) -> dict[str, LoRAModule]:
    """The LoRA modules of the delta in `folder`, loaded (with every check of `deltatune.load`) and detached again:
    they keep the loaded tensors and point at the model's own base layers."""
    import deltatune

    delta = deltatune.load(model, folder)
    try:
        methods = [part.method for part in delta.parts()]
        if methods != ["lora"]:
            raise ConfigError(f"adapter {name!r} ({folder}) holds {' + '.join(methods)}: mixed batches route LoRA "
                              "deltas only (one LoRA per folder, no task head); generate with it alone")
        names = {id(module): n for n, module in model.named_modules()}
        return {names[id(w)]: w for w in delta.parts()[0].wrappers}  # type: ignore[attr-defined]
    finally:
        delta.detach()
