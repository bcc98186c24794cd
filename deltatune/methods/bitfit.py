"""BitFit (Ben Zaken et al. 2022): train only the bias terms of a frozen model: all, or those of chosen modules.

A bias term is a parameter registered as `bias` (or `*_bias`, e.g. `in_proj_bias`) directly on a module: the
biases of linears and of LayerNorms, as in the paper. `targets` picks the modules whose own biases are trained
(targeting's pattern forms; every pattern must match a module holding one); the default is every module of the
model. The task head (`classifier`, `score`, `lm_head`, ...) is left out unless `include_head` is set: a new head
is trained whole by the `head` method (the paper trains the head too), so `[bitfit, head]` composes.

Biases are trained in place: attaching snapshots their values and `detach()` copies them back bit for bit, so
merging is a no-op. Models without biases (Llama, Mistral, Qwen linears; RMSNorm) are refused with a clear error,
unless `add_missing` is set: then every targeted `nn.Linear` without a bias gets a real, zero-initialised `bias`
parameter (outputs unchanged at attach). It is an ordinary Linear bias, so merging is a no-op for it too and a
merged model is plain modules; `detach()` removes it again. A merged model with added biases saved with
`save_pretrained` needs its config to allow them (e.g. Llama's `attention_bias` / `mlp_bias`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.arch import describe, short_name
from deltatune.delta import Delta, DeltaConfig, owned_tensors
from deltatune.errors import TargetError
from deltatune.registry import register
from deltatune.schema import NonEmptyPatterns, Patterns
from deltatune.targeting import DeltaModule, exact_pattern, find_modules, plain_modules


class BitFit(DeltaConfig):
    """BitFit settings: whose biases, the task head's or not, and adding biases where a Linear has none."""

    trains_base: ClassVar[bool] = True  # the base's own bias tensors (fp32 base; no quantized base)

    targets: NonEmptyPatterns | None = Field(None, description="modules whose biases are trained (name, dot-suffix, "
                                             "'re:...', 'type:...'); default: every module with a bias")
    layers: str | list[int] | None = Field(None, description="restrict to these layer indices, e.g. '0-3' or [0, -1]")
    exclude: Patterns = Field(default_factory=list, description="patterns of modules whose biases stay frozen")
    include_head: bool = Field(False, description="also train the task head's bias (usually the `head` method "
                                                  "trains the whole head)")
    add_missing: bool | Literal["auto"] = Field(
        "auto", description="give targeted nn.Linear layers without a bias a zero-initialised one; 'auto': only when "
                            "the model has no bias terms of its own (bias-free models such as Llama, T5)")


def is_bias(param_name: str) -> bool:
    return param_name == "bias" or param_name.endswith("_bias")


@register("bitfit")
class BitFitDelta(Delta[BitFit]):
    """BitFit: train only the bias terms (all, or those of chosen modules); optionally add missing ones; mergeable."""

    mergeable = True  # biases are trained in place (added ones are real Linear biases): merge is a no-op

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        self._heads = [] if cfg.include_head else describe(self.model).heads
        self._taken, self._add = owned_tensors(self.model), cfg.add_missing is True
        if cfg.add_missing == "auto":
            self._add = not any(self._slots(n, m) for n, m in plain_modules(self.model).items() if n)
        found = self._everything(cfg) if cfg.targets is None else self._targeted(cfg)
        existing: dict[int, nn.Parameter] = {}  # by id: a tied bias is one tensor
        added: dict[int, nn.Linear] = {}
        for name, module in found.items():
            for attr in self._slots(name, module):
                if (p := module._parameters[attr]) is None:
                    added[id(module)] = module
                else:
                    existing[id(p)] = p
        self.keep_values(existing.values())
        self._added = list(added.values())
        for linear in self._added:  # last: nothing after this can fail
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=w.device, dtype=w.dtype))
        return [*existing.values(), *(linear.bias for linear in self._added)]

    def restore(self) -> None:
        for linear in self._added:
            linear.bias = None
        self._added = []

    def switch_off(self) -> None:
        super().switch_off()
        self._added_biases = [linear.bias for linear in self._added]
        for linear in self._added:  # the base has no bias there
            linear.bias = None

    def switch_on(self) -> None:
        for linear, bias in zip(self._added, self._added_biases):
            linear.bias = bias
        super().switch_on()

    # ---- selection -----------------------------------------------------------------------------------------
    def _slots(self, name: str, module: nn.Module) -> list[str]:
        """Names of `module`'s own bias parameters to train (with add_missing, "bias" of a Linear that has none)."""
        if isinstance(module, DeltaModule) or any(name == h or name.startswith(h + ".") for h in self._heads):
            return []
        out = [attr for attr, p in module._parameters.items() if is_bias(attr) and p is not None
               and id(p) not in self._taken]
        if self._add and isinstance(module, nn.Linear) and module.bias is None:
            out.append("bias")
        return out

    def _everything(self, cfg: BitFit) -> dict[str, nn.Module]:
        """Every module with a bias slot, filtered by `layers` and `exclude` through targeting (one pattern)."""
        owners = [n for n, m in plain_modules(self.model).items() if n and self._slots(n, m)]
        if not owners:
            raise TargetError(self._nothing(f"{type(self.model).__name__} has no bias terms to train"))
        try:
            return find_modules(self.model, [exact_pattern(owners)], (nn.Module,),
                                cfg.layers, cfg.exclude)
        except TargetError:
            raise TargetError(f"no bias terms are left to train with layers={cfg.layers} and exclude={cfg.exclude}: "
                              f"{len(owners)} modules hold biases, e.g. {', '.join(owners[:3])}") from None

    def _targeted(self, cfg: BitFit) -> dict[str, nn.Module]:
        found = find_modules(self.model, cfg.targets or [], (nn.Module,), cfg.layers, cfg.exclude)
        owners = sorted({short_name(n) for n, m in plain_modules(self.model).items() if n and self._slots(n, m)})
        for pattern in cfg.targets or []:  # each pattern must reach a bias (before `exclude` removes some)
            hits = find_modules(self.model, [pattern], (nn.Module,), cfg.layers)
            if not any(self._slots(n, m) for n, m in hits.items()):
                raise TargetError(self._nothing(
                    f"target {pattern!r} matches {', '.join(list(hits)[:3])}{' ...' if len(hits) > 3 else ''} but "
                    f"none of them holds a bias term of its own; name the modules that do (Candidates: "
                    f"{', '.join(owners) or '(none)'})"))
        if not any(self._slots(n, m) for n, m in found.items()):
            raise TargetError(f"exclude={cfg.exclude} removes every module with a bias matched by {cfg.targets}")
        return found

    def _nothing(self, what: str) -> str:
        """`what` plus the way out that applies (add_missing, include_head, another delta owning the biases)."""
        hints = []
        if not self._add:
            hints.append("set add_missing: true (or leave it 'auto') to give its Linear layers zero-initialised "
                         "biases (bias-free architectures such as Llama), or use ia3 / lora instead")
        if self._heads and any(is_bias(n.rsplit(".", 1)[-1]) for h in self._heads
                               for n, _ in self.model.get_submodule(h).named_parameters()):
            hints.append("the task head's bias is left out: set include_head: true to train it")
        if self._taken:
            hints.append("biases already trained by another attached delta are not candidates")
        return what + (". " + "; ".join(hints) if hints else "")
