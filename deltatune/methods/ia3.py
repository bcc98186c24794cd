"""(IA)^3 (Liu et al. 2022): learned vectors rescale the keys, the values and the feed-forward activations.

Each targeted Linear (or GPT-2 `Conv1D`) gets one vector `ia3_l`, initialised to ones so nothing changes at attach:
  * an ordinary target has its OUTPUT scaled per unit:      y = l ⊙ (W x + b),  `ia3_l` shaped (out, 1);
  * a `feedforward` target has its INPUT scaled per feature: y = W (l ⊙ x) + b,  `ia3_l` shaped (1, in);
the paper's l_ff rescales the FFN's inner activation, i.e. the input of its second linear (`down_proj`, `output.dense`).
This is Hugging Face PEFT's IA3 exactly: same wrapper layout (`<module>.base_layer`, `<module>.ia3_l`), same vector
shapes, PEFT's default modules per model type (`DEFAULTS`), so a PEFT export is a rename (`ia3_l` -> `ia3_l.default`).
As in PEFT, BERT's `output.dense` also matches `attention.output.dense`, and GPT-2's fused `c_attn` scales q, k and v.

Merging folds the vector into the weight (rows for output scaling, plus the bias; columns for input scaling), and
keeps the original weight and bias so that unmerging is exact (PEFT divides, which is not).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.arch import describe, short_name
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import TargetError
from deltatune.registry import register
from deltatune.schema import NonEmptyPatterns, Patterns
from deltatune.targeting import DeltaModule, MergeableWrapper, exact_pattern, find_modules, plain_modules

TYPES = (nn.Linear, Conv1D)

# model_type -> (targets, feedforward targets). PEFT's table, except that the Llama family always uses the
# paper's keys and values (PEFT picks q_proj for qwen2/qwen3/gemma); families PEFT lacks follow their module names.
_LLAMA = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_BERT = (["key", "value", "output.dense"], ["output.dense"])
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _LLAMA),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


class IA3(DeltaConfig):
    """(IA)^3 settings: which modules get a scaling vector, and which of them scale their input."""

    targets: NonEmptyPatterns | None = Field(None, description="module patterns (name, dot-suffix, 're:...', "
                                             "'type:...'); default: keys, values and the FFN's second linear of the "
                                             "model type")
    feedforward: Patterns | None = Field(None, description="patterns of targeted modules whose INPUT is scaled "
                                                           "(PEFT's feedforward_modules); default: the model type's "
                                                           "FFN second linear, where targeted")
    layers: str | list[int] | None = Field(None, description="restrict to these layer indices, e.g. '0-3' or [0, -1]")
    exclude: Patterns = Field(default_factory=list, description="patterns of modules to leave alone")


class IA3Module(MergeableWrapper):
    """A frozen `base_layer` whose output (or, for feed-forward modules, input) is scaled by the vector `ia3_l`."""

    owner_method = "ia3"

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base
        self.is_feedforward = feedforward
        self.transposed = isinstance(base, Conv1D)  # Conv1D stores its weight as (in, out)
        n_out, n_in = base.weight.shape[::-1] if self.transposed else base.weight.shape
        shape = (1, n_in) if feedforward else (n_out, 1)  # PEFT's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale, *args, **kwargs)
        return self.base_layer(x, *args, **kwargs) * scale

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        merged = {"weight": weight * (self.ia3_l.T if self.transposed else self.ia3_l).to(weight.dtype)}
        if bias is not None and not self.is_feedforward:  # an input scale leaves the bias alone
            merged["bias"] = bias * self.ia3_l.flatten().to(bias.dtype)
        return merged

    def extra_repr(self) -> str:
        return f"scales={'input' if self.is_feedforward else 'output'}, size={self.ia3_l.numel()}"


@register("ia3")
class IA3Delta(Delta[IA3]):
    """(IA)^3: learned vectors rescaling keys, values and feed-forward activations (ones at start); mergeable."""

    mergeable = True
    peft_type = "IA3"

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        targets = cfg.targets or self._defaults()[0]
        # the model type's feed-forward modules among the targets, unless `feedforward` names them (strictly)
        explicit = cfg.feedforward is not None
        feedforward = cfg.feedforward if explicit else self._defaults(required=False)[1]
        found = find_modules(self.model, targets, TYPES, cfg.layers, cfg.exclude)
        is_ff = self._feedforward(found, feedforward, strict=explicit)
        self.wrappers: list[IA3Module] = []
        for name, module in found.items():
            wrapper = IA3Module(module, name in is_ff)
            self.swap(name, wrapper)
            self.wrappers.append(wrapper)
        return [w.ia3_l for w in self.wrappers]

    def _defaults(self, required: bool = True) -> tuple[list[str], list[str]]:
        """PEFT's modules for known model types; otherwise each layer's keys, values and FFN output (arch.py)."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type in DEFAULTS:
            return DEFAULTS[model_type]
        arch = describe(self.model)
        key_value, ffn = arch.layer_role("key_value"), arch.layer_role("ffn_output")
        if key_value and ffn:
            return [exact_pattern(key_value + ffn)], [exact_pattern(ffn)]
        if not required:
            return [], []
        linears = sorted({short_name(n) for n, m in plain_modules(self.model).items()
                          if n and isinstance(m, TYPES) and not isinstance(m, DeltaModule)})
        raise TargetError(f"ia3 found no attention layers (key and value projections) and feed-forward blocks in "
                          f"{type(self.model).__name__} to rescale; set `targets` (the key and value projections and "
                          f"the FFN's second linear) and `feedforward` (that FFN linear), or use lora. Candidates: "
                          f"{', '.join(linears) or '(none)'}")

    def _feedforward(self, found: dict[str, nn.Module], patterns: list[str], strict: bool) -> set[str]:
        """Names in `found` matched by `patterns`; with `strict`, each pattern must match a targeted module."""
        chosen: set[str] = set()
        for pattern in patterns:
            try:
                hits = set(find_modules(self.model, [pattern], TYPES)) & set(found)
            except TargetError:
                if strict:
                    raise
                hits = set()
            if strict and not hits:
                raise TargetError(f"feedforward pattern {pattern!r} matches none of the targeted modules; a "
                                  f"feed-forward module must also be a target. Targeted: "
                                  f"{', '.join(sorted({short_name(n) for n in found}))}")
            chosen |= hits
        return chosen

    def merge_weights(self) -> None:
        self.fold_wrappers(self.wrappers)

    def unmerge_weights(self) -> None:
        self.unfold_wrappers(self.wrappers)
