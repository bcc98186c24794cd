"""Quantized frozen base (QLoRA-style): weight-only int8 / int4 quantization of the base's frozen Linear layers.

The kernels are torchao's CPU paths (an optional dependency: `pip install 'deltatune[quantize]'`):
  * int8  per-output-channel symmetric int8 weights (`Int8WeightOnlyConfig`, torchao.quantization.Int8Tensor);
  * int4  per-group (128, 64 or 32 inputs) asymmetric 4-bit weights packed for torch's CPU int4 matmul
          (`aten._weight_int4pack_mm_for_cpu`) through torchao's `Int4OpaqueTensor` (prototype API in torchao 0.18:
          its stable int4 formats are CUDA/XPU only).
A `QuantizedLinear` is an `nn.Linear` (so targeting, "all-linear" and LoRA/IA3/adapters see it as one) whose forward
runs the quantized kernel (or the fp32 matmul of its unpacked weight). It replaces nn.Linear layers, subclasses of
it that compute the same (e.g. Falcon's FalconLinear: checked on a probe input) and GPT-2's Conv1D (weight stored
(in, out): quantized transposed, its `checkpoint_shape` keeps the stored shape for base fingerprints). Its backward
gives the input gradient from a transient dequantized copy of one layer's weight (the kernels have no derivative),
so deltas before it still train. The weight itself never trains. Task heads (output embeddings, classifiers) stay
unquantized, as in QLoRA, except that with fp32 compute an untied output head (an LM head not sharing its weight
with the input embeddings) is held in bf16, as QLoRA keeps it in 16 bits.
The same wrapper holds bf16 weights for fp32 compute (storage format "bf16", models/precision.py `hold_in_bf16`): no
kernel, each matmul unpacks (upcasts) the layer's weight into the shared fp32 scratch buffer; it merges like a plain
bf16 layer. A matmul unpacks at most `Scratch.block_elements` weights at once (the largest body layer, at least
MIN_BLOCK_ELEMENTS): a larger weight (the output head: 128,256 x 4,096 at Llama-3-8B) is multiplied in blocks of
output rows (`weight_blocks`), so its fp32 copy never exists whole.
Merging a delta needs real weights: merging on an int8/int4 base is an error; load the saved delta onto the base
loaded unquantized (what `deltatune merge` / `export --format hf` do for a quantized run) or `dequantize_base`.
Methods that train, mask or rewrite the base weights are refused on a quantized base (DeltaConfig.needs_dense_base).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import logging
import mmap
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transformers.pytorch_utils import Conv1D

from deltatune.arch import describe
from deltatune.errors import ConfigError
from deltatune.targeting import DeltaModule

Quantize = Literal["int8", "int4"]
Storage = Literal["int8", "int4", "bf16"]  # bf16: 16-bit weights multiplied in fp32 (no quantization)
INT4_GROUP_SIZES = (128, 64, 32)  # what the CPU int4 kernel supports; the largest that divides in_features
INT4_OUT_MULTIPLE = 16  # the CPU int4 packing needs out_features divisible by 16
# torchao (imported by transformers too, whenever it is installed) logs a warning per CUDA-only extension it cannot
# load on a CPU build, and torch one per enum torchao registers: noise on every run here, not a problem.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
_LIBC = _LIBC if hasattr(_LIBC, "malloc_trim") else None  # glibc only
MADV_DONTNEED = 4  # Linux
PAGE_SIZE = mmap.PAGESIZE
COPY_CHUNK_BYTES = 16 << 20
MIN_BLOCK_ELEMENTS = 1 << 22  # a weight block unpacked for one matmul holds at least this many fp32 values (16 MB)


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight is a torchao weight-only quantized tensor (or a bf16 one, `mode` "bf16");
    computes in `compute_dtype` (default: the weight's dtype)."""

    def __init__(self, linear: nn.Module, weight: torch.Tensor, mode: Storage, scratch: Scratch | None = None,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.mode = mode
        self.compute_dtype = compute_dtype or weight.dtype
        self.transposed = isinstance(linear, Conv1D)  # GPT-2 Conv1D: the checkpoint stores the weight (in, out)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight.checkpoint_shape = tuple(linear.weight.shape)  # fingerprints name the base's stored shapes
        self.weight.checkpoint_transposed = self.transposed  # ... and sample its stored layout
        self.register_parameter("bias", linear.bias)  # registered when None too (bitfit adds a missing bias)
        # torch's CPU int4 kernel is fast for bf16 activations only: with fp32 ones it ran 85x slower than an fp32
        # matmul (AVX2, 512x576 @ 576x1536); unpacking the layer's weight first and multiplying in fp32 costs 1.3x.
        self.unpack_to_multiply = mode in ("int4", "bf16") and self.compute_dtype == torch.float32
        self.scratch = scratch or Scratch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        rows = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        return _QuantizedMatmul.apply(rows, self.weight, bias, self).view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a dense (out, in) tensor in `compute_dtype`."""
        weight = self.weight.detach()
        if self.mode == "bf16":
            return weight.to(self.compute_dtype)
        if self.mode == "int8":
            return weight.dequantize().to(self.compute_dtype)
        if self._unpackable():
            return _unpack_int4(weight.qdata, weight.scale_and_zero, weight.block_size[1]).to(self.compute_dtype)
        return _int4_by_matmul(weight, self.in_features, self.compute_dtype)

    def weight_for_matmul(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop (default: all) of dequantized_weight() for one matmul: in fp32 written into the scratch
        buffer the model's quantized layers share (valid until the next layer's call), so a step does not allocate
        and free one dense weight per layer (freed between the step's activations, they fragmented the heap:
        +0.4-0.7 GB RSS at 1B int4). int4: `start` and `stop` are multiples of INT4_BLOCK_N (or `stop` the end)."""
        stop = self.out_features if stop is None else stop
        if not self._unpacks_into_scratch():
            return self.dequantized_weight()[start:stop]
        weight = self.weight.detach()
        out = self.scratch.take(stop - start, self.in_features)
        if self.mode == "bf16":
            return out.copy_(weight[start:stop])
        if self.mode == "int8":
            return torch.mul(weight.qdata[start:stop], weight.scale[start:stop].reshape(-1, 1), out=out)
        return _unpack_int4(weight.qdata[start:stop], weight.scale_and_zero[:, start:stop], weight.block_size[1],
                            out=out)

    def block_rows(self) -> int:
        """How many output rows weight_blocks() unpacks at once: what fits `scratch.block_elements` (int4: whole
        packing blocks), all of them when the weight is not unpacked into the scratch."""
        if not self._unpacks_into_scratch():
            return self.out_features
        rows = max(1, self.scratch.block_elements // self.in_features)
        return max(INT4_BLOCK_N, rows - rows % INT4_BLOCK_N) if self.mode == "int4" else rows

    def weight_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, those rows of the weight from weight_for_matmul), block_rows() rows at a time; each block is
        valid until the next is taken."""
        step = self.block_rows()
        for start in range(0, self.out_features, step):
            yield start, self.weight_for_matmul(start, min(start + step, self.out_features))

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + bias for 2-D `x`, from the weight unpacked block by block."""
        if self.block_rows() >= self.out_features:
            return F.linear(x, self.weight_for_matmul(), bias)
        out = x.new_empty(len(x), self.out_features)
        for start, weight in self.weight_blocks():
            stop = start + len(weight)
            out[:, start:stop] = F.linear(x, weight, None if bias is None else bias[start:stop])
        return out

    def multiply_transposed(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W for 2-D `grad` (the input gradient), from the weight unpacked block by block."""
        if self.block_rows() >= self.out_features:
            return grad @ self.weight_for_matmul().to(grad.dtype)
        out = grad.new_zeros(len(grad), self.in_features)
        for start, weight in self.weight_blocks():
            out.addmm_(grad[:, start:start + len(weight)], weight.to(grad.dtype))
        return out

    def _unpacks_into_scratch(self) -> bool:
        return self.compute_dtype == torch.float32 and (self.mode in ("int8", "bf16") or self._unpackable())

    def _unpackable(self) -> bool:
        return self.mode == "int4" and _int4_layout_known() and self.out_features % INT4_BLOCK_N == 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}" + \
            (", from Conv1D" if self.transposed else "")


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ W.T + b with a quantized W; dx from W dequantized for the backward only; db when b trains."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        with torch.autocast(x.device.type, enabled=False):
            out = layer.multiply(x, bias) if layer.unpack_to_multiply else F.linear(x, weight, bias)
        # torchao's kernels return a view of their result; returned from a custom Function, a view cannot be changed
        # in place by the model (Falcon: `mlp_output += attention_output`): return the result itself
        base = out._base
        if base is None or (base.shape, base.stride()) == (out.shape, out.stride()):
            return out if base is None else base
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        need_x, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x:
            grad_x = ctx.layer.multiply_transposed(grad)
        if need_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class Scratch:
    """One growable buffer for the dense weights the quantized layers of a model unpack for their matmuls, at most
    `block_elements` values at once (QuantizedLinear.weight_blocks)."""

    def __init__(self, block_elements: int = MIN_BLOCK_ELEMENTS) -> None:
        self.block_elements = block_elements
        self.buffer = torch.empty(0)

    def take(self, rows: int, columns: int) -> torch.Tensor:
        """A (rows, columns) fp32 view of the buffer (grown when too small); overwritten by the next call."""
        if self.buffer.numel() < rows * columns:
            self.buffer = torch.empty(0)  # free the old buffer before allocating the larger one
            self.buffer = torch.empty(rows * columns)
        return self.buffer[:rows * columns].view(rows, columns)



def quantize_base(model: nn.Module, mode: Storage, dtype: torch.dtype | None = None) -> int:
    """Replace every linear layer of `model` (nn.Linear, a subclass computing the same, GPT-2 Conv1D) outside its
    task heads (output embeddings, classifiers: they stay as they are, as in QLoRA) by a QuantizedLinear computing
    in `dtype` (default: each layer's own), in place, one layer at a time; layers the kernel cannot take (int4:
    in_features not a multiple of 32 or out_features not one of 16) stay as they are. With `dtype` fp32 an untied
    output head (a plain nn.Linear whose weight nothing else shares, and which the model only calls) is held in bf16
    too (mode "bf16"), multiplied in blocks of rows no larger than the largest other layer; the model is then marked
    as computing in fp32 (a delta attached later builds fp32 tensors: `deltatune_compute_dtype`). The other
    floating-point tensors are converted to `dtype` (mode "bf16": an untied input embedding table becomes bf16).
    Returns how many layers were replaced."""
    setting, fix = ("model.dtype: bf16 with model.compute_dtype: fp32", "use model.dtype: fp32") if mode == "bf16" \
        else ("model.quantize", "remove model.quantize")
    configs = {} if mode == "bf16" else _torchao_configs()
    if done := quantized_layers(model):
        raise ConfigError(f"{setting}: {type(model).__name__} is already quantized ({len(done)} int8/int4 layers, "
                          f"e.g. {done[0]}); quantize a model once, as it is loaded")
    targets = _quantizable(model)
    if not targets:
        raise ConfigError(f"{setting}: {type(model).__name__} has no linear layers (nn.Linear or GPT-2 Conv1D) "
                          f"outside its task heads; {fix}")
    head = _untied_head(model) if dtype == torch.float32 else None
    count, scratch = 0, Scratch(MIN_BLOCK_ELEMENTS)
    checkpoint = CheckpointPages()
    for name, linear in targets:
        source = linear.weight.detach().T if isinstance(linear, Conv1D) else linear.weight.detach()
        weight = checkpoint.copy(source, torch.bfloat16) if mode == "bf16" \
            else _quantized_weight(source.to(dtype or source.dtype), mode, configs)
        if weight is not None:
            scratch.block_elements = max(scratch.block_elements, source.numel())
            count += _replace(model, name, QuantizedLinear(linear, weight, mode, scratch, dtype), checkpoint)
    if head is not None:
        weight = checkpoint.copy(head[1].weight.detach(), torch.bfloat16)
        count += _replace(model, head[0], QuantizedLinear(head[1], weight, "bf16", scratch, dtype), checkpoint)
    if dtype == torch.float32:
        model.deltatune_compute_dtype = dtype
    if dtype is not None:
        _convert_unquantized(model, dtype, checkpoint, torch.bfloat16 if mode == "bf16" else None)
    return count


def _replace(model: nn.Module, name: str, layer: QuantizedLinear, checkpoint: CheckpointPages) -> int:
    """Put `layer` in place of the module `name` and release the replaced weight's checkpoint pages; returns 1."""
    parent, _, attr = name.rpartition(".")
    checkpoint.release(model.get_submodule(name).weight)
    setattr(model.get_submodule(parent), attr, layer)
    give_back_free_memory()
    return 1


def _untied_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, layer) of `model`'s output embeddings if they are a plain nn.Linear whose weight no other module
    shares (an LM head not tied to the input embeddings) and that its parent only calls, else None."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if type(head) is not nn.Linear:
        return None
    if sum(p is head.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return None
    name = next(name for name, module in model.named_modules() if module is head)
    parent, _, attr = name.rpartition(".")
    return None if _reads_weight(model.get_submodule(parent), attr) else (name, head)


def _reads_weight(parent: nn.Module, attr: str) -> bool:
    """Whether `parent`'s forward reads its child `attr`'s weight itself (Mamba2, xLSTM: the hidden states cast to
    `self.lm_head.weight.dtype`, which a bf16-held head would round to bf16; or the weight multiplied directly)."""
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):  # no source (built in, or defined interactively): the forward is taken as it is
        return False
    return f"self.{attr}.weight" in source


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the linear layers quantize_base replaces: outside the heads, of a type computing F.linear."""
    heads = describe(model).heads
    linear_types: dict[type, bool] = {}
    found = []
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in heads) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if type(module) not in linear_types:
            linear_types[type(module)] = _computes_linear(module)
        if linear_types[type(module)]:
            found.append((name, module))
    return found


def _computes_linear(module: nn.Module) -> bool:
    """Whether `module` (an nn.Linear subclass or Conv1D) computes x @ W.T + b (W.T for Conv1D), on a probe input."""
    if type(module) in (nn.Linear, Conv1D):
        return True
    weight = module.weight.detach().float()
    weight = weight.T if isinstance(module, Conv1D) else weight
    bias = None if module.bias is None else module.bias.detach().float()
    x = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = module(x.to(module.weight.dtype)).float()
    return torch.allclose(out, F.linear(x, weight, bias), rtol=1e-2, atol=1e-2 * float(out.abs().max()) + 1e-6)


def give_back_free_memory() -> None:
    """Return glibc's free heap pages to the system. Quantizing a layer allocates fp32 temporaries several times its
    int8 result; freed between long-lived small tensors they fragment the heap (a 0.5B int8 load peaked at 2.8x its
    final weights without this after each layer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _convert_unquantized(model: nn.Module, dtype: torch.dtype, checkpoint: CheckpointPages,
                         table_dtype: torch.dtype | None = None) -> None:
    """The tensors outside the QuantizedLinear weights in `dtype` (convert_loaded), each as a copy: none may stay a
    view of the memory-mapped checkpoint, whose touched pages would stay resident with it. The input embedding
    table becomes `table_dtype` (default: stays as stored) when that is narrower than `dtype`: it is only looked up,
    and its rows are cast to `dtype` on the way out (exact), which saves half its memory (1 GB for Llama-3-8B's in
    fp32)."""
    table = _lookup_only_embeddings(model, dtype, table_dtype)
    quantized = [m.weight for m in model.modules() if isinstance(m, QuantizedLinear)]
    convert_loaded(model, dtype, checkpoint, copy=True, keep=[*quantized, *([table.weight] if table else [])])
    if table is not None:
        table.weight.data = checkpoint.copy(table.weight.data, table_dtype or table.weight.dtype)
        table.register_forward_hook(partial(_cast_output, dtype=dtype))


def convert_loaded(model: nn.Module, dtype: torch.dtype, checkpoint: CheckpointPages, *, copy: bool = False,
                   keep: Sequence[torch.Tensor] = ()) -> None:
    """Every floating-point tensor `model` loads from a checkpoint (its state dict: parameters and persistent
    buffers, not e.g. a rotary inv_freq that transformers keeps fp32) in `dtype`, in place, one at a time and a
    chunk at a time (`CheckpointPages.copy`): the model never holds a second full copy, nor the pages of the
    checkpoint it has already converted. Tensors already in `dtype` stay as they are unless `copy`; `keep` ones
    are left alone."""
    skip = {id(t) for t in keep}
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in skip and t.is_floating_point() and (copy or t.dtype != dtype):
            skip.add(id(t))  # a tied tensor is listed under each of its names
            t.data = checkpoint.copy(t.data, dtype)


def _lookup_only_embeddings(model: nn.Module, dtype: torch.dtype,
                            table_dtype: torch.dtype | None) -> nn.Embedding | None:
    """The model's input nn.Embedding if it is not shared with the output head and `table_dtype` (default: its
    weight's) is narrower than `dtype`."""
    table = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if type(table) is not nn.Embedding or (head is not None and head.weight is table.weight):
        return None
    return table if (table_dtype or table.weight.dtype).itemsize < dtype.itemsize else None


def _cast_output(module: nn.Module, args: Any, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return output.to(dtype)


class CheckpointPages:
    """The process's memory mappings of *.safetensors files (the checkpoint a model was loaded from, views of which
    are its tensors until converted). `release(tensor)` unmaps the resident pages wholly inside a tensor that is
    being replaced (madvise MADV_DONTNEED): they stay in the page cache but leave the process's RSS, which otherwise
    holds every page read until the last view is gone (a 1B int4 load peaked at 3.6 GB RSS, 2.1 GB of it checkpoint
    pages). Tensors outside those mappings are left alone. Linux + glibc only; elsewhere a no-op."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                lines = maps.read().splitlines() if _LIBC is not None else []
        except OSError:
            lines = []
        for fields in (line.split(maxsplit=5) for line in lines):
            if len(fields) == 6 and fields[5].endswith(".safetensors"):
                self.ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))  # type: ignore[arg-type]

    def release(self, tensor: torch.Tensor) -> None:
        page = PAGE_SIZE
        start = -(-tensor.data_ptr() // page) * page
        end = (tensor.data_ptr() + tensor.nbytes) // page * page
        if end > start and any(low <= start and end <= high for low, high in self.ranges):
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

    def copy(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A new contiguous copy of `tensor` in `dtype`, made COPY_CHUNK_BYTES at a time, releasing each chunk's
        checkpoint pages once copied: a tensor's copy and its resident source never coexist whole (at 1B, the
        192 MB bf16 output head and its 384 MB fp32 copy)."""
        out = torch.empty(tensor.shape, dtype=dtype)
        source, target = tensor.reshape(-1), out.view(-1)
        step = max(1, COPY_CHUNK_BYTES // tensor.element_size())
        for start in range(0, source.numel(), step):
            target[start:start + step] = source[start:start + step]
            self.release(source[start:start + step])
        self.release(tensor)  # the pages straddling two chunks
        return out


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every QuantizedLinear by a plain nn.Linear holding its dequantized weight (in `dtype`, default the
    compute dtype): the base to load a delta onto for merging. Returns how many layers were replaced."""
    if attached := [name for name, m in model.named_modules() if isinstance(m, DeltaModule)]:
        raise ConfigError(f"dequantize_base: a delta is attached ({attached[0]}); dequantize the base before "
                          "attaching or loading a delta (detach it, or save it and load it onto the dequantized base)")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in layers:
        weight = layer.dequantized_weight().to(dtype or layer.compute_dtype)
        if layer.transposed:  # back to the GPT-2 Conv1D it was
            with torch.device("meta"):
                linear = Conv1D(layer.out_features, layer.in_features)
            weight = weight.T.contiguous()
        else:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = layer.bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)
    return len(layers)


# torch's CPU int4 packing (aten._convert_weight_to_int4pack_for_cpu): (N, K/2) bytes, blocks of 32 output rows;
# within a block byte k*16 + j holds rows j (low nibble) and 16 + j (high nibble) of input column k. Checked once
# per process against the kernel itself (_int4_layout_known); elsewhere the slow exact fallback is used.
INT4_BLOCK_N = 32


def _unpack_int4(packed: torch.Tensor, scale_and_zero: torch.Tensor, group: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) fp32 weight of a CPU int4-packed one: (q - 8) * scale + zero per group (tinygemm's rule),
    written into `out` (contiguous, (N, K) fp32) when given."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2).transpose(1, 2)  # (blocks, 16, K)
    dense = torch.empty(n, k) if out is None else out
    rows = dense.view(n // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, k)  # (blocks, low/high nibble, 16, K)
    rows[:, 0] = blocks & 0xF
    rows[:, 1] = blocks >> 4
    scale, zero = scale_and_zero[..., 0].T, scale_and_zero[..., 1].T  # (N, K / group)
    dense.view(n, -1, group).sub_(8).mul_(scale[..., None]).add_(zero[..., None])
    return dense


def _int4_by_matmul(weight: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight through the kernel itself (x = identity): exact for any layout, costs a K x K x N matmul."""
    return F.linear(torch.eye(in_features, dtype=dtype), weight).T.contiguous()


_LAYOUT_KNOWN: list[bool] = []


def _int4_layout_known() -> bool:
    """Whether _unpack_int4 reads this torch build's packing right (a small packed matrix, unpacked both ways)."""
    if not _LAYOUT_KNOWN:
        probe = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))  # the global RNG untouched
        weight = _torchao_configs()["int4"].from_hp(probe, [1, 32])
        unpacked = _unpack_int4(weight.qdata, weight.scale_and_zero, 32)
        _LAYOUT_KNOWN.append(torch.allclose(unpacked, _int4_by_matmul(weight, 64, torch.float32), atol=1e-5))
    return _LAYOUT_KNOWN[0]


def held_in_bf16(model: nn.Module) -> bool:
    """Whether `model` holds Linear weights in bf16 for fp32 compute (QuantizedLinear in storage format bf16)."""
    return any(isinstance(m, QuantizedLinear) and m.mode == "bf16" for m in model.modules())


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with every QuantizedLinear weight laid out as its checkpoint stores it (a GPT-2 Conv1D's:
    (in, out)), for save_pretrained."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear) and layer.transposed:
            state[f"{name}.weight"] = layer.weight.detach().T.contiguous()
    return state


def stored_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers as held: a quantized weight counts its packed data and scales."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        names = getattr(t, "tensor_data_names", None)
        total += sum(getattr(t, name).nbytes for name in names) if names else t.nbytes
    return total


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the int8 / int4 QuantizedLinear layers in `model` (not the bf16 ones: their weights are exact)."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.mode != "bf16"]


def _quantized_weight(weight: torch.Tensor, mode: Quantize, configs: dict[str, Any]) -> torch.Tensor | None:
    if mode == "int8":
        return configs["int8"].from_hp(weight, configs["per_row"]())
    group = next((g for g in INT4_GROUP_SIZES if weight.shape[1] % g == 0), None)
    if group is None or weight.shape[0] % INT4_OUT_MULTIPLE:
        return None
    return configs["int4"].from_hp(weight, [1, group])


def _torchao_configs() -> dict[str, Any]:
    """torchao's int8 / int4 CPU tensor classes; ConfigError when torchao is not installed."""
    try:
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow
    except ImportError as e:
        raise ConfigError(f"model.quantize needs torchao ({e}): pip install 'deltatune[quantize]', "
                          "or remove model.quantize") from e
    return {"int8": Int8Tensor, "int4": Int4OpaqueTensor, "per_row": PerRow}
