"""Quantized frozen base (QLoRA-style): weight-only int8 / int4 quantization of the base's frozen Linear layers.

The kernels are torchao's CPU paths (an optional dependency: `pip install 'deltatune[quantize]'`):
  * int8  per-output-channel symmetric int8 weights (`Int8WeightOnlyConfig`, torchao.quantization.Int8Tensor);
  * int4  per-group (128, 64 or 32 inputs) asymmetric 4-bit weights packed for torch's CPU int4 matmul
          (`aten._weight_int4pack_mm_for_cpu`) through torchao's `Int4OpaqueTensor` (prototype API in torchao 0.18:
          its stable int4 formats are CUDA/XPU only).
A `QuantizedLinear` is an `nn.Linear` (so targeting, "all-linear" and LoRA/IA3/adapters see it as one) whose forward
runs the quantized kernel; its backward gives the input gradient from a transient dequantized copy of one layer's
weight (the kernels have no derivative), so deltas before it still train. The weight itself never trains.
The output head stays unquantized (as in QLoRA). Merging a delta needs real weights: merging on a quantized base is
an error; load the saved delta onto a dequantized base (`dequantize_base`, or the base loaded unquantized) instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.targeting import DeltaModule

Quantize = Literal["int8", "int4"]
INT4_GROUP_SIZES = (128, 64, 32)  # what the CPU int4 kernel supports; the largest that divides in_features


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight is a torchao weight-only quantized tensor; computes in `compute_dtype`."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, mode: Quantize):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode = mode
        self.compute_dtype = linear.weight.dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _QuantizedMatmul.apply(x.to(self.compute_dtype), self.weight, bias, self)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a dense (out, in) tensor in `compute_dtype`."""
        weight = self.weight.detach()
        if self.mode == "int8":
            return weight.dequantize().to(self.compute_dtype)
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)  # the int4 kernel has no dequantize: x = I
        return F.linear(eye, weight).T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ W.T + b with a quantized W; dx from W dequantized for the backward only; db when b trains."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        need_x, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x:
            grad_x = grad @ ctx.layer.dequantized_weight().to(grad.dtype)
        if need_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None



def quantize_base(model: nn.Module, mode: Quantize) -> int:
    """Replace every nn.Linear of `model` except the output head by a QuantizedLinear (in place); layers the
    kernel cannot take (int4: in_features not a multiple of 32) stay as they are. Returns how many were quantized."""
    configs = _torchao_configs()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not targets:
        raise ConfigError(f"model.quantize: {type(model).__name__} has no nn.Linear layers besides its output head; "
                          "remove model.quantize")
    count = 0
    for name, linear in targets:
        weight = _quantized_weight(linear.weight.detach(), mode, configs)
        if weight is None:
            continue
        parent, _, attr = name.rpartition(".")
        layer = QuantizedLinear(linear, weight, mode)
        setattr(model.get_submodule(parent), attr, layer)
        count += 1
    return count


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every QuantizedLinear by a plain nn.Linear holding its dequantized weight (in `dtype`, default the
    compute dtype): the base to load a delta onto for merging. Returns how many layers were replaced."""
    if attached := [name for name, m in model.named_modules() if isinstance(m, DeltaModule)]:
        raise ConfigError(f"dequantize_base: a delta is attached ({attached[0]}); dequantize the base before "
                          "attaching or loading a delta (detach it, or save it and load it onto the dequantized base)")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in layers:
        weight = layer.dequantized_weight().to(dtype or layer.compute_dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = layer.bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)
    return len(layers)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the QuantizedLinear layers in `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def _quantized_weight(weight: torch.Tensor, mode: Quantize, configs: dict[str, Any]) -> torch.Tensor | None:
    if mode == "int8":
        return configs["int8"].from_hp(weight, configs["per_row"]())
    group = next((g for g in INT4_GROUP_SIZES if weight.shape[1] % g == 0), None)
    return None if group is None else configs["int4"].from_hp(weight, [1, group])


def _torchao_configs() -> dict[str, Any]:
    """torchao's int8 / int4 CPU tensor classes; ConfigError when torchao is not installed."""
    try:
        # torchao logs a warning per CUDA-only extension it cannot load on a CPU build; they do not matter here
        with _quiet("torchao"), contextlib.redirect_stderr(io.StringIO()):
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor
            from torchao.quantization import Int8Tensor
            from torchao.quantization.granularity import PerRow
    except ImportError as e:
        raise ConfigError(f"model.quantize needs torchao ({e}): pip install 'deltatune[quantize]', "
                          "or remove model.quantize") from e
    return {"int8": Int8Tensor, "int4": Int4OpaqueTensor, "per_row": PerRow}


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
