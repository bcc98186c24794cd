"""What the training loop optimises and measures: one task, or several tasks trained together.

`objective(data, delta)` gives the loop a `SingleTask` (TaskData) or a `MultiTask` (MultiTaskData); both have
`units(batch)`, `loss_sum(logits, batch)`, `evaluate(...)`, `metrics`, `default_metric` and `check_metric`.

Multi-task loss of a batch of task t, with L_t its mean loss (over examples, or target tokens for text):
  fixed weights  w_t * L_t
  uncertainty    c_t * exp(-s_t) * L_t + s_t / 2    (Kendall et al. 2018, s_t = log sigma_t^2 learned with the
                 delta; c_t = 1/2 for regression, a Gaussian likelihood, 1 for classification / text, a softmax one)
For fixed L_t the uncertainty term is smallest at s_t = log(2 c_t L_t): a task with a larger loss gets a smaller
weight. A batch counts as one unit, so an accumulated step averages its batches' losses.

Per-task metrics are named `<task>/<metric>`; `macro/<metric>` averages a metric every task has (macro/accuracy
for classification tasks), and `loss` is the mean of the tasks' losses. With uncertainty weighting, evaluations
also report each task's `<task>/log_var`.

Configs: `tasks:` (a list of TaskConfig, instead of `data:`) and `multitask:` (MultiTaskConfig) in a run config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from deltatune import routing
from deltatune.data import DataConfig, TaskData, prepare_data
from deltatune.data.formats import FORMATS
from deltatune.data.multitask import MixedSplit, MultiTaskData, TaskSpec
from deltatune.errors import ConfigError, problems_error
from deltatune.registry import method_of
from deltatune.schema import MAX_SCALE, Schema
from deltatune.train.evaluation import evaluate
from deltatune.train.distributed import rank_and_world
from deltatune.train.metrics import METRICS, check_metric, check_task, default_metric, loss_sum, units

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from deltatune.delta import DeltaBase, DeltaConfig

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
UNCERTAINTY_FACTOR = {"classification": 1.0, "regression": 0.5, "text": 1.0}


class TaskConfig(Schema):
    """One task of a multi-task run (an item of `tasks:`)."""

    section = "tasks"

    name: str = Field(description="task name (letters, digits, _ and -); metrics are logged as <name>/<metric>",
                      examples=["sentiment"])
    data: DataConfig = Field(description="the task's data, as a single-task `data:` section; its format is the "
                                         "kind of its head (classification, regression, text)")
    metric: str | None = Field(None, description="the task's metric in the macro average; default accuracy "
                                                 "(classification) or loss")
    weight: float = Field(1.0, gt=0, le=MAX_SCALE, description="loss weight (weighting: fixed)")

    _plain_name = field_validator("name")(routing.check_task_name)

    @model_validator(mode="after")
    def _metric_fits_format(self) -> TaskConfig:
        kind = FORMATS[self.data.format].task if self.data.format in FORMATS else "text"  # auto: an LM format
        if self.metric is not None and self.metric not in METRICS[kind]:
            raise ValueError(f"unknown metric {self.metric!r} for a {self.data.format} task; "
                             f"available: {', '.join(METRICS[kind])}")
        if self.data.packing:
            raise ValueError("data.packing is not supported in multi-task runs; remove it")
        return self


class MultiTaskConfig(Schema):
    """How the tasks of a multi-task run share the training (the `multitask:` section)."""

    section = "multitask"

    sampling: Literal["proportional", "temperature", "uniform", "round_robin"] = Field(
        "proportional", description="which task each batch comes from (see data/multitask.py)")
    temperature: float = Field(2.0, gt=0, le=MAX_SCALE, description="T of temperature sampling: shares ~ size^(1/T)")
    weighting: Literal["fixed", "uncertainty"] = Field(
        "fixed", description="fixed: the tasks' `weight`; uncertainty: learned log-variances (Kendall et al. 2018)")


def parse_task_configs(value: Any) -> Any:
    """Build each `tasks:` item through its Schema, so errors read `tasks.1.data.labels: ...`."""
    if not isinstance(value, list):
        return value
    out = []
    for i, item in enumerate(value):
        try:
            out.append(TaskConfig(**item) if isinstance(item, dict) else item)
        except ConfigError as exc:
            raise problems_error([([str(i), *loc], text) for loc, text in exc.problems]) from None
    return out


def check_run_tasks(tasks: list[TaskConfig], multitask: MultiTaskConfig, deltas: Sequence[DeltaConfig]) -> None:
    """Settings that do not fit together (ValueError with what to change)."""
    names = [t.name for t in tasks]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"tasks: task names must be distinct; repeated: {', '.join(dupes)}")
    if multitask.weighting == "uncertainty" and (fixed := [t.name for t in tasks if t.weight != 1]):
        raise ValueError(f"tasks {', '.join(fixed)} set a weight, but weighting: uncertainty learns the weights; "
                         "remove `weight` or use weighting: fixed")
    if heads := [d.method for d in deltas if method_of(d).delta_class.role == "head"]:
        raise ValueError(f"delta: remove `{heads[0]}`: with `tasks:` every task gets its own head (task_heads) "
                         "from its data")


def prepare_tasks(tasks: list[TaskConfig], multitask: MultiTaskConfig | None, tokenizer: PreTrainedTokenizerBase,
                  seed: int = 0, model_max_length: int | None = None) -> MultiTaskData:
    """Read, split and tokenize every task's data (as `prepare_data` does for one task)."""
    multitask = multitask or MultiTaskConfig()
    parts = [prepare_data(t.data, tokenizer, seed=seed, model_max_length=model_max_length) for t in tasks]
    specs = [TaskSpec(t.name, p.task, t.metric or default_metric(p.task), t.weight, p.label_names)
             for t, p in zip(tasks, parts)]
    for split in ("validation", "test"):
        present = [t.name for t, p in zip(tasks, parts) if len(getattr(p, split))]
        if present and len(present) != len(tasks):
            missing = [t.name for t in tasks if t.name not in present]
            raise ConfigError(f"tasks {', '.join(present)} have a {split} split but {', '.join(missing)} not: give "
                              f"every task a {split} split (file or data.split fraction) or none")
    return MultiTaskData(specs, parts, multitask.sampling, multitask.temperature, multitask.weighting)


def task_deltas(deltas: list[DeltaConfig], data: TaskData | MultiTaskData) -> list[DeltaConfig]:
    """The deltas a run attaches: as configured, and for multi-task data the task heads first (so that `full`
    trains everything but them), per-task deltas naming the tasks."""
    if not isinstance(data, MultiTaskData):
        return deltas
    from deltatune.methods.per_task import PerTask
    from deltatune.methods.task_heads import TaskHeads

    names = [t.name for t in data.tasks]
    heads = TaskHeads(tasks=[{"name": t.name, "kind": t.kind, "labels": t.label_names} for t in data.tasks],
                      uncertainty=data.weighting == "uncertainty")
    return [heads, *(d.model_copy(update={"tasks": names}) if isinstance(d, PerTask) and d.tasks is None else d
                     for d in deltas)]


# ---- objectives --------------------------------------------------------------------------------------------------
class SingleTask:
    """One task of kind `kind` (classification, regression, text): the functions of metrics.py."""

    def __init__(self, kind: str):
        check_task(kind)
        self.kind = kind
        self.metrics: tuple[str, ...] = METRICS[kind]
        self.default_metric = default_metric(kind)

    def check_metric(self, metric: str) -> None:
        check_metric(metric, self.kind)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return units(batch["labels"], self.kind)

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(logits, batch["labels"], self.kind)

    def step_losses(self, batches: list[dict[str, torch.Tensor]], losses: list[float]) -> dict[str, float]:
        """Extra fields of a train row: none for one task (its `loss` is the step's)."""
        return {}

    def evaluate(self, model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Collate,
                 batch_size: int) -> dict[str, float]:
        return evaluate(model, dataset, collate, self.kind, batch_size)


class MultiTask:
    """Several tasks: batches of one task each (with a "task" id), weighted losses, per-task and macro metrics."""

    def __init__(self, tasks: list[TaskSpec], log_vars: nn.Parameter | None = None):
        self.tasks, self.log_vars = tasks, log_vars
        shared = [m for m in METRICS[tasks[0].kind] if all(m in METRICS[t.kind] for t in tasks)]
        self.choices = ["loss", *(f"{t.name}/{m}" for t in tasks for m in METRICS[t.kind]),
                        *(f"macro/{m}" for m in shared)]
        log_var_names = [f"{t.name}/log_var" for t in tasks] if log_vars is not None else []
        self.metrics = (*self.choices, *log_var_names)
        self.shared = shared

    @property
    def default_metric(self) -> str:
        chosen = {t.metric for t in self.tasks}
        if len(chosen) > 1:
            raise ConfigError("the tasks use different metrics (" + ", ".join(f"{t.name}: {t.metric}" for t in
                              self.tasks) + "), so there is no macro average to select the best delta by; give "
                              "every task the same `metric` (e.g. loss), or set train.metric, e.g. "
                              f"{self.tasks[0].name}/{self.tasks[0].metric}")
        return f"macro/{chosen.pop()}"

    def check_metric(self, metric: str) -> None:
        if metric not in self.choices:
            raise ConfigError(f"unknown metric {metric!r} for tasks {', '.join(t.name for t in self.tasks)}; "
                              f"available: {', '.join(self.choices)}")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return 1

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        t = int(batch["task"])
        kind, labels = self.tasks[t].kind, batch["labels"]
        mean = loss_sum(logits, labels, kind) / max(units(labels, kind), 1)
        if self.log_vars is None:
            return self.tasks[t].weight * mean
        s = self.log_vars[t]
        return UNCERTAINTY_FACTOR[kind] * torch.exp(-s) * mean + s / 2

    def step_losses(self, batches: list[dict[str, torch.Tensor]], losses: list[float]) -> dict[str, float]:
        """`<task>/loss` of the tasks a step's batches came from: the mean of their (weighted) batch losses, so
        that each task gets its own training curve (a step's `loss` mixes whichever tasks were drawn)."""
        by_task: dict[str, list[float]] = {}
        for batch, loss in zip(batches, losses):
            by_task.setdefault(f"{self.tasks[int(batch['task'])].name}/loss", []).append(loss)
        return {name: sum(values) / len(values) for name, values in by_task.items()}

    def evaluate(self, model: nn.Module, dataset: MixedSplit, collate: Collate, batch_size: int) -> dict[str, float]:
        per_task = [evaluate(model, dataset.task_view(i), collate, t.kind, batch_size)
                    for i, t in enumerate(self.tasks)]
        scores = {"loss": sum(s["loss"] for s in per_task) / len(per_task)}
        scores |= {f"{t.name}/{m}": v for t, s in zip(self.tasks, per_task) for m, v in s.items()}
        scores |= {f"macro/{m}": sum(s[m] for s in per_task) / len(per_task) for m in self.shared}
        if self.log_vars is not None:
            scores |= {f"{t.name}/log_var": float(v) for t, v in zip(self.tasks, self.log_vars.detach())}
        return scores


def objective(data: TaskData | MultiTaskData, delta: DeltaBase) -> SingleTask | MultiTask:
    """The loop's objective for `data`; multi-task data needs the task_heads delta made for its tasks."""
    if not isinstance(data, MultiTaskData):
        return SingleTask(data.task)
    if rank_and_world()[1] > 1:
        raise ConfigError("multi-task training runs in one process: the other tasks' heads (and per-task copies) "
                          "get no gradient in a step, which DDP/FSDP cannot reduce; run without torchrun")
    from deltatune.methods.task_heads import TaskHeadsDelta

    heads = [part for part in delta.parts() if isinstance(part, TaskHeadsDelta)]
    expected = [(t.name, t.kind) for t in data.tasks]
    found = [(h.name, h.kind) for h in heads[0].config.tasks] if heads else None
    if found != expected:
        raise ConfigError(f"multi-task data with tasks {expected} needs the task_heads delta for exactly these tasks "
                          f"(attached: {found or 'none'}); build it with train.tasks.task_deltas")
    return MultiTask(data.tasks, heads[0].log_vars)
