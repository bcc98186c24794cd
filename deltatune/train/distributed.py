"""Data-parallel training under `torchrun`: DDP for any delta, FSDP for full fine-tuning. One process per device.

`torchrun --nproc_per_node N -m deltatune train cfg.yaml` starts N copies of the same run (gloo on CPU, NCCL on
GPU). Every rank builds the same epoch order (it depends only on seed and epoch), so the data position in a
checkpoint is global and exact resume works as in one process. Each global batch of `train.batch_size` examples
is cut into N contiguous shards, one per rank.

Exactness: the loop divides every loss by the units (examples or target tokens) of the whole optimizer step,
summed over the ranks (`sum`), so the rank gradients add up to the single-process gradient. DDP and FSDP
average gradients over the ranks, so each rank backpropagates `world * loss` (`backward`). A rank whose shard
of a small last batch is empty runs one example whose labels are ignored (-100 / NaN: zero loss and units),
because every rank must join every gradient reduction.

Only rank 0 writes (logs, checkpoints, the delta); every rank reads the checkpoint on resume, so a multi-node
run needs `output_dir` on storage all nodes can read. Evaluation is sharded over the ranks in lockstep (FSDP
forwards are collective) and the metric states are gathered. Dropout is reseeded per (seed, step, rank), so
resuming is exact for any number of ranks' RNG streams without saving them.

FSDP (FullyShardedDataParallel, `use_orig_params`) wraps every layer of the stack: parameters, gradients and
optimizer states are sharded, a layer's weights are gathered only while it runs. Checkpoints and the saved
delta hold full tensors (gathered on rank 0), and `finish()` puts the full weights back into the plain model.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deltatune.delta import base_fingerprint
from deltatune.errors import CheckpointError, ConfigError
from deltatune.fingerprint import check_same_base
from deltatune.models.quantize import quantized_layers
from deltatune.registry import methods
from deltatune.train import checkpoint

if TYPE_CHECKING:
    from deltatune.delta import DeltaBase
    from deltatune.train.metrics import MetricState


def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks) of this process: from the process group, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain, single-process run): the one process that writes and prints."""
    return rank_and_world()[0] == 0


class Parallel:
    """The loop's view of the ranks: a single process is the identity case of every method."""

    def __init__(self, model: nn.Module, wrapped: nn.Module | None = None, fsdp: bool = False):
        self.base = model
        self.model = wrapped or model  # what the loop calls forward on
        self.fsdp = fsdp
        self.rank, self.world = rank_and_world()

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- one training step ---------------------------------------------------------------------------------
    def sharded(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> Callable:
        """`collate` for a global batch that keeps this rank's contiguous shard of it."""
        if self.world == 1:
            return collate

        def collate_shard(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            part = np.array_split(np.arange(len(examples)), self.world)[self.rank]
            if len(part):
                return collate([examples[i] for i in part])
            batch = collate(examples[:1])  # nothing left for this rank: one example that counts for nothing
            labels = batch["labels"]
            batch["labels"] = torch.full_like(labels, torch.nan if labels.is_floating_point() else -100)
            batch["num_tokens"] = torch.tensor(0)  # nor for tokens/s (batching.real_tokens)
            return batch

        return collate_shard

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so integer counts stay exact)."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return [type(v)(t) for v, t in zip(values, total.tolist())]

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's share of the step loss; the wrapper's gradient average becomes a sum."""
        (loss * self.world if self.world > 1 else loss).backward()

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float | None) -> float:
        """Global gradient norm (clipped to `max_norm` when given); FSDP computes it over the shards."""
        if self.fsdp:
            return float(self.model.clip_grad_norm_(max_norm or float("inf")))
        if max_norm:
            return float(nn.utils.clip_grad_norm_(params, max_norm))
        return float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed dropout from (seed, step, rank): every rank's random stream is then a function of the step."""
        if self.world > 1:
            torch.manual_seed(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0]))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- state: full tensors in and out --------------------------------------------------------------------
    @contextmanager
    def full_params(self, writeback: bool = False) -> Iterator[None]:
        """FSDP: the delta's tensors hold their full values inside (on rank 0 only, unless `writeback`)."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=writeback, rank0_only=not writeback):
            yield

    def save_checkpoint(self, root: Path, step: int, *, optimizer: torch.optim.Optimizer, **parts: Any) -> Path:
        """`checkpoint.save_checkpoint` with full tensors, written by rank 0 (every rank must call it)."""
        state = self._optimizer_state(optimizer)
        with self.full_params():
            if self.main:
                checkpoint.save_checkpoint(root, step, optimizer=_StateOnly(state), **parts)
        return checkpoint.checkpoint_path(root, step)

    def load_checkpoint(self, ckpt: checkpoint.Checkpoint, delta: DeltaBase, optimizer: torch.optim.Optimizer) -> None:
        """Put a checkpoint's delta and optimizer state into this rank's (sharded) model and optimizer."""
        check_same_base(ckpt.base, base_fingerprint(delta.model))
        with self.full_params(writeback=True):
            delta.load_state_dict(ckpt.delta)
        by_name = isinstance(ckpt.optimizer["param_groups"][0]["params"][0], str)  # written by an FSDP run
        if not by_name:
            if self.fsdp:
                raise CheckpointError(f"{ckpt.path} was written without FSDP: resume it with train.parallel: ddp")
            optimizer.load_state_dict(ckpt.optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # by parameter name: into FSDP shards, or (any number of ranks, one process) into a plain optimizer
        set_optimizer_state_dict(self.model, optimizer, ckpt.optimizer,
                                 options=StateDictOptions(full_state_dict=True))

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # Keyed by parameter name. GPU shards are gathered to rank 0's CPU memory; on CPU that "offload" is a
        # no-op `.cpu()` whose results alias one reused gather buffer (torch 2.13), so there every rank gathers.
        offload = self._device().type == "cuda"
        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=offload))

    def finish(self) -> None:
        """End of training: FSDP puts the full weights back into the plain model on every rank; all wait for
        rank 0's files."""
        if self.fsdp:
            with self.full_params(writeback=True):
                full = {p: p.detach().clone() for p in self.base.parameters()}
            _unwrap_fsdp(self.base)
            for p, value in full.items():
                p.data = value
            self.model, self.fsdp = self.base, False
        self.barrier()

    def _device(self) -> torch.device:
        return next(self.base.parameters()).device


class _NoLog:
    """MetricsLog of the ranks that do not write."""

    def start(self, resume_step: int | None) -> None:
        pass

    def write(self, row: dict[str, Any]) -> None:
        pass


NO_LOG = _NoLog()


class _StateOnly:
    """An optimizer stand-in for `checkpoint.save_checkpoint`: only its (already gathered) state dict."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def setup(model: nn.Module, delta: DeltaBase, strategy: str = "ddp", optimizer_name: str = "adamw") -> Parallel:
    """Join the process group torchrun describes (if any) and wrap `model` for it; a no-op in one process."""
    if rank_and_world()[1] == 1:
        return Parallel(model)
    if strategy == "fsdp":
        _check_fsdp(delta, optimizer_name)
    device = _join_group()
    model.to(device)
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        from deltatune.arch import describe

        layers = {model.get_submodule(name) for name in describe(model).layers}
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: module in layers)
        return Parallel(model, FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=device),
                        fsdp=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # int8 / int4 weights (torchao tensors) cannot be broadcast; every rank quantized the same checkpoint
    DDP._set_params_and_buffers_to_ignore_for_model(model, [f"{name}.weight" for name in quantized_layers(model)])
    # every delta tensor takes part in every forward; buffers (position ids, ...) never change in training
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    return Parallel(model, ddp)


def _join_group() -> torch.device:
    """Initialise the default process group once (NCCL on GPUs, else gloo); this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return device


def _check_fsdp(delta: DeltaBase, optimizer_name: str) -> None:
    if others := sorted({part.method for part in delta.parts() if not part.fsdp}):
        sharded = ", ".join(name for name, m in methods().items() if m.delta_class.fsdp)
        raise ConfigError(f"train.parallel: fsdp shards full fine-tuning ({sharded}); "
                          f"{', '.join(others)} trains few parameters: use train.parallel: ddp")
    if optimizer_name.startswith("galore"):
        raise ConfigError("train.parallel: fsdp cannot shard GaLore's projected optimizer states; "
                          "use train.parallel: ddp or another optimizer")


def _unwrap_fsdp(model: nn.Module) -> None:
    """Replace every FSDP unit inside `model` by the module it wraps (the tree as it was before wrapping)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name, module in list(model.named_modules()):
        if isinstance(module, FSDP):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.module)


# ---- evaluation --------------------------------------------------------------------------------------------
def eval_batches(n: int, batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """This rank's evaluation batches as (example indices, counts); ranks with fewer real batches repeat
    example 0 (not counted) so that every rank runs the same number of forwards."""
    rank, world = rank_and_world()
    if world > 1 and not dist.is_initialized():
        rank, world = 0, 1  # torchrun environment, but this process evaluates on its own
    share = np.array_split(np.arange(n), world)
    rounds = max(-(-len(s) // batch_size) for s in share)
    mine = share[rank].tolist()
    for start in range(0, rounds * batch_size, batch_size):
        rows = mine[start:start + batch_size]
        yield (rows, True) if rows else ([0], False)


def gather_metrics(state: MetricState) -> MetricState:
    """Combine the ranks' metric states of one split (loss sums and units add up; predictions concatenate)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    device = _comm_device()
    totals = torch.tensor([state.loss, state.units], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    state.loss, state.units = totals[0].item(), int(totals[1].item())
    if state.task == "classification":
        state.preds, state.labels = ([_gather_1d(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), device)]
                                     for rows in (state.preds, state.labels))
    return state


def _gather_1d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All ranks' 1-D tensors (of different lengths), concatenated in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(t)], device=device))
    longest = int(max(sizes))
    parts = [torch.zeros(longest, dtype=t.dtype, device=device) for _ in sizes]
    dist.all_gather(parts, torch.cat([t.to(device), t.new_zeros(longest - len(t), device=device)]))
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).cpu()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


