"""Per-architecture facts: where the layer stack is, which modules are the attention and feed-forward outputs,
which are the task heads. Known families are listed in ARCHS; anything else gets a generic guess."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family, as name suffixes (layers) or paths relative to a layer."""

    layers: tuple[str, ...]
    attention_output: str | None = None
    ffn_output: str | None = None
    heads: tuple[str, ...] = ("lm_head", "score", "classifier", "qa_outputs", "cls")


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers=("transformer.h",), attention_output="attn.c_proj", ffn_output="mlp.c_proj"),
    "llama": ArchSpec(layers=("model.layers",), attention_output="self_attn.o_proj", ffn_output="mlp.down_proj"),
    "bert": ArchSpec(layers=("encoder.layer",), attention_output="attention.output.dense", ffn_output="output.dense"),
    "gpt_neox": ArchSpec(layers=("gpt_neox.layers",), attention_output="attention.dense",
                         ffn_output="mlp.dense_4h_to_h", heads=("embed_out", "score")),
    "t5": ArchSpec(layers=("encoder.block", "decoder.block"), attention_output="layer.0.SelfAttention.o",
                   ffn_output="layer.-1.DenseReluDense.wo"),
}
for _alias, _family in {"qwen2": "llama", "qwen3": "llama", "mistral": "llama", "gemma": "llama",
                        "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert"}.items():
    ARCHS[_alias] = ARCHS[_family]
ARCHS["distilbert"] = ArchSpec(layers=("transformer.layer",), attention_output="attention.out_lin",
                               ffn_output="ffn.lin2", heads=("classifier", "pre_classifier", "vocab_projector"))


@dataclass
class Arch:
    """Resolved facts for one model instance (full module names)."""

    family: str
    layer_lists: list[str]
    layers: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    spec: ArchSpec | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # children count of every ModuleList, by full name

    def layer_index(self, name: str) -> int | None:
        """Index in the layer stack of the layer containing module/parameter `name`, or None."""
        for i, layer in enumerate(self.layers):
            if name == layer or name.startswith(layer + "."):
                return i
        return None

    def layer_role(self, role: str) -> list[str]:
        """Full names of the `attention_output` / `ffn_output` module of every layer (empty if unknown).

        A negative index in the spec's path counts from the end of that ModuleList in each layer (T5's FFN is
        `layer.1` in encoder blocks and `layer.2` in decoder blocks: `layer.-1`)."""
        rel = getattr(self.spec, role, None) if self.spec else None
        if rel is None:
            return []
        return [self._resolve(f"{layer}.{rel}") for layer in self.layers]

    def _resolve(self, name: str) -> str:
        parts: list[str] = []
        for part in name.split("."):
            if re.fullmatch(r"-\d+", part) and ".".join(parts) in self.sizes:
                part = str(int(part) % self.sizes[".".join(parts)])
            parts.append(part)
        return ".".join(parts)


def describe(model: nn.Module) -> Arch:
    """Find the layer stack and heads of `model`, using ARCHS when the model type is known."""
    names = dict(model.named_modules())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type or "")
    if spec is not None:
        lists = [n for n, m in names.items() if isinstance(m, nn.ModuleList) and n.endswith(spec.layers)]
    else:
        lists = _largest_uniform_list(names)
    layers = [f"{lst}.{i}" for lst in lists for i in range(len(names[lst]))]
    heads_spec = spec.heads if spec else ArchSpec(layers=()).heads
    heads = [n for n in names if n in heads_spec]
    sizes = {n: len(m) for n, m in names.items() if isinstance(m, nn.ModuleList)}
    return Arch(family=model_type if spec else "generic", layer_lists=lists, layers=layers, heads=heads, spec=spec,
                sizes=sizes)


def _largest_uniform_list(names: dict[str, nn.Module]) -> list[str]:
    """Generic fallback: the largest ModuleList whose children all share one class."""
    best, size = [], 0
    for name, module in names.items():
        if isinstance(module, nn.ModuleList) and len(module) > size and len({type(c) for c in module}) == 1:
            best, size = [name], len(module)
    return best


def short_name(name: str) -> str:
    """`encoder.layer.3.attention.self.query` -> `attention.self.query` (the part after the layer index)."""
    parts = re.split(r"\.\d+\.", name, maxsplit=1)
    return parts[-1]
