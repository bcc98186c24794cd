"""Trained-looking adapters saved on disk for a tiny model (or the packaged MiniLM): what AdapterFusion fuses.

`fusion_config_args(arch)` is the contract test's config factory for `fusion`: two Pfeiffer adapters with random
(non-zero) weights, saved once per architecture in a temp folder that lives as long as the test process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import deltatune
from deltatune.methods.adapter import Adapter
from tests.tiny import tiny_model

_ROOT = tempfile.TemporaryDirectory(prefix="deltatune-adapters-")  # removed when the process exits
_SAVED: dict[str, list[str]] = {}


def base_model(arch: str) -> torch.nn.Module:
    """A tiny random model, or the packaged MiniLM with a 2-label head ("minilm")."""
    if arch == "minilm":
        from deltatune.models.load import load_model

        return load_model("minilm", "classification", 2)[0].eval()
    return tiny_model(arch)


def save_adapter(model: torch.nn.Module, folder: Path, seed: int, std: float = 1.0, **config) -> Path:
    """Attach an adapter to `model`, give it random weights (a stand-in for training), save it, detach it."""
    delta = deltatune.attach(model, Adapter(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    delta.save(folder)
    delta.detach()
    return folder


def saved_adapters(arch: str, n: int = 2, **config) -> list[str]:
    """Folders of `n` adapters saved for `arch` (cached per architecture and config)."""
    key = f"{arch}-{n}-" + "-".join(f"{k}={v}" for k, v in sorted(config.items()))
    if key not in _SAVED:
        with torch.random.fork_rng():  # building the model reseeds torch: keep the caller's random stream
            model = base_model(arch)
            _SAVED[key] = [str(save_adapter(model, Path(_ROOT.name) / key / f"a{i}", seed=i, **config))
                           for i in range(n)]
    return _SAVED[key]


def fusion_config_args(arch: str) -> dict:
    # layer-normed inputs: a random model's sublayer outputs are ~0.1 in scale, which would leave LN-less random
    # adapters nearly constant functions of their input (nothing for the fusion to choose between)
    return {"adapters": saved_adapters(arch, layer_norm=True)}
