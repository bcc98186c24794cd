"""Choose modules of a model by name, suffix, regex, type, or layer index.

Pattern forms, in a `targets` list:
  "query"            exact name or dot-suffix (`...attention.self.query`)
  "attn.c_proj"      dot-suffix with several parts
  "re:.*\\.(q|v)_proj" regular expression, full match on the module name
  "type:Conv2d"      every module of that class name
  "all-linear"       every Linear / GPT-2 Conv1D of a supported type except the task heads; in a model without
                     any (a CNN), its convolutions of a supported type instead
Every pattern must match at least one module; otherwise a TargetError lists the candidates.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from deltatune.arch import LINEAR, describe, short_name
from deltatune.errors import TargetError
from deltatune.safety import fullmatch

LayerSpec = Union[str, Sequence[int], None]
ALL_LINEAR = "all-linear"


class DeltaModule(nn.Module):
    """Marker base for modules a delta injects; targeting never descends into them."""

    owner_method: str = "delta"


def _wrapped(attribute: str) -> property:
    return property(lambda self: getattr(self.base_layer, attribute), doc=f"the wrapped layer's `{attribute}`")


class WrapperModule(DeltaModule):
    """A DeltaModule around one `base_layer`. Model code reads attributes of the layer it calls (T5's FFN casts to
    `wo.weight.dtype`): these answer as the wrapped layer would. Only these are exposed, never a blanket proxy."""

    base_layer: nn.Module
    weight = _wrapped("weight")
    bias = _wrapped("bias")
    in_features = _wrapped("in_features")
    out_features = _wrapped("out_features")
    nf = _wrapped("nf")  # transformers' Conv1D output size
    in_channels = _wrapped("in_channels")
    out_channels = _wrapped("out_channels")
    num_embeddings = _wrapped("num_embeddings")
    embedding_dim = _wrapped("embedding_dim")


class MergeableWrapper(WrapperModule):
    """A wrapper whose effect folds into its base layer's own tensors: `merge()` writes `merged_tensors()` into them
    and keeps the originals, which `unmerge()` copies back bit for bit. Used through `Delta.fold_wrappers`."""

    _original: dict[str, torch.Tensor] | None = None

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The base layer's tensors (by attribute name, e.g. `weight`) with this wrapper folded in."""
        raise NotImplementedError

    def merge(self) -> None:
        merged = self.merged_tensors()
        self._original = {attr: getattr(self.base_layer, attr).detach().clone() for attr in merged}
        for attr, value in merged.items():
            getattr(self.base_layer, attr).copy_(value)

    def unmerge(self) -> None:
        for attr, value in (self._original or {}).items():
            getattr(self.base_layer, attr).copy_(value)
        self._original = None


def find_modules(
    model: nn.Module,
    targets: Sequence[str],
    types: tuple[type, ...] = (nn.Module,),
    layers: LayerSpec = None,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """Modules matched by `targets`, restricted to `types` and to the given layer indices, minus `exclude`."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise TargetError("no targets given: name at least one module pattern, e.g. ['query', 'value'] or 'all-linear'")
    arch = describe(model)
    candidates = plain_modules(model)
    allowed_layers = _layer_set(layers, len(arch.layers))
    heads = set(arch.heads)
    chosen: dict[str, nn.Module] = {}
    for pattern in targets:
        hits = {n: m for n, m in candidates.items() if _matches(pattern, n, m, heads, _pattern_types(pattern, types))}
        if not hits and pattern == ALL_LINEAR:  # no linear layer outside the heads (a CNN): its convolutions
            hits = {n: m for n, m in candidates.items() if _matches(pattern, n, m, heads, _conv_types(types))}
        if not hits:
            raise no_match_error(pattern, candidates, types, model)
        if allowed_layers is not None:
            hits = {n: m for n, m in hits.items() if arch.layer_index(n) in allowed_layers}
            if not hits:
                raise TargetError(f"target {pattern!r} matches no module inside layers {sorted(allowed_layers)} "
                                  f"(the model has {len(arch.layers)} layers: {arch.layer_lists})")
        chosen.update(hits)
    for pattern in exclude:
        chosen = {n: m for n, m in chosen.items() if not _matches(pattern, n, m, set(), (nn.Module,))}
    if not chosen:
        raise TargetError(f"every module matched by {list(targets)} is excluded by {list(exclude)}")
    check_not_taken(chosen)
    return dict(sorted(chosen.items(), key=lambda kv: list(candidates).index(kv[0])))


def _pattern_types(pattern: str, types: tuple[type, ...]) -> tuple[type, ...]:
    """The module types a pattern may pick: all-linear only the linear ones among `types`."""
    return tuple(t for t in types if issubclass(t, LINEAR)) if pattern == ALL_LINEAR else types


def _conv_types(types: tuple[type, ...]) -> tuple[type, ...]:
    return tuple(t for t in types if issubclass(t, nn.modules.conv._ConvNd))


def exact_pattern(names: Iterable[str]) -> str:
    """A target pattern matching exactly these module names."""
    return "re:" + "|".join(map(re.escape, names))


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, skipping anything inside a DeltaModule (those belong to an attached delta)."""
    out, inside = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, DeltaModule):
            inside.append(name)
        out[name] = module
    return out


def _matches(pattern: str, name: str, module: nn.Module, heads: set[str], types: tuple[type, ...]) -> bool:
    if not name:
        return False
    if pattern == ALL_LINEAR:
        return _is_type(module, types) and name not in heads and not any(name.startswith(h + ".") for h in heads)
    if not _is_type(module, types) and not isinstance(module, DeltaModule):
        return False
    if pattern.startswith("re:"):
        return fullmatch(pattern[3:], name)
    if pattern.startswith("type:"):
        return type(module).__name__ == pattern[5:]
    return name == pattern or name.endswith("." + pattern)


def _is_type(module: nn.Module, types: tuple[type, ...]) -> bool:
    return isinstance(module, types) and not isinstance(module, DeltaModule)


def check_not_taken(found: dict[str, nn.Module]) -> None:
    """Refuse modules that already carry a delta (attaching twice is an error, not a silent stack)."""
    for name, module in found.items():
        if isinstance(module, DeltaModule):
            raise TargetError(f"module {name!r} already carries a {module.owner_method} delta; "
                              "detach it first, or target other modules")


def no_match_error(pattern: str, candidates: dict[str, nn.Module], types: tuple[type, ...],
                   model: nn.Module) -> TargetError:
    typed = [n for n, m in candidates.items() if n and _is_type(m, types)]
    shorts = sorted({short_name(n) for n in typed})
    close = difflib.get_close_matches(pattern, shorts + sorted({s.rsplit(".", 1)[-1] for s in shorts}), n=3)
    wrong_type = [n for n in candidates if n and (n == pattern or n.endswith("." + pattern))]
    msg = f"target {pattern!r} matches no module of {type(model).__name__}"
    taken = sorted({m.owner_method for m in candidates.values() if isinstance(m, DeltaModule)})
    if taken:
        msg += f" (modules that already carry a {'/'.join(taken)} delta are not candidates: detach it first)"
    if wrong_type:
        kinds = sorted({type(candidates[n]).__name__ for n in wrong_type})
        allowed = ", ".join(t.__name__ for t in types)
        msg += f" of a supported type: it names {kinds} modules, and this method supports {allowed}"
    msg += f". Did you mean {', '.join(map(repr, close))}?" if close else "."
    return TargetError(f"{msg} Candidates: {', '.join(shorts) or '(none)'}")


def _layer_set(layers: LayerSpec, count: int) -> set[int] | None:
    """Parse `layers`: None (all), "2-5" (inclusive range), or a list of indices (negative counts from the end)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        match = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", layers)
        if not match:
            raise TargetError(f"layers {layers!r}: expected a range like '0-3' or a list of indices like [0, 1, -1]")
        lo, hi = (int(g) % count if count else int(g) for g in match.groups())
        indices: Iterable[int] = range(lo, hi + 1)
    else:
        indices = list(layers)
    if count == 0:
        raise TargetError("layers given, but no layer stack was found in this model; target modules by name instead")
    out = set()
    for i in indices:
        if not -count <= i < count:
            raise TargetError(f"layer index {i} is out of range: the model has {count} layers (0..{count - 1})")
        out.add(i % count)
    return out


def head_module_name(model: nn.Module, module: str | None = None) -> str:
    """The name of the task head `module` names (a pattern matching one module), or of the model's known head."""
    if module is not None:
        found = find_modules(model, [module])
        if len(found) > 1:
            raise TargetError(f"module {module!r} matches {len(found)} modules ({', '.join(list(found)[:4])}); "
                              "give the full name of the one head module")
        return next(iter(found))
    arch = describe(model)
    if arch.heads:
        return arch.heads[-1]  # the last one is the output (DistilBERT: pre_classifier, then classifier)
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and arch.layer_index(n) is None]
    linears = outside or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    raise TargetError(f"{type(model).__name__} has no known task head; name the module to replace with "
                      f"`module`. Candidate Linear modules near the output: {', '.join(linears[-5:]) or '(none)'}. "
                      "A model without a head (AutoModel) cannot get one added: load it with "
                      "AutoModelForSequenceClassification / ForTokenClassification instead")
