"""The frozen base's dtype (`model.dtype: auto | bf16 | fp32`) and fp32 master weights for what trains.

A bf16 base halves the base's memory and needs no per-step weight cast: its matmuls run in bf16 as stored. The
delta's tensors (and so the optimizer's states) stay fp32. The two meet under bf16 autocast, which the model's
forward enters by itself (`compute_in`), so training, evaluation, generation and merging all work unchanged.
`auto` picks bf16 only where the CPU multiplies bf16 natively (AVX512_BF16 / AMX, train/compute.py) and no delta
trains the base's own weights (full fine-tuning keeps an fp32 model); elsewhere it is fp32, as before.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from deltatune.train.compute import cpu_has_bf16

BaseDtype = Literal["auto", "bf16", "fp32", "float32", "bfloat16"]  # float32 / bfloat16: the older spellings
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "float16"}


def resolve_base_dtype(setting: str, *, trains_base: bool, bf16_native: bool | None = None) -> torch.dtype:
    """The dtype to load the base in. `bf16_native` defaults to this CPU's answer (`cpu_has_bf16`)."""
    if setting != "auto":
        return DTYPES[setting]
    native = cpu_has_bf16() if bf16_native is None else bf16_native
    return torch.bfloat16 if native and not trains_base else torch.float32


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

