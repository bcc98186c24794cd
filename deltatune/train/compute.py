"""How the loop computes the training loss of a micro-batch (`TrainingLoss`), with the run's speed and memory
levers; bench/README.md records what each one measured. (Evaluation uses the chunked loss too: evaluation.py.)

* precision: bf16 autocast for forward and backward with fp32 master weights: every parameter (trainable or not)
  stays fp32, matmuls run in bf16, losses in fp32. `auto` picks bf16 where the device has native bf16 dot products
  (CPU: AVX512_BF16 or AMX; there it paid at every model width measured, bench/README.md); evaluation stays fp32.
* chunked LM loss (causal LM only): the next-token loss is computed from the final hidden states, only at
  target positions (labels != -100), through the output head in chunks; each chunk's gradient is taken at once
  (a fused linear + cross-entropy), so neither the full logits nor their gradient ever exist. A head held in bf16
  for fp32 compute (models/quantize.py) is upcast in blocks of vocabulary rows, each block once per call, and the
  loss runs over the blocks with a running log-sum-exp: its fp32 weight never exists whole either.
* activation checkpointing: transformers' non-reentrant checkpointing of every layer, switched on for each
  training forward only (so nothing is left on the model); inputs need not require grad, whatever is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.models.quantize import QuantizedLinear
from deltatune.train.metrics import logits_of

if TYPE_CHECKING:
    from deltatune.train.tasks import MultiTask, SingleTask

Precision = Literal["auto", "fp32", "bf16"]
# Causal LMs whose forward is exactly `logits = lm_head(hidden_states)` (no logit scaling or soft-capping),
# checked in transformers' modeling files; other models get the plain loss.
CHUNKABLE = frozenset({"gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt_neox", "phi", "phi3", "olmo2",
                       "gemma", "smollm3"})
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32)


# ---- precision ----------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 dot products natively (AVX512_BF16 or AMX), so bf16 matmuls are fast."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(setting: Precision, model: nn.Module) -> torch.dtype | None:
    """The autocast dtype for `setting` (None = plain fp32); `auto` is fp32 for a model asked to compute in fp32
    (a bf16-held base with model.compute_dtype fp32)."""
    if setting == "fp32" or (setting == "auto" and getattr(_unwrap(model), "deltatune_compute_dtype", None)
                             == torch.float32):
        return None
    if setting == "bf16":
        return torch.bfloat16
    device = next(model.parameters()).device
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    return torch.bfloat16 if fast else None


def fp32_master_weights(params: Iterable[nn.Parameter]) -> int:
    """Keep trainable tensors in fp32 (in place, same Parameter objects) so optimizer states are fp32 too; returns
    how many were converted from a reduced precision."""
    converted = 0
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            converted += 1
    return converted


# ---- chunked causal-LM loss -----------------------------------------------------------------------------------
def output_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the LM head of a chunkable causal LM whose head is a plain nn.Linear or one
    held in bf16 for fp32 compute, else None (a delta wrapping the head, e.g. LoRA on lm_head, and FSDP-sharded
    models get the plain loss)."""
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "model_type", None) not in CHUNKABLE or _sharded(model):
        return None
    head = inner.get_output_embeddings() if callable(getattr(inner, "get_output_embeddings", None)) else None
    if type(head) is not nn.Linear and not _held(head):
        return None
    name = next(n for n, m in inner.named_modules() if m is head)
    parent, _, attr = name.rpartition(".")
    return inner.get_submodule(parent), attr


@contextmanager
def hidden_states_out(where: tuple[nn.Module, str]) -> Iterator[nn.Linear]:
    """Swap the LM head for an identity while the model runs, so its "logits" are the final hidden states."""
    parent, attr = where
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def lm_loss_sum(model: nn.Module, where: tuple[nn.Module, str], inputs: dict[str, torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (as metrics.loss_sum) without materialising the logits."""
    targets = labels[:, 1:]
    keep = targets != -100
    with hidden_states_out(where) as head:
        hidden = logits_of(model(**inputs))
    return linear_cross_entropy(hidden[:, :-1][keep], targets[keep], head)


def linear_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """sum(cross_entropy(head(hidden), targets)) over rows, in chunks of rows, differentiable in `hidden` and the
    head's weight and bias. Under autocast the head runs in the autocast dtype (its weight cast once per call); a
    head held in bf16 for fp32 compute runs in fp32 from its weight's blocks (its weight never trains)."""
    if _held(head):
        return _BlockedHeadCE.apply(hidden, head.bias, targets, head, torch.is_grad_enabled())
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    chunks = max(1, math.ceil(len(targets) * head.weight.shape[0] / CHUNK_ELEMENTS))
    chunk = max(1, math.ceil(len(targets) / chunks))  # equal chunks: a short last one multiplies slowly
    return _FusedLinearCE.apply(hidden, head.weight.to(dtype), bias, targets, chunk, torch.is_grad_enabled())


def _held(head: nn.Module) -> bool:
    """Whether `head` is a QuantizedLinear holding bf16 weights for fp32 compute (the untied LM head of a base held
    in bf16 / int8 / int4 with fp32 compute)."""
    return isinstance(head, QuantizedLinear) and head.mode == "bf16" and head.compute_dtype == torch.float32


class _FusedLinearCE(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T + bias`, chunk by chunk: each chunk's logits give its loss and, right
    away, the gradients (softmax - one-hot), then are freed; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grad_enabled: bool) -> torch.Tensor:
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), chunk):
                rows, target = hidden[start:start + chunk].to(weight.dtype), targets[start:start + chunk, None]
                logits = F.linear(rows, weight, bias).float()
                picked, peak = logits.gather(1, target), logits.amax(-1, keepdim=True)
                probs = logits.sub_(peak).exp_()  # in place, and one exp: softmax = probs / norm
                norm = probs.sum(-1, keepdim=True)
                total += (norm.log() + peak - picked).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad = probs.div_(norm).scatter_add_(1, target, -torch.ones_like(norm)).to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad @ weight
                if grad_weight is not None:
                    grad_weight += grad.T @ rows
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_out,
                None if grad_weight is None else (grad_weight * grad_out).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_out).to(bias_dtype), None, None, None)


class _BlockedHeadCE(torch.autograd.Function):
    """Cross-entropy of `head(hidden)` for a held head, its weight upcast one block of vocabulary rows at a time
    (QuantizedLinear.weight_blocks), each block once: for every chunk of rows, a running max and sum of exp(logits)
    give the log-sum-exp, and the running sum of exp(logits) @ block (rescaled as the max grows) gives
    softmax @ W; the hidden gradient is then softmax @ W - W[target]. The bias gradient, when the bias trains,
    takes a second pass over the blocks (it needs the final log-sum-exp)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                head: QuantizedLinear, grad_enabled: bool) -> torch.Tensor:
        need_hidden, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            rows = hidden.detach().float()
            peak = rows.new_full((len(rows),), -torch.inf)
            sums, target_logits = rows.new_zeros(len(rows)), rows.new_zeros(len(rows))
            soft = torch.zeros_like(rows) if need_hidden else None  # sum of exp(logit - peak) * W[v]
            picked = torch.zeros_like(rows) if need_hidden else None  # W[target]
            for where, start, weight, logits in _head_blocks(rows, head, bias):
                inside = (targets[where] - start).clamp(0, len(weight) - 1)  # the target's row in this block
                hit = targets[where] == inside + start
                target_logits[where] += logits.gather(1, inside[:, None])[:, 0] * hit
                if picked is not None:
                    picked[where] += weight[inside] * hit[:, None]
                new_peak = torch.maximum(peak[where], logits.amax(1))
                scale = (peak[where] - new_peak).exp_()
                exp = logits.sub_(new_peak[:, None]).exp_()
                sums[where] = sums[where] * scale + exp.sum(1)
                if soft is not None:
                    soft[where].mul_(scale[:, None]).addmm_(exp, weight)
                peak[where] = new_peak
            lse = peak + sums.log()
            grad_hidden = (soft / sums[:, None] - picked).to(hidden.dtype) if need_hidden else None
            grad_bias = _bias_grad(rows, head, bias, targets, lse) if need_bias else None
        ctx.save_for_backward(grad_hidden, grad_bias)
        return (lse - target_logits).sum()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_bias = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_out,
                None if grad_bias is None else grad_bias * grad_out, None, None, None)


def _head_blocks(rows: torch.Tensor, head: QuantizedLinear,
                 bias: torch.Tensor | None) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
    """(rows slice, first vocabulary row, fp32 weight block, fp32 logits of those rows for that block), for every
    block of the head's weight and every chunk of rows (at most CHUNK_ELEMENTS logits)."""
    if not len(rows):
        return
    for start, weight in head.weight_blocks():
        chunk = max(1, CHUNK_ELEMENTS // len(weight))
        part = None if bias is None else bias[start:start + len(weight)].float()
        for first in range(0, len(rows), chunk):
            where = slice(first, first + chunk)
            yield where, start, weight, F.linear(rows[where], weight, part)


def _bias_grad(rows: torch.Tensor, head: QuantizedLinear, bias: torch.Tensor, targets: torch.Tensor,
               lse: torch.Tensor) -> torch.Tensor:
    """d loss / d bias = sum over rows of softmax - one-hot(target), recomputed block by block."""
    grad = torch.zeros(head.out_features, dtype=torch.float32, device=rows.device)
    for where, start, weight, logits in _head_blocks(rows, head, bias):
        grad[start:start + len(weight)] += logits.sub_(lse[where, None]).exp_().sum(0)
    return grad.index_add_(0, targets, -torch.ones_like(lse)).to(bias.dtype)


# ---- the loop's loss ---------------------------------------------------------------------------------------
class TrainingLoss:
    """The summed loss of a training micro-batch (`task.loss_sum` of the model's output), computed with the run's
    precision (autocast), chunked LM-head loss and activation checkpointing settings."""

    def __init__(self, model: nn.Module, task: SingleTask | MultiTask, precision: Precision = "auto",
                 chunked_loss: bool = True, checkpointing: bool = False):
        self.model, self.task = model, task
        self.dtype = resolve_precision(precision, model)
        self.head = output_head(model) if chunked_loss and getattr(task, "kind", None) == "text" else None
        self.checkpointing = checkpointing
        if checkpointing and not getattr(_unwrap(model), "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing: {type(_unwrap(model)).__name__} does not support activation "
                              "checkpointing in transformers; set train.gradient_checkpointing: false")

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of `batch` (its model inputs and its labels)."""
        inputs = model_inputs(batch)
        autocast = torch.autocast(_device(self.model).type, self.dtype) if self.dtype else nullcontext()
        with autocast, checkpointed(self.model) if self.checkpointing else nullcontext():
            if hasattr(self.task, "forward_loss_sum"):  # an objective that runs the model itself (preference.py)
                return self.task.forward_loss_sum(self.model, inputs, batch)
            if self.head is not None:
                return lm_loss_sum(self.model, self.head, inputs, batch["labels"])
            return self.task.loss_sum(logits_of(self.model(**inputs)), batch)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without what is for the loop: labels, and the real-token count of packed batches."""
    return {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


@contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing (non-reentrant) for the forwards inside; the model is left as it was found."""
    inner = _unwrap(model)
    if inner.is_activation_checkpointing:
        yield
        return
    had_input_hooks = bool(getattr(inner, "_require_grads_hooks", None))
    inner.activation_checkpointing_enable({"use_reentrant": False})
    if not had_input_hooks:  # non-reentrant checkpointing does not need inputs that require grad
        inner.disable_input_require_grads()
    try:
        yield
    finally:
        inner.activation_checkpointing_disable()


def _sharded(model: nn.Module) -> bool:
    """FSDP (1 or 2) shards the head's weight outside its own forward: such models get the plain loss."""
    return any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in (model, _unwrap(model)))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel-style wrapper (`.module`), or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
