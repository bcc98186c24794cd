"""Which base model a delta belongs to: a fingerprint of names, shapes and a few sampled weights, checked on load.

Names and shapes tell architectures apart; the sampled weights tell apart checkpoints of one architecture (e.g.
SmolLM2-Instruct vs SmolLM2-base), so a delta never loads silently into a base it was not trained on. Taking it
reads SAMPLED_TENSORS x SAMPLES elements, never all weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Sequence

import torch
from torch import nn

from pydantic import BaseModel, Field

from deltatune.errors import CheckpointError

SAMPLED_TENSORS = 6
SAMPLES = 8
_STRIDE = 2654435761  # Knuth's multiplicative hash: sample positions spread over the whole tensor
DTYPES = ("float64", "float32", "float16", "bfloat16")  # sampled; others (e.g. float8 weights) are not


class WeightSample(BaseModel):
    """Sampled elements of one parameter, as stored in delta.json."""

    dtype: Literal[DTYPES]
    index: list[int]
    values: list[float]


class Fingerprint(BaseModel):
    """The `base` entry of delta.json (`weights` is absent in deltas saved before format version 2)."""

    class_name: str = Field(alias="class")
    name_or_path: str
    sha256: str
    shapes: dict[str, list[int]]
    weights: dict[str, WeightSample] = {}


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of a base model: class, source path, a hash of parameter names and shapes, and sampled weights.

    Freshly initialised parameters (`model.deltatune_new_weights`, e.g. a new task head) are not part of the base
    and are not sampled."""
    params = dict(model.named_parameters())
    # a quantized weight names the shape its checkpoint stores (GPT-2's Conv1D: transposed), so both bases match
    shapes = {name: list(getattr(p, "checkpoint_shape", p.shape)) for name, p in params.items()}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or "an unknown source"
    return {"class": type(model).__name__, "name_or_path": source, "sha256": digest, "shapes": shapes,
            "weights": sample_weights(params, set(getattr(model, "deltatune_new_weights", ())))}


def sample_weights(params: dict[str, torch.Tensor], new: set[str]) -> dict[str, dict[str, Any]]:
    """A few elements at fixed positions of a few parameters spread over the model, with their dtype."""
    names = [n for n, p in params.items()  # quantized weights (tensor subclasses) are a lossy copy: not sampled
             if n not in new and str(p.dtype).removeprefix("torch.") in DTYPES and p.numel() and not p.is_meta
             and type(p.detach()) is torch.Tensor]
    names = [n for n in names if params[n].dim() > 1] or names  # matrices: norms often start as all ones
    if not names:
        return {}
    picks = dict.fromkeys(names[round(i * (len(names) - 1) / max(SAMPLED_TENSORS - 1, 1))]
                          for i in range(SAMPLED_TENSORS))
    samples = {}
    for name in picks:
        flat = _as_stored(params[name]).reshape(-1)
        index = sorted({(i * _STRIDE + 7) % flat.numel() for i in range(SAMPLES)})
        samples[name] = {"dtype": str(flat.dtype).removeprefix("torch."), "index": index,
                         "values": flat[index].float().tolist()}
    return samples


def _as_stored(param: torch.Tensor) -> torch.Tensor:
    """`param` laid out as its checkpoint stores it: a GPT-2 Conv1D weight held as (out, in) (quantize.QuantizedLinear,
    bf16 storage) is stored (in, out), so both bases sample the same elements."""
    return param.detach().T if getattr(param, "checkpoint_transposed", False) else param.detach()


def check_same_base(saved: dict[str, Any], current: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """CheckpointError describing how `current` differs from the base a delta was saved for. Parameters under a
    name in `skip` (e.g. task heads) are not compared. Fingerprints without sampled weights (older deltas) are
    compared by names and shapes only."""
    old, new = (_without(fp["shapes"], skip) for fp in (saved, current))
    if old != new:
        diffs = [f"{k} missing" for k in old if k not in new][:3]
        diffs += [f"{k} unexpected" for k in new if k not in old][:3]
        diffs += [f"{k}: saved {old[k]} vs model {new[k]}" for k in old if k in new and old[k] != new[k]][:3]
        raise CheckpointError(
            f"this delta was saved for another base model ({_origin(saved)}); the given model is {_origin(current)}. "
            f"Differences: {'; '.join(diffs)}. Load the same base model the delta was trained on.")
    if differ := _weights_differ(_without(saved.get("weights") or {}, skip), current.get("weights") or {}):
        raise CheckpointError(
            f"this delta was trained on a different base model: the given model ({_origin(current)}) has the same "
            f"parameter names and shapes but other weights than the one the delta was trained on "
            f"({_origin(saved)}), e.g. in {', '.join(differ[:3])} (another checkpoint of the same architecture, "
            "such as a base vs an instruction-tuned model?). Load the base model the delta was trained on.")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError if a saved tensor holds NaN or infinity (a delta that would turn every output into NaN)."""
    if bad := [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise CheckpointError(f"{where} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[0]}: the "
                              "delta is damaged (training diverged?); use an earlier checkpoint or train again")


def _weights_differ(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """Names of sampled tensors whose values differ, compared at the coarser of the two dtypes (a base loaded in
    bfloat16 still matches the float32 weights it was rounded from)."""
    differ = []
    for name, old in saved.items():
        new = current.get(name)
        if new is None or old.get("index") != new["index"]:
            continue  # sampled differently (another sampling rule or new weights): nothing to compare
        dtype = max((getattr(torch, old["dtype"]), getattr(torch, new["dtype"])),
                    key=lambda d: torch.finfo(d).eps)
        a, b = (torch.tensor(s["values"], dtype=torch.float64).to(dtype) for s in (old, new))
        if a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num()):
            differ.append(name)
    return differ


def _without(entries: dict[str, Any], skip: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in entries.items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def _origin(fp: dict[str, Any]) -> str:
    return f"{fp.get('class')} from {fp.get('name_or_path')}"
