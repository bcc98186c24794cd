"""A delta merged into its base weights, saved as a plain transformers model folder (safetensors + tokenizer):
`AutoModel*.from_pretrained(folder)` loads it without deltatune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune import storage
from deltatune.delta import DeltaBase
from deltatune.errors import ConfigError
from deltatune.models.quantize import checkpoint_state_dict, held_in_bf16, quantized_layers
from deltatune.registry import methods


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_merged(delta: DeltaBase, tokenizer: Any, out: str | Path, *, dtype: str | None = None) -> Path:
    """Merge `delta` into the model it is attached to and write the model (and `tokenizer`) to `out`, atomically.

    `dtype` (fp32, bf16, fp16) casts the merged weights; default: the dtype the base was loaded in (bf16 for a base
    held in bf16 that computed in fp32). For fp32 a 16-bit base is cast up before merging, so the merged weights
    carry the whole update (no bf16 rounding)."""
    if tokenizer is None:
        raise ConfigError("the base model folder has no tokenizer to save with the merged model")
    dtype = dtype or ("bf16" if held_in_bf16(delta.model) else None)
    if dtype == "fp32" and not quantized_layers(delta.model):
        delta.model.float()
    model = merged_model(delta)
    if dtype is not None:
        model.to(TORCH_DTYPES[dtype])
    with storage.new_folder(out) as tmp:
        model.save_pretrained(tmp, state_dict=checkpoint_state_dict(model))
        tokenizer.save_pretrained(tmp)
    return Path(out)


def merged_model(delta: DeltaBase) -> torch.nn.Module:
    """The model `delta` is attached to, with the delta merged into its weights; an error for methods that cannot
    be merged or a model that no longer fits its own class."""
    if fixed := [p.method for p in delta.parts() if not p.mergeable]:
        mergeable = [name for name, m in methods().items() if m.delta_class.mergeable]
        raise ConfigError(f"{', '.join(fixed)} cannot be merged into the base weights, so there is no standalone "
                          f"model to export; mergeable methods: {', '.join(mergeable)}. "
                          "Export it as a PEFT adapter (--format peft) or keep the deltatune delta")
    if not delta.merged:
        delta.merge()
    _check_plain(delta.model)
    return delta.model


def _check_plain(model: torch.nn.Module) -> None:
    """The merged model must have exactly the parameters of its own class (as its checkpoint stores them: a held
    Conv1D's transposed), or from_pretrained would drop some."""
    with torch.device("meta"):
        reference = type(model)(model.config)
    ours = {n: tuple(getattr(p, "checkpoint_shape", p.shape)) for n, p in model.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    if ours != theirs:
        extra = sorted(set(ours) ^ set(theirs)) + [n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n]]
        raise ConfigError(f"the merged model does not fit a plain {type(model).__name__}: {', '.join(extra[:5])} "
                          "(e.g. biases added to a bias-free model); it cannot be saved as a standalone model")
