"""Which task a multi-task model computes: a `TaskRouter` per model, fed by the `task` keyword of a forward call.

Task-aware deltas (`task_heads`, `per_task`) join the model's router when they attach and leave it on detach.
While any is attached, a forward pre-hook takes `task` out of the call's keywords (so the model never sees it) and
selects that task; `task` is a task name, an index into the router's task list, or a tensor of one index (a
batch's task id, as the multi-task collator makes it). A call without `task` keeps the current task: the first
one until another is selected, or `set_task(model, name)` before inference.

    logits = model(input_ids=ids, attention_mask=mask, task="topic").logits
"""

from __future__ import annotations

import re
from typing import Any, Callable
from weakref import WeakKeyDictionary

import torch
from torch import nn

from deltatune.errors import ConfigError

Listener = Callable[[str], None]
TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_task_name(name: str) -> str:
    """Task names appear in tensor and metric names (`heads.<task>.weight`, `<task>/accuracy`): keep them plain."""
    if not TASK_NAME.fullmatch(name) or name == "macro":
        raise ValueError(f"task name {name!r} must use only letters, digits, _ and - (and not be 'macro')")
    return name


class TaskRouter:
    """The task list of a model, the active task, and the callbacks run when the active task changes."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.active = self.names[0]
        self.attention_mask: torch.Tensor | None = None  # of the current forward call (for pooling heads)
        self.listeners: list[Listener] = []
        self.users = 0
        self.handle: Any = None

    def select(self, task: str | int | torch.Tensor) -> None:
        name = self.resolve(task)
        if name != self.active:
            self.active = name
            for listener in self.listeners:
                listener(name)

    def resolve(self, task: str | int | torch.Tensor) -> str:
        """The task name of a name, an index, or a tensor of one index (all elements equal)."""
        if isinstance(task, torch.Tensor):
            ids = task.flatten().unique()
            if ids.numel() != 1:
                raise ConfigError(f"one forward call computes one task, got task ids {ids.tolist()}; "
                                  "batch the examples of each task separately")
            task = int(ids)
        if isinstance(task, int) and 0 <= task < len(self.names):
            return self.names[task]
        if isinstance(task, str) and task in self.names:
            return task
        raise ConfigError(f"unknown task {task!r}; the model's tasks are: "
                          + ", ".join(f"{i}={n}" for i, n in enumerate(self.names)))


_ROUTERS: WeakKeyDictionary[nn.Module, TaskRouter] = WeakKeyDictionary()


def join(model: nn.Module, names: list[str] | None, listener: Listener | None = None) -> TaskRouter:
    """Register a task-aware delta with `model`'s router (created on first use with `names`); None names = use
    the router's. Every delta on one model must list the same tasks in the same order."""
    router = _ROUTERS.get(model)
    if router is None:
        if not names:
            raise ConfigError("no task list: attach task_heads (which names the tasks) first, or give `tasks`")
        router = _ROUTERS[model] = TaskRouter(names)
        router.handle = model.register_forward_pre_hook(_take_task, with_kwargs=True, prepend=True)
    elif names is not None and list(names) != router.names:
        raise ConfigError(f"tasks {list(names)} differ from the tasks already attached to this model "
                          f"{router.names}; every task-aware delta must list the same tasks in the same order")
    router.users += 1
    if listener is not None:
        router.listeners.append(listener)
    return router


def leave(model: nn.Module, listener: Listener | None = None) -> None:
    """Undo `join`; the last delta to leave removes the hook."""
    router = _ROUTERS[model]
    if listener is not None:
        router.listeners.remove(listener)
    router.users -= 1
    if router.users == 0:
        router.handle.remove()
        del _ROUTERS[model]


def router_of(model: nn.Module) -> TaskRouter | None:
    return _ROUTERS.get(model)


def set_task(model: nn.Module, task: str | int) -> None:
    """Select the task that calls without a `task` keyword compute (e.g. before `generate`)."""
    router = _ROUTERS.get(model)
    if router is None:
        raise ConfigError("this model has no task-aware delta attached (task_heads or per_task)")
    router.select(task)


def _take_task(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    router = _ROUTERS[model]
    task = kwargs.pop("task", None)
    if task is not None:
        router.select(task)
    # the mask of the tokens the head reads: an encoder-decoder's head reads the decoder's
    decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    router.attention_mask = kwargs.get("decoder_attention_mask" if decoder else "attention_mask")
    return args, kwargs
