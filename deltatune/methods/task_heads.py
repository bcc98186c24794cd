"""Task heads for multi-task fine-tuning: one head per task on a shared body, picked by the forward call's task.

The model's head is replaced by a `TaskHeadSwitch` (a DeltaModule) holding, per task,
  * classification: a fresh Linear to the task's labels;  * regression: a fresh Linear to one output;
  * text (causal LM): the model's own LM head plus a per-task bias over the vocabulary (zero at start).
The active task comes from the model's `routing.TaskRouter` (the `task` keyword of the forward call). On a causal
LM (the head is the output embedding) classification/regression heads read the last real token's hidden state,
as sequence-classification models do; on a classification model they read what the old head read (the pooled
output, or every position with the model pooling afterwards, as GPT-2/Llama `score` heads).

`uncertainty: true` adds learnable log-variances s (one per task, zero at start) used by the multi-task loss
(Kendall et al. 2018; see train/tasks.py). They live in the switch, so they train and save with the delta.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from deltatune import routing
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import TargetError
from deltatune.registry import register
from deltatune.schema import MAX_LABELS, Schema
from deltatune.targeting import DeltaModule, check_not_taken, head_module_name


class TaskHead(Schema):
    """One task's head: its name, kind and outputs."""

    section = "task_heads.tasks"

    name: str = Field(description="task name (letters, digits, _ and -)")
    kind: Literal["classification", "regression", "text"] = Field("classification", description="the task's head")
    num_labels: int | None = Field(None, ge=1, le=MAX_LABELS, description="classes (classification; or give labels)")
    labels: list[str] | None = Field(None, min_length=1, description="class names (classification)")

    _plain_name = field_validator("name")(routing.check_task_name)

    @model_validator(mode="after")
    def _outputs_fit_kind(self) -> TaskHead:
        if self.kind == "classification" and self.outputs is None:
            raise ValueError(f"classification task {self.name!r} needs labels or num_labels")
        if self.kind != "classification" and (self.labels or self.num_labels):
            raise ValueError(f"{self.kind} task {self.name!r} takes no labels or num_labels")
        if self.labels and self.num_labels and len(self.labels) != self.num_labels:
            raise ValueError(f"num_labels={self.num_labels} but {len(self.labels)} labels are given")
        return self

    @property
    def outputs(self) -> int | None:
        if self.kind == "regression":
            return 1
        return len(self.labels) if self.labels else self.num_labels


class TaskHeads(DeltaConfig):
    """Multi-task heads: the tasks, which head module to replace, and learnable loss log-variances."""

    tasks: list[TaskHead] = Field(min_length=1, description="one head per task, in the order of task ids",
                                  examples=[[{"name": "sentiment", "num_labels": 2}]])
    module: str | None = Field(None, description="the head module to replace; default: the model's known head")
    uncertainty: bool = Field(False, description="learn one loss log-variance per task (Kendall et al. 2018)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_schemas(cls, value: object) -> object:
        return [TaskHead(**t) if isinstance(t, dict) else t for t in value] if isinstance(value, list) else value

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[TaskHead]) -> list[TaskHead]:
        names = [t.name for t in tasks]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must be distinct; repeated: {', '.join(dupes)}")
        return tasks


class TaskHeadSwitch(DeltaModule):
    """The heads of all tasks in place of the model's head; computes the router's active task."""

    owner_method = "task_heads"

    def __init__(self, original: nn.Linear, tasks: list[TaskHead], pool: bool, uncertainty: bool):
        super().__init__()
        like = dict(device=original.weight.device, dtype=original.weight.dtype)
        self.kinds = {t.name: t.kind for t in tasks}
        self.heads = nn.ModuleDict({t.name: nn.Linear(original.in_features, t.outputs, **like)
                                    for t in tasks if t.kind != "text"})
        text = [t.name for t in tasks if t.kind == "text"]
        self.lm = original if text else None
        self.lm_bias = nn.ParameterDict({n: nn.Parameter(torch.zeros(original.out_features, **like)) for n in text})
        self.log_vars = nn.Parameter(torch.zeros(len(tasks), **like)) if uncertainty else None
        self.pool = pool
        self.router: routing.TaskRouter | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        task = self.router.active
        if self.kinds[task] == "text":
            return self.lm(hidden) + self.lm_bias[task]
        if self.pool:
            hidden = last_token(hidden, self.router.attention_mask)
        return self.heads[task](hidden)


def _added_to_logits(model: nn.Module, head: nn.Linear) -> str | None:
    """Name of a vocabulary-sized vector the model itself (not a submodule) holds next to its LM head, which it adds
    to the logits (BART's `final_logits_bias`), or None."""
    tensors = (*model.named_parameters(recurse=False), *model.named_buffers(recurse=False))
    return next((n for n, t in tensors if t.dim() and t.numel() == head.out_features), None)


def last_token(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The hidden state of each row's last real token (left or right padding); the last position without a mask."""
    if mask is None:
        return hidden[:, -1]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@register("task_heads")
class TaskHeadsDelta(Delta[TaskHeads]):
    """Multi-task heads: one classification / regression / LM head per task, chosen by the forward's task."""

    role = "head"
    preserves_output = False
    per_task = False  # it is the per-task head already

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        name = head_module_name(self.model, cfg.module)
        head = self.model.get_submodule(name)
        if not isinstance(head, nn.Linear):  # e.g. RoBERTa's classifier: dense + out_proj; replace the last Linear
            inner = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
            if not inner:
                raise TargetError(f"head {name!r} ({type(head).__name__}) has no Linear to replace; name it with "
                                  "`module`")
            name, head = f"{name}.{inner[-1][0]}", inner[-1][1]
        check_not_taken({name: head})
        get_output = getattr(self.model, "get_output_embeddings", None)
        pool = get_output is not None and get_output() is head
        if not pool and (text := [t.name for t in cfg.tasks if t.kind == "text"]):
            raise TargetError(f"text tasks ({', '.join(text)}) need a causal LM, but {name!r} of "
                              f"{type(self.model).__name__} is not its LM head; load the model for causal LM")
        if pool and any(t.kind != "text" for t in cfg.tasks) and (added := _added_to_logits(self.model, head)):
            raise TargetError(f"{type(self.model).__name__} adds {added!r} (one value per vocabulary entry) to the "
                              f"output of its LM head {name!r}, so a classification or regression head cannot take "
                              "its place; load the model for sequence classification, or use only text tasks")
        switch = TaskHeadSwitch(head, cfg.tasks, pool, cfg.uncertainty)
        self.swap(name, switch)
        switch.router = routing.join(self.model, [t.name for t in cfg.tasks])  # last: nothing after this fails
        self.switch = switch
        params = [*switch.heads.parameters(), *switch.lm_bias.values()]
        return params + ([switch.log_vars] if switch.log_vars is not None else [])

    def restore(self) -> None:
        routing.leave(self.model)

    @property
    def log_vars(self) -> nn.Parameter | None:
        """The learnable loss log-variances (one per task, in task order), or None without uncertainty weighting."""
        return self.switch.log_vars
