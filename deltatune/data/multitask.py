"""Multi-task data: the tasks' tokenized splits side by side, and a seeded plan of one-task batches per epoch.

Every split is a `MixedSplit`: example i of the concatenated tasks, tagged with its task id (`"task"`), so the
training loop indexes one sequence as for a single task. An epoch is ceil(N / batch_size) batches (N = all
training examples, as for one task); `epoch_batches` decides which task each batch comes from:

  proportional  quotas by task size: every example about once per epoch (a task's share = n_t / N)
  temperature   shares ~ n_t^(1/T) (T = 1: proportional; larger T: flatter, small tasks repeated more)
  uniform       equal shares (T -> infinity)
  round_robin   tasks in turn, 0, 1, ..., K-1, 0, ... (continuing across epochs)

The quotas' batches come in a seeded random order (round-robin: fixed). Each task reads its examples from its own
endless stream of seeded permutations (pass k of task t shuffled by (seed, t, k)), batch_size at a time, so a task
whose quota exceeds its data repeats it and a smaller quota leaves the rest for the next epoch. Everything depends
only on (seed, epoch): the loop's data position (epoch, batch index) restores a run exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

from deltatune.data.batching import length_grouped_order
from deltatune.data.prepare import TaskData

Sampling = Literal["proportional", "temperature", "uniform", "round_robin"]
SAMPLINGS: tuple[str, ...] = Sampling.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task run: name, kind (the data format), metric for model selection, loss weight."""

    name: str
    kind: str
    metric: str
    weight: float = 1.0
    label_names: list[str] | None = None


class MixedSplit(Sequence):
    """One split of every task, concatenated: item i is an example of task `task_of(i)` with a "task" key."""

    def __init__(self, parts: Sequence[Sequence[dict[str, Any]]]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *map(len, self.parts)]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        task = self.task_of(i)
        return {**self.parts[task][i - self.offsets[task]], "task": task}

    def task_of(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a split of {len(self)}")
        return bisect_right(self.offsets, i) - 1

    def task_view(self, task: int) -> MixedSplit:
        """Only task `task`'s examples (still tagged with the task id)."""
        return _TaskView(self.parts[task], task)


class _TaskView(MixedSplit):
    def __init__(self, part: Sequence[dict[str, Any]], task: int):
        super().__init__([part])
        self.task = task

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return {**self.parts[0][i], "task": self.task}


@dataclass
class MultiTaskData:
    """The tasks' data (`parts[i]` is task i's TaskData) and how batches are drawn from them."""

    tasks: list[TaskSpec]
    parts: list[TaskData]
    sampling: str = "proportional"
    temperature: float = 2.0
    weighting: str = "fixed"  # or "uncertainty": learnable loss log-variances (train/tasks.py)
    label_names: None = None  # the model keeps its own head size: task heads replace it
    num_labels: None = None
    splits: dict[str, MixedSplit] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.splits = {s: MixedSplit([getattr(p, s) for p in self.parts]) for s in ("train", "validation", "test")}

    @property
    def train(self) -> MixedSplit:
        return self.splits["train"]

    @property
    def validation(self) -> MixedSplit:
        return self.splits["validation"]

    @property
    def test(self) -> MixedSplit:
        return self.splits["test"]

    @property
    def source(self) -> dict[str, dict[str, Any]]:
        """`<task>/<split>` -> what `TaskData.source` says about that split."""
        return {f"{t.name}/{s}": info for t, p in zip(self.tasks, self.parts) for s, info in p.source.items()}

    @property
    def chat_template(self) -> str | None:
        """The chat template of the first task rendered with one (chat formats), for generation after training."""
        return next((p.chat_template for p in self.parts if p.chat_template is not None), None)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int,
                      lengths: Sequence[int] | None = None) -> list[list[int]]:
        """The batches of `epoch` (indices into `train`), each from one task; `lengths` (of `train`'s examples)
        makes every pass of a task length-grouped instead of plainly shuffled."""
        sizes = [len(p.train) for p in self.parts]
        total = math.ceil(sum(sizes) / batch_size)
        order, start = epoch_tasks(sizes, self.sampling, self.temperature, total, seed, epoch)
        offsets = self.train.offsets
        streams = [TaskStream(n, batch_size, (seed, t), lengths and lengths[offsets[t]:offsets[t + 1]])
                   for t, n in enumerate(sizes)]
        used = list(start)
        batches = []
        for t in order:
            batches.append([offsets[t] + i for i in streams[t].batch(used[t])])
            used[t] += 1
        return batches


def task_shares(sizes: Sequence[int], sampling: str, temperature: float) -> np.ndarray:
    """The probability of drawing a batch from each task."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    n = np.asarray(sizes, dtype=np.float64)
    weights = {"proportional": n, "temperature": n ** (1 / temperature)}.get(sampling, np.ones_like(n))
    return weights / weights.sum()


def quotas(shares: np.ndarray, total: int) -> list[int]:
    """Integer batch counts summing to `total`, closest to shares * total (largest remainders; ties: lower id)."""
    exact = shares * total
    counts = np.floor(exact).astype(int)
    for t in sorted(range(len(shares)), key=lambda t: -(exact[t] - counts[t]))[:total - counts.sum()]:
        counts[t] += 1
    return counts.tolist()


def epoch_tasks(sizes: Sequence[int], sampling: str, temperature: float, total: int, seed: int,
                epoch: int) -> tuple[list[int], list[int]]:
    """(task of each of the epoch's `total` batches, batches each task has served in the epochs before)."""
    k = len(sizes)
    if sampling == "round_robin":
        first = epoch * total
        return [(first + i) % k for i in range(total)], [max(0, -(-(first - t) // k)) for t in range(k)]
    counts = quotas(task_shares(sizes, sampling, temperature), total)
    order = np.repeat(np.arange(k), counts)
    np.random.default_rng([seed, epoch]).shuffle(order)
    return order.tolist(), [epoch * c for c in counts]


class TaskStream:
    """A task's examples as an endless sequence of seeded passes (permutations), read batch_size at a time."""

    def __init__(self, size: int, batch_size: int, seed: tuple[int, ...], lengths: Sequence[int] | None = None):
        self.size, self.batch_size, self.seed, self.lengths = size, batch_size, seed, lengths
        self.passes: dict[int, list[int]] = {}

    def batch(self, index: int) -> list[int]:
        """The example indices of the task's `index`-th batch (it may span the end of one pass and the next)."""
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        return [self.order(p // self.size)[p % self.size] for p in positions]

    def order(self, k: int) -> list[int]:
        if k not in self.passes:
            seed = int(np.random.SeedSequence([*self.seed, k]).generate_state(1)[0])
            self.passes[k] = (np.random.default_rng(seed).permutation(self.size).tolist() if self.lengths is None
                              else [int(i) for i in length_grouped_order(self.lengths, self.batch_size, seed)])
        return self.passes[k]


@dataclass(frozen=True)
class TaskCollator:
    """Collate one task's examples with `collate`, and add the batch's task id ("task", a 0-dim tensor)."""

    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tasks = {ex["task"] for ex in examples}
        if len(tasks) != 1:
            raise ValueError(f"a batch must hold examples of one task, got tasks {sorted(tasks)}")
        return {**self.collate(list(examples)), "task": torch.tensor(tasks.pop())}
