"""The frozen base's precision: how its weights are held (`model.dtype: auto | bf16 | fp32`) and what its matmuls
run in (`model.compute_dtype: auto | bf16 | fp32`); fp32 master weights for what trains.

Three ways to hold a base:
  * fp32 storage, fp32 compute: the reference; 4 bytes a parameter.
  * bf16 storage, bf16 compute: half the memory and no per-step weight cast; the forward runs under bf16 autocast
    (`compute_in`), so the fp32 delta tensors meet bf16 base weights. Fast only where the CPU multiplies bf16
    natively (AVX512_BF16 / AMX): elsewhere torch emulates bf16 matmuls, 100-300x slower than fp32 (bench/README.md).
  * bf16 storage, fp32 compute: half the memory on any CPU. The base's Linear layers keep bf16 weights and each
    matmul (forward, and the input gradient in backward) runs in fp32 from the layer's weight upcast into one
    scratch buffer the model's layers share (`quantize.QuantizedLinear` in its "bf16" storage format). An untied
    output head is held the same way, upcast in blocks of rows (never whole); norms stay fp32, an untied input
    embedding table stays bf16 with its rows cast on lookup.
`compute_dtype: auto` = bf16 where the CPU has native bf16 matmuls, else fp32. `dtype: auto` = bf16 when no delta
trains the base's own weights and either the CPU multiplies bf16 natively, `compute_dtype: bf16` asks for it, or
the fp32 weights would take more than half of the machine's RAM (`FP32_RAM_SHARE`); else fp32. The delta's tensors
(and so the optimizer's states) stay fp32 in every mode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.models.quantize import quantize_base
from deltatune.train.compute import cpu_has_bf16

BaseDtype = Literal["auto", "bf16", "fp32", "float32", "bfloat16"]  # float32 / bfloat16: the older spellings
ComputeDtype = Literal["auto", "bf16", "fp32"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "float16"}
FP32_RAM_SHARE = 0.5  # dtype auto holds the base in bf16 when its fp32 weights would take more of the RAM than this


def resolve_base_precision(dtype: str, compute: str = "auto", *, trained_by: str | None,
                           bf16_native: bool | None = None, fp32_bytes: Callable[[], int | None] | None = None,
                           ram_bytes: int | None = None) -> tuple[torch.dtype, torch.dtype]:
    """(storage, compute) dtypes of the base for `model.dtype` / `model.compute_dtype`, `trained_by` the delta method
    that trains the base's own weights (None: none does); `bf16_native` defaults to
    this CPU's answer (`cpu_has_bf16`), `ram_bytes` to its RAM; `fp32_bytes()` gives the base's fp32 size (only
    asked when `dtype` is auto on a CPU without native bf16). ConfigError for a combination that cannot work."""
    native = cpu_has_bf16() if bf16_native is None else bf16_native
    if dtype == "auto":
        wanted = native or compute == "bf16" or _too_big(fp32_bytes, ram_bytes)
        storage = torch.bfloat16 if wanted and trained_by is None else torch.float32
    else:
        storage = DTYPES[dtype]
    if storage == torch.float32 and compute == "bf16":
        raise ConfigError("model.compute_dtype: bf16 needs a bf16 base (model.dtype: bf16); an fp32 base computes "
                          "in bf16 through train.precision: bf16")
    if storage != torch.bfloat16:
        return storage, storage
    if trained_by is not None:
        raise ConfigError(f"model.dtype: bf16 stores a frozen base in bf16, but {trained_by} trains the base's own "
                          "tensors (in fp32, next to bf16 weights they would not fit); use model.dtype: auto (fp32 "
                          "for this method) or fp32")
    return storage, DTYPES[compute] if compute != "auto" else (torch.bfloat16 if native else torch.float32)


def _too_big(fp32_bytes: Callable[[], int | None] | None, ram_bytes: int | None) -> bool:
    size = fp32_bytes() if fp32_bytes is not None else None
    ram = ram_bytes if ram_bytes is not None else _ram_bytes()
    return size is not None and ram is not None and size > FP32_RAM_SHARE * ram


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def stored_fp32_bytes(folder: str | Path) -> int | None:
    """4 bytes for every floating-point weight in the *.safetensors files of `folder` (from their headers; None when
    there are none or one cannot be read)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    total = 0
    try:
        for file in files:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    part = weights.get_slice(name)
                    if part.get_dtype() in ("F32", "F16", "BF16", "F64"):
                        total += 4 * math.prod(part.get_shape())
    except (OSError, SafetensorError):
        return None
    return total or None


def hold_in_bf16(model: nn.Module) -> int:
    """bf16 storage with fp32 compute, in place: the Linear layers (an untied output head included) keep bf16
    weights and multiply in fp32 from a shared scratch buffer (the head in blocks of rows); everything else is fp32
    but an untied input embedding table (bf16, rows cast on lookup). A delta attached later builds its tensors in
    fp32 (`deltatune_compute_dtype`). Returns how many layers hold bf16 weights."""
    return quantize_base(model, "bf16", torch.float32)


def compute_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every forward of `model` run under `dtype` autocast (a reduced-precision base with fp32 deltas: the
    matmuls run in `dtype`, the bf16 weights are used as stored). No-op for fp32 or when already set."""
    if dtype == torch.float32 or getattr(model, "deltatune_compute_dtype", None) == dtype:
        return
    model.deltatune_compute_dtype = dtype
    contexts: list[torch.autocast] = []

    def enter(module: nn.Module, args: Any) -> None:
        device = next(module.parameters()).device.type
        contexts.append(torch.autocast(device, dtype=module.deltatune_compute_dtype))
        contexts[-1].__enter__()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if contexts:
            contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
