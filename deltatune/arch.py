"""Architecture facts read off the model itself: where the layer stack is, which modules are each layer's attention
and feed-forward outputs, which modules are task heads.

Nothing here is a per-family name table that goes stale with transformers releases:
  * layers: the ModuleLists of transformers' `_no_split_modules` layer classes (T5: encoder and decoder blocks);
    for other models, the largest ModuleList of one class;
  * heads: the output embeddings (`get_output_embeddings()`) and the model's own modules outside its base model
    (`base_model`: a classifier, BERT's `cls`, DistilBERT's `pre_classifier`); a plain nn.Module's heads are
    found by the usual head names (`HEAD_NAMES`), the one fact that cannot be read off an arbitrary module;
  * layer roles: in each layer, the attention output is the last linear of its first attention module (a class
    named ...Attention...) that writes the residual width, and the FFN output is the last linear outside any
    attention module (the residual width is that module's output size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "cls")  # heads of models without `base_model`
LINEAR = (nn.Linear, Conv1D)
KEY_VALUE = re.compile(r"(^|_)(k|v|key|value)(_|$)")  # key/value projections by their usual names (k_proj, value)


@dataclass
class Arch:
    """Resolved facts for one model instance (full module names)."""

    layer_lists: list[str]
    layers: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    roles: dict[str, list[str]] = field(default_factory=dict)  # role -> module names, in layer order

    def layer_index(self, name: str) -> int | None:
        """Index in the layer stack of the layer containing module/parameter `name`, or None."""
        for i, layer in enumerate(self.layers):
            if name == layer or name.startswith(layer + "."):
                return i
        return None

    def layer_role(self, role: str) -> list[str]:
        """Full names of the `attention_output`, `ffn_output` or `key_value` modules of every layer (empty if none)."""
        return self.roles.get(role, [])


def describe(model: nn.Module) -> Arch:
    """Find the layer stack, the heads and each layer's attention / FFN output modules of `model`."""
    names = dict(model.named_modules())
    lists = _layer_lists(model, names)
    layers = [f"{lst}.{i}" for lst in lists for i in range(len(names[lst]))]
    roles: dict[str, list[str]] = {}
    for layer in layers:
        for role, found in _layer_roles(names[layer]).items():
            roles.setdefault(role, []).extend(f"{layer}.{name}" for name in found)
    return Arch(layer_lists=lists, layers=layers, heads=_heads(model, names), roles=roles)


def _layer_lists(model: nn.Module, names: dict[str, nn.Module]) -> list[str]:
    """ModuleLists of the model's layer classes (transformers' `_no_split_modules`), else the largest uniform one."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [n for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m)
             and all(_kind(c).__name__ in layer_classes for c in m)]
    return lists or _largest_uniform_list(names)


def _largest_uniform_list(names: dict[str, nn.Module]) -> list[str]:
    """Generic fallback: the largest ModuleList whose children all share one class."""
    best, size = [], 0
    for name, module in names.items():
        if isinstance(module, nn.ModuleList) and len(module) > size and len({_kind(c) for c in module}) == 1:
            best, size = [name], len(module)
    return best


def _kind(layer: nn.Module) -> type:
    """The class of a layer, or of the layer a delta's wrapper holds (side-tuning wraps the last one)."""
    return type(getattr(layer, "base_layer", layer))


def _heads(model: nn.Module, names: dict[str, nn.Module]) -> list[str]:
    """Head modules, in module order: the output embeddings and everything outside the base model."""
    ids = {id(m): n for n, m in names.items() if n}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    found = {ids[id(output)]} if id(output) in ids else set()
    base = getattr(model, "base_model", model)
    if base is not model:
        found |= {n for n, child in model.named_children()
                  if child is not base and next(child.parameters(), None) is not None}
    elif not hasattr(model, "base_model"):
        found |= {n for n in names if n in HEAD_NAMES}
    return [n for n in names if n in found]


def _layer_roles(layer: nn.Module) -> dict[str, list[str]]:
    """Names (relative to `layer`) of its attention output, key/value and FFN output linears, where found."""
    attention: list[str] = []  # outermost attention modules, in order
    inside: dict[str, list[tuple[str, nn.Module]]] = {}  # attention module -> its linears
    ffn: list[tuple[str, nn.Module]] = []
    for name, module in _unwrapped_modules(layer):
        owner = next((a for a in attention if name.startswith(a + ".")), None)
        if owner is None and "Attention" in type(module).__name__:
            attention.append(name)
        elif isinstance(getattr(module, "base_layer", module), LINEAR):
            (ffn if owner is None else inside.setdefault(owner, [])).append((name, module))
    if not ffn:
        return {}
    width = _out_features(ffn[-1][1])
    attn = inside.get(attention[0], []) if attention else []
    writers = [n for n, m in attn if _out_features(m) == width]
    roles = {"ffn_output": [ffn[-1][0]]}
    if writers:
        readers = [n for n, _ in attn if n != writers[-1]]
        fused = readers if len(readers) == 1 else []
        key_value = [n for n in readers if KEY_VALUE.search(n.rsplit(".", 1)[-1])] or fused
        roles |= {"attention_output": [writers[-1]], "key_value": key_value}
    return {role: names for role, names in roles.items() if names}


def _unwrapped_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules, a delta's wrapper standing for the layer it wraps (its insides are skipped)."""
    out, wrappers = [], []
    for name, module in root.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if hasattr(module, "base_layer"):
            wrappers.append(name)
        out.append((name, module))
    return out


def _out_features(module: nn.Module) -> int | None:
    base = getattr(module, "base_layer", module)
    return base.weight.shape[1] if isinstance(base, Conv1D) else getattr(base, "out_features", None)


def short_name(name: str) -> str:
    """`encoder.layer.3.attention.self.query` -> `attention.self.query` (the part after the layer index)."""
    parts = re.split(r"\.\d+\.", name, maxsplit=1)
    return parts[-1]
