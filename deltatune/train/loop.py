"""The training loop: one flat function, `train`, that trains any delta on any task. Read it top to bottom.

Outputs in `out_dir`:
  best/                the delta with the best validation metric (`delta.save` format) -- the result of the run;
                       without a validation split it is the final delta. On return the delta holds these weights.
  checkpoints/step-N/  the newest `keep_checkpoints` training states (see checkpoint.py); the newest one also has
                       the last weights, so no separate `last/` folder is written.
  metrics.jsonl/.csv   logged train steps and evaluations (see metrics.MetricsLog)
  results.json         the TrainResult

The loop talks to everything else through small objects: the objective (tasks.py: loss, units, metrics), the
delta's contract (`extra_loss`), `compute.TrainingLoss` (a micro-batch's loss), `optim.OptimizerStep` (gradient
norm and update, for optimizers that update after backward or inside it), `distributed.Parallel` (ranks),
`memory.HeapPolicy` (once per step) and `TrainState` (what a checkpoint restores).
"""

from __future__ import annotations

import functools
import math
import random
import resource
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from deltatune import storage
from deltatune.data.batching import example_lengths, real_tokens
from deltatune.delta import TENSOR_FILE, DeltaBase
from deltatune.errors import CheckpointError, ConfigError, DataError, DeltaTuneError
from deltatune.optim import OptimizerConfig, OptimizerStep, build_step, check_train_settings
from deltatune.schema import MAX_BATCH, MAX_COUNT, MAX_SCALE, MAX_SEED, MAX_THREADS, Schema
from deltatune.train import checkpoint, compute, distributed
from deltatune.train.interrupt import StopRequests, TrainingInterrupted
from deltatune.train.memory import HeapPolicy
from deltatune.train.metrics import MetricsLog, improved
from deltatune.train.neftune import NEFTune
from deltatune.train.tasks import objective

if TYPE_CHECKING:
    from deltatune.data import TaskData
    from deltatune.data.multitask import MultiTaskData

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
# Changing these between a run and its resume would make the restored data position meaningless.
TRAJECTORY_KEYS = ("batch_size", "grad_accum", "seed", "length_grouping")


class TrainConfig(Schema):
    """How to train. Steps are optimizer steps (one step = `grad_accum` batches of `batch_size`)."""

    section = "train"

    epochs: int = Field(3, ge=1, le=MAX_COUNT, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT,
                                  description="stop after N optimizer steps at most (or after "
                                              "`epochs`, whichever comes first)")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="examples per batch (the global batch under torchrun)")
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH,
                                        description="batch size of evaluation; unset: batch_size")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, le=MAX_SCALE,
                                        description="clip the gradient norm; null: no clipping")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="optimizer and LR schedule")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the split, data order, dropout and new weights")
    eval_every: int | None = Field(None, ge=1, le=MAX_COUNT,
                                   description="also validate every N steps (validation always runs "
                                               "at every epoch end and at the last step)")
    metric: str | None = Field(None, description="validation metric that picks the best delta and drives "
                                                 "patience; default accuracy (classification) or loss")
    patience: int | None = Field(None, ge=1, le=MAX_COUNT,
                                 description="early stopping: stop after N validations without "
                                             "improvement of `metric`; null: never stop early")
    checkpoint_every: int | None = Field(None, ge=1, le=MAX_COUNT,
                                         description="also checkpoint every N steps (checkpoints are "
                                                     "always written at every epoch end and the last step)")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_COUNT, description="the newest N checkpoints are kept")
    log_every: int = Field(1, ge=1, le=MAX_COUNT,
                           description="train rows in metrics.jsonl/csv (and TensorBoard): every step")
    num_threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch threads; unset: torch's default")
    length_grouping: bool = Field(False,
                                  description="batches of similar lengths (less padding), still a seeded random order")
    parallel: Literal["ddp", "fsdp"] = Field("ddp",
                                             description="under torchrun (see distributed.py); fsdp: full fine-tuning")
    eval_baseline: bool = Field(True, description="evaluate the untrained model first (validation + test)")
    # Speed and memory levers (train/compute.py; measured in bench/README.md)
    precision: compute.Precision = Field("auto",
                                       description="bf16 autocast (fp32 master weights) where the CPU has native bf16")
    chunked_loss: bool = Field(True, description="causal LM: loss through the head in chunks, never the full logits")
    gradient_checkpointing: bool = Field(False,
                                         description="recompute activations in backward: less memory, ~30% slower")
    neftune_alpha: float | None = Field(None, gt=0, le=MAX_SCALE,
                                        description="NEFTune: uniform noise of alpha/sqrt(length·width) on the input "
                                                    "embeddings in training only (paper: 5-15); null: off")


@dataclass
class TrainResult:
    metric: str
    baseline: dict[str, dict[str, float]] | None  # split -> metrics of the model before training
    best_validation: dict[str, float] | None
    best_step: int | None
    test: dict[str, float] | None  # with the best delta
    steps: int
    epochs: float
    stopped_early: bool
    wall_time_s: float  # across resumes (time lost between the last checkpoint and an interruption excluded)
    train_tokens_per_s: float  # real tokens (attention_mask ones) per second of training steps
    peak_rss_mb: float
    trainable_params: int
    total_params: int
    examples: dict[str, int] | None = None  # split -> number of examples (train, validation, test)
    generation: dict[str, Any] | None = None  # eval_generation: file, examples, base and fine_tuned metrics
    predictions: dict[str, Any] | None = None  # predictions.jsonl: split, examples, majority-class baseline


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where a checkpoint was taken (a checkpoint's state.json)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the data position: an epoch's order depends only on (seed, epoch), so it is just
    batch: int = 0  # (epoch, index of the next batch in that order)
    best: float | None = None  # the best validation `metric` so far, its step and all metrics of that validation
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0  # validations since the best one (train.patience)
    stopped_early: bool = False
    elapsed: float = 0.0  # wall time so far, across resumes
    train_time: float = 0.0  # seconds inside training steps, and the real tokens they saw (tokens/s)
    tokens: int = 0
    baseline: dict[str, dict[str, float]] | None = None  # split -> metrics of the model before training
    config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig (JSON): what a resume may change
    run: dict[str, Any] | None = None  # the caller's record of the run (config and data hashes)

    @classmethod
    def of(cls, ck: checkpoint.Checkpoint) -> TrainState:
        """The state saved in checkpoint `ck` (the same keys since checkpoints were first written)."""
        try:
            return TypeAdapter(cls).validate_python({**ck.state, "step": ck.step})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CheckpointError(f"{ck.path / 'state.json'} is not a training state ({problems}); resume from "
                                  "another checkpoint or start a new run") from None

    def validated(self, scores: dict[str, float], metric: str, patience: int | None) -> bool:
        """Record a validation at this step: True when it is the best so far; `patience` validations without
        improvement stop the run early."""
        if improved(scores[metric], self.best, metric):
            self.best, self.best_step, self.best_metrics, self.bad_evals = scores[metric], self.step, scores, 0
            return True
        self.bad_evals += 1
        if patience and self.bad_evals >= patience:
            self.stopped_early = True
        return False


def train(model: nn.Module, delta: DeltaBase, data: TaskData | MultiTaskData, cfg: TrainConfig,
          out_dir: str | Path, *, collate: Collate, resume: bool = False,
          on_event: Callable[[str, dict[str, Any]], None] | None = None,
          record: dict[str, Any] | None = None) -> TrainResult:
    """Train `delta` (attached to `model`) on `data` (a TaskData, or a MultiTaskData: see train/tasks.py);
    see the module docstring for the outputs.

    `resume=True` continues from the newest good checkpoint in `out_dir/checkpoints` and ends with exactly the
    weights and loss curve of an uninterrupted run (bitwise on CPU), given the same config. Only the length may
    change (`epochs`, `max_steps`): the LR schedule is then the one of a run planned with the new length from the
    start (same warmup steps), continued from the step reached. `record` (the run's config and data hashes) is
    saved in every checkpoint. SIGINT / SIGTERM stop at the next step boundary after saving a checkpoint
    (`TrainingInterrupted`). The process's heap follows `memory.HeapPolicy` while training.
    """
    with StopRequests() as stop, HeapPolicy(model) as heap, NEFTune(model, cfg.neftune_alpha):
        return _train(model, delta, data, cfg, Path(out_dir), collate, resume, on_event, record, stop, heap)


def _train(model: nn.Module, delta: DeltaBase, data: TaskData | MultiTaskData, cfg: TrainConfig, out_dir: Path,
           collate: Collate, resume: bool, on_event: Callable[[str, dict[str, Any]], None] | None,
           record: dict[str, Any] | None, stop: StopRequests, heap: HeapPolicy) -> TrainResult:
    emit = on_event or (lambda kind, info: None)
    task = objective(data, delta)  # loss, units and metrics of the task, or of several tasks (tasks.py)
    metric = cfg.metric or task.default_metric
    task.check_metric(metric)
    if len(data.train) == 0:
        raise DataError("the training split is empty: nothing to train on")
    check_train_settings(cfg.optimizer, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                         world_size=distributed.rank_and_world()[1])
    ckpt_root, eval_bs = out_dir / "checkpoints", cfg.eval_batch_size or cfg.batch_size
    if not resume and checkpoint.checkpoint_dirs(ckpt_root):
        raise CheckpointError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with resume=True, "
                              "or use a new output folder")

    # Every source of randomness is seeded here (and overwritten from the checkpoint on resume).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    params = list(delta.trainable_parameters().values())
    compute.fp32_master_weights(params)  # a bf16 base trains fp32 deltas, with fp32 optimizer states
    trainable, total = delta.parameter_counts()
    steps_per_epoch, total_steps = _steps_per_epoch(cfg, len(data.train)), planned_steps(cfg, len(data.train))
    updates = build_step(model, delta, cfg.optimizer, total_steps)  # optimizer + LR schedule
    par = distributed.setup(model, delta, cfg.parallel, cfg.optimizer.name)  # torchrun: DDP / FSDP; else no-op
    train_collate = par.sharded(collate)  # this rank's shard of each global batch
    loss_of = compute.TrainingLoss(par.model, task, cfg.precision, cfg.chunked_loss, cfg.gradient_checkpointing)
    lengths = example_lengths(data.train) if cfg.length_grouping else None
    epoch_batches = functools.lru_cache(1)(lambda epoch: data.epoch_batches(cfg.batch_size, cfg.seed, epoch, lengths))
    log = MetricsLog(out_dir, task.metrics) if par.main else distributed.NO_LOG
    has_validation, has_test = len(data.validation) > 0, len(data.test) > 0

    st, last_ckpt = TrainState(config=cfg.model_dump(mode="json"), run=record), None
    if resume:  # the delta, optimizer, schedule, RNG and loop state of the newest good checkpoint
        saved, last_ckpt = _restore(ckpt_root, cfg, total_steps, out_dir, par, delta, updates)
        st = replace(saved, config=st.config, run=record)
    clock = time.perf_counter() - st.elapsed  # elapsed time continues across resumes

    def save_checkpoint() -> Path:
        st.elapsed = time.perf_counter() - clock
        return par.save_checkpoint(ckpt_root, st.step, delta=delta, optimizer=updates.optimizer,
                                   scheduler=updates.scheduler, state=asdict(st), keep=cfg.keep_checkpoints)

    log.start(resume_step=st.step if resume else None)
    emit("start", {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs,
                   "trainable": trainable, "total": total, "resumed_from_step": st.step if resume else None})
    if not resume and cfg.eval_baseline:  # the "base" column of the base vs fine-tuned table
        st.baseline = {}
        for split in [s for s, present in (("validation", has_validation), ("test", has_test)) if present]:
            st.baseline[split] = task.evaluate(par.model, getattr(data, split), collate, eval_bs)
            log.write({"kind": "baseline", "split": split, "step": 0, "epoch": 0.0, **st.baseline[split]})
            emit("eval", {"split": split, "step": 0, "epoch": 0.0, "baseline": True, "metrics": st.baseline[split]})

    model.train()
    window_tokens, window_time = 0, 0.0
    while not st.stopped_early and st.step < total_steps:
        if par.sum(float(stop.signum is not None))[0]:  # every rank stops at the same step boundary
            if last_ckpt != checkpoint.checkpoint_path(ckpt_root, st.step):
                last_ckpt = save_checkpoint()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, st.step, last_ckpt)
        batches = epoch_batches(st.epoch)
        t0 = time.perf_counter()
        par.seed_step(cfg.seed, st.step)
        group = [train_collate([data.train[i] for i in idx]) for idx in batches[st.batch:st.batch + cfg.grad_accum]]
        # Normalise by the units (examples or target tokens) of the whole step, over all ranks: accumulating
        # (or splitting the batch over ranks) equals one big batch.
        step_units = max(par.sum(sum(task.units(b) for b in group))[0], 1)
        step_loss, tokens, batch_losses = 0.0, 0, []
        for batch in group:
            batch = compute.to_device(batch, params[0].device)
            part = task.units(batch) / step_units
            loss = loss_of(batch) / step_units
            if (extra := delta.extra_loss()) is not None:  # a method's auxiliary loss (the contract)
                loss = loss + extra * part
            par.backward(loss)
            batch_losses.append(float(loss.detach()))
            step_loss += batch_losses[-1]
            tokens += real_tokens(batch)
        step_loss, tokens = par.sum(step_loss, tokens)
        grad_norm = updates.grad_norm(clip=lambda: par.clip_grad_norm(params, cfg.max_grad_norm))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # never step into NaN weights
            raise _non_finite(step_loss, grad_norm, st, updates, last_ckpt)
        lr = updates.lr
        updates.step()
        heap.after_step()
        st.step, st.batch = st.step + 1, st.batch + len(group)
        epoch_pos = st.epoch + st.batch / len(batches)
        end_of_epoch = st.batch >= len(batches)
        if end_of_epoch:
            st.epoch, st.batch = st.epoch + 1, 0
        seconds = time.perf_counter() - t0
        st.tokens, st.train_time = st.tokens + tokens, st.train_time + seconds
        window_tokens, window_time = window_tokens + tokens, window_time + seconds
        emit("step", {"step": st.step, "epoch": epoch_pos, "loss": step_loss, "lr": lr, "tokens": tokens,
                      "seconds": seconds})
        last = st.step == total_steps
        if st.step % cfg.log_every == 0 or last:
            log.write({"kind": "train", "step": st.step, "epoch": epoch_pos, "loss": step_loss, "lr": lr,
                       "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(window_time, 1e-9),
                       "elapsed": time.perf_counter() - clock,
                       **task.step_losses(group, [x * step_units for x in batch_losses])})
            window_tokens, window_time = 0, 0.0

        if has_validation and (end_of_epoch or last or (cfg.eval_every and st.step % cfg.eval_every == 0)):
            scores = task.evaluate(par.model, data.validation, collate, eval_bs)
            log.write({"kind": "eval", "split": "validation", "step": st.step, "epoch": epoch_pos, **scores,
                       "elapsed": time.perf_counter() - clock})
            emit("eval", {"split": "validation", "step": st.step, "epoch": epoch_pos, "metrics": scores})
            if st.validated(scores, metric, cfg.patience):
                _save_delta(delta, out_dir / "best", par)
        if end_of_epoch or last or st.stopped_early or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0):
            last_ckpt = save_checkpoint()
            emit("checkpoint", {"step": st.step, "path": str(last_ckpt)})
        if st.stopped_early:
            emit("early_stop", {"step": st.step, "epoch": epoch_pos, "metric": metric, "best": st.best,
                                "best_step": st.best_step, "patience": cfg.patience})

    if par.sum(float(stop.signum is not None))[0]:  # during the last step: its checkpoint is saved already
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, st.step, last_ckpt)
    updates.close()  # a later backward pass on the model must not update the weights
    par.finish()  # plain full weights on every rank again; rank 0's files are written
    # The result is the best delta (or the final one without a validation split); test it with those weights.
    if st.best_step is None:
        _save_delta(delta, out_dir / "best", par)
        par.barrier()
    else:
        delta.load_state_dict(storage.load_tensors(out_dir / "best" / TENSOR_FILE))
    epochs = st.step / steps_per_epoch
    test = task.evaluate(model, data.test, collate, eval_bs) if has_test else None
    if test is not None:
        log.write({"kind": "final", "split": "test", "step": st.step, "epoch": epochs, **test,
                   "elapsed": time.perf_counter() - clock})
        emit("eval", {"split": "test", "step": st.step, "epoch": epochs, "metrics": test, "final": True})
    result = TrainResult(
        metric=metric, baseline=st.baseline, best_validation=st.best_metrics, best_step=st.best_step, test=test,
        steps=st.step, epochs=round(epochs, 4), stopped_early=st.stopped_early,
        wall_time_s=time.perf_counter() - clock, train_tokens_per_s=st.tokens / max(st.train_time, 1e-9),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        trainable_params=trainable, total_params=total,
        examples={split: len(getattr(data, split)) for split in ("train", "validation", "test")})
    if par.main:
        storage.write_json(out_dir / "results.json", asdict(result))
    emit("end", asdict(result))
    return result


def _restore(ckpt_root: Path, cfg: TrainConfig, total_steps: int, out_dir: Path, par: distributed.Parallel,
             delta: DeltaBase, updates: OptimizerStep) -> tuple[TrainState, Path]:
    ck = checkpoint.load_latest(ckpt_root)
    check_resumable(ck, cfg, total_steps, out_dir)
    par.load_checkpoint(ck, delta, updates.optimizer)
    updates.restore_schedule(ck.scheduler, total_steps)
    checkpoint.set_rng_state(ck.rng)
    par.barrier()  # every rank has read it before rank 0 renames anything
    if par.main:
        checkpoint.set_aside_newer(ckpt_root, ck.step)  # broken newer ones would shadow the new checkpoints
    return TrainState.of(ck), ck.path


def _non_finite(loss: float, grad_norm: float, st: TrainState, updates: OptimizerStep,
                last_ckpt: Path | None) -> DeltaTuneError:
    return DeltaTuneError(
        f"the training loss is {loss} (gradient norm {float(grad_norm)}) at step {st.step + 1} "
        f"(epoch {st.epoch + 1}); training stopped before the weights were updated"
        f"{' (per-layer: tensors with finite gradients were)' if updates.in_backward else ''}. The last good "
        f"checkpoint is kept: {last_ckpt or 'none written yet'}. Try a lower learning rate or check the data.")


def _save_delta(delta: DeltaBase, folder: Path, par: distributed.Parallel) -> None:
    """Save the delta atomically (rank 0, with full tensors): `folder` is never half-written."""
    with par.full_params():
        if par.main:
            checkpoint.save_delta(delta, folder)


def planned_steps(cfg: TrainConfig, examples: int) -> int:
    """The optimizer steps of a run over `examples` training examples: all epochs, capped by max_steps."""
    return min(cfg.epochs * _steps_per_epoch(cfg, examples), cfg.max_steps or math.inf)


def _steps_per_epoch(cfg: TrainConfig, examples: int) -> int:
    return math.ceil(math.ceil(examples / cfg.batch_size) / cfg.grad_accum)


def check_resumable(ck: checkpoint.Checkpoint, cfg: TrainConfig, total_steps: int, out_dir: Path) -> None:
    """ConfigError unless resuming `ck` with `cfg` (`total_steps` long) continues the same trajectory (data order,
    optimizer, LR) for at least the steps taken, and trains if it is longer."""
    state = TrainState.of(ck)
    saved = state.config
    changed = [f"{k}: {saved.get(k)!r} → {v!r}" for k, v in cfg.model_dump(mode="json").items()
               if k in (*TRAJECTORY_KEYS, "optimizer") and saved.get(k) != v]
    if changed:
        raise ConfigError(f"cannot resume {out_dir} with other settings than the run used: {'; '.join(changed)}")
    if total_steps < ck.step:
        raise ConfigError(f"cannot resume {out_dir}: it is at step {ck.step} already, but epochs / max_steps now "
                          f"allow only {total_steps} steps")
    if state.stopped_early and total_steps > ck.step:
        raise ConfigError(f"cannot extend {out_dir}: it stopped early at step {ck.step} (train.patience: no "
                          "improvement), so more epochs / max_steps would train nothing; start a new run in another "
                          "folder")
