"""A delta merged into its base weights, saved as a plain transformers model folder (safetensors + tokenizer):
`AutoModel*.from_pretrained(folder)` loads it without deltatune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune import io
from deltatune.delta import DeltaBase
from deltatune.errors import ConfigError
from deltatune.registry import methods


def export_merged(delta: DeltaBase, tokenizer: Any, out: str | Path) -> Path:
    """Merge `delta` into the model it is attached to and write the model (and `tokenizer`) to `out`, atomically."""
    if fixed := [p.method for p in delta.parts() if not p.mergeable]:
        mergeable = [name for name, m in methods().items() if m.delta_class.mergeable]
        raise ConfigError(f"{', '.join(fixed)} cannot be merged into the base weights, so there is no standalone "
                          f"model to export; mergeable methods: {', '.join(mergeable)}. "
                          "Export it as a PEFT adapter (--format peft) or keep the deltatune delta")
    if tokenizer is None:
        raise ConfigError("the base model folder has no tokenizer to save with the merged model")
    model = delta.model
    if not delta.merged:
        delta.merge()
    _check_plain(model)
    with io.new_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def _check_plain(model: torch.nn.Module) -> None:
    """The merged model must have exactly the parameters of its own class, or from_pretrained would drop some."""
    with torch.device("meta"):
        reference = type(model)(model.config)
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    if ours != theirs:
        extra = sorted(set(ours) ^ set(theirs)) + [n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n]]
        raise ConfigError(f"the merged model does not fit a plain {type(model).__name__}: {', '.join(extra[:5])} "
                          "(e.g. biases added to a bias-free model); it cannot be saved as a standalone model")
