"""Full fine-tuning: the delta is every parameter of the model except the frozen ones.

What to freeze is chosen by patterns (targeting's forms: exact name, dot-suffix, `re:` full match, `type:`; each
matched against module names and parameter names), by position in the layer stack (`freeze_first`, `train_last`)
and `freeze_embeddings`. "Embeddings" are the parameters registered before the layer stack (word, position and
type embeddings and their norm, or a CNN's stem), so the same options work on any `nn.Module` with a layer stack.

The weights are trained in place: attaching snapshots their values (and the model's buffers, e.g. BatchNorm
statistics), `detach()` copies the snapshot back bit for bit, and merging is a no-op. Only parameters are saved,
so a model whose buffers change in training (BatchNorm) does not reproduce its eval outputs from a saved delta.
A tensor shared by several modules (input embeddings tied to the LM head) is one parameter: it is trained,
counted and saved once (under its first name, `transformer.wte.weight`), and frozen if any of its names is frozen.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from deltatune.arch import describe
from deltatune.delta import Delta, DeltaConfig, owned_tensors
from deltatune.errors import TargetError
from deltatune.optim.groups import stack_depths
from deltatune.registry import register
from deltatune.safety import fullmatch
from deltatune.schema import MAX_WIDTH, Patterns
from deltatune.targeting import no_match_error, plain_modules


class Full(DeltaConfig):
    """Full fine-tuning settings: what stays frozen."""

    trains_base: ClassVar[bool] = True
    freeze: Patterns = Field(default_factory=list,
                             description="module or parameter patterns to keep frozen (name, dot-suffix, 're:...', "
                                         "'type:...'); each must match something")
    freeze_first: int = Field(0, ge=0, le=MAX_WIDTH,
                              description="freeze the embeddings and the first k layers of the stack")
    train_last: int | None = Field(None, ge=0, le=MAX_WIDTH,
                                   description="train only the last k layers and everything after "
                                               "the stack (final norm, head)")
    freeze_embeddings: bool = Field(False, description="freeze everything before the layer stack")


@register("full")
class FullDelta(Delta[Full]):
    """Full fine-tuning: train all parameters except frozen modules, embeddings or early layers."""

    mergeable = True  # the trained weights already live in the model: merge and unmerge are no-ops
    preserves_output = True
    fsdp = True

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        frozen: set[int] = set()
        for pattern in cfg.freeze:
            frozen |= self._matching(pattern)
        frozen |= self._frozen_by_position(cfg)
        others = owned_tensors(self.model)
        owned = [p for p in self.model.parameters() if id(p) not in frozen and id(p) not in others]
        # buffers too: BatchNorm running statistics change in train mode even where weights are frozen
        self.keep_values([*owned, *self.model.buffers()])
        return owned

    def _matching(self, pattern: str) -> set[int]:
        """ids of the parameters of every module, and of every parameter, whose name matches `pattern`."""
        hits = {id(p) for name, module in self.model.named_modules() if name and _matches(pattern, name, module)
                for p in module.parameters()}
        hits |= {id(p) for name, p in self.model.named_parameters(remove_duplicate=False)
                 if _matches(pattern, name, None)}
        if not hits:
            raise no_match_error(pattern, plain_modules(self.model), (nn.Module,), self.model)
        return hits

    def _frozen_by_position(self, cfg: Full) -> set[int]:
        if not (cfg.freeze_first or cfg.train_last is not None or cfg.freeze_embeddings):
            return set()
        arch = describe(self.model)
        count = len(arch.layers)
        if count == 0 and (cfg.freeze_first or cfg.train_last is not None):
            raise TargetError(f"freeze_first/train_last need a layer stack, and none was found in "
                              f"{type(self.model).__name__} (looked for a ModuleList of identical blocks); "
                              "freeze modules by name with `freeze: [...]` instead")
        for option, k in (("freeze_first", cfg.freeze_first), ("train_last", cfg.train_last or 0)):
            if k > count:
                raise TargetError(f"{option}={k} but the model has only {count} layers ({arch.layer_lists})")
        depths = stack_depths(self.model, arch)
        embeddings = {name for name, depth in depths.items() if depth < 0}
        if count == 0:  # no stack: the embeddings are the nn.Embedding modules
            embeddings = {f"{m}.{n}" if m else n for m, module in self.model.named_modules()
                          if isinstance(module, nn.Embedding) for n, _ in module.named_parameters()}
        if (cfg.freeze_embeddings or cfg.freeze_first) and not embeddings:
            raise TargetError(f"no embeddings found in {type(self.model).__name__}: nothing is registered before "
                              f"its layer stack {arch.layer_lists}")
        frozen = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            depth = depths[name]
            if (cfg.freeze_embeddings or cfg.freeze_first) and name in embeddings:
                frozen.add(id(p))
            if 0 <= depth < cfg.freeze_first:
                frozen.add(id(p))
            if cfg.train_last is not None and depth < count - cfg.train_last:
                frozen.add(id(p))
        return frozen


def _matches(pattern: str, name: str, module: nn.Module | None) -> bool:
    """Targeting's pattern forms for a module (module given) or a parameter name (module None)."""
    if pattern.startswith("re:"):
        return fullmatch(pattern[3:], name)
    if pattern.startswith("type:"):
        return module is not None and type(module).__name__ == pattern[5:]
    return name == pattern or name.endswith("." + pattern)
