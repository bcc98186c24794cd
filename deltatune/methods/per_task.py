"""One copy of a delta per task (e.g. a LoRA adapter per task), switched by the forward call's task.

    delta: [{method: per_task, delta: {method: lora, r: 8, targets: [query, value]}}]

The inner method attaches once, as usual (its modules, hooks and tensors), and its tensors become the first task's
bank; every other task gets a bank of copies. When the model's router (routing.py) selects a task, the inner
modules' parameter slots are pointed at that task's bank, so a forward uses, and a backward reaches, only the
active task's tensors: the other tasks' tensors get no gradient, and the optimizer skips them for that step.
Every bank also stays in the module tree, under a child named after its task: the tensor `a.b.weight` of task t
is `a.b.<t>.weight` in `model.named_parameters()` and in the saved delta (the active task's is also `a.b.weight`).

Any method whose forward reads its tensors from module attributes works unchanged; tests/test_multitask.py checks
every registered one whose class attribute `per_task` allows copies (heads do not: task_heads is per task already).
The per-task delta is not mergeable (no single set of weights serves every task).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from deltatune import routing
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import ConfigError
from deltatune.registry import method_of, parse_delta_config, register


class PerTask(DeltaConfig):
    """Per-task copies of one method: the method's config and the task names."""

    delta: DeltaConfig = Field(description="the method to copy per task, e.g. {method: lora, r: 8}",
                               examples=[{"method": "lora"}])
    tasks: list[str] | None = Field(None, min_length=1, description="task names, in task-id order; default: "
                                                                   "those of the task_heads attached before")

    @field_validator("delta", mode="before")
    @classmethod
    def _parse_inner(cls, value: Any) -> Any:
        inner = value if isinstance(value, DeltaConfig) else parse_delta_config(value, where="delta")
        if not method_of(inner).delta_class.per_task:
            raise ValueError(f"per_task cannot copy {inner.method!r}; multi-task heads come from task_heads")
        return inner

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[str] | None) -> list[str] | None:
        if tasks is not None and len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be distinct, got {tasks}")
        return tasks

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "delta": self.delta.to_dict(), "tasks": self.tasks}

    @property
    def trains_base(self) -> bool:  # type: ignore[override]
        return self.delta.trains_base  # per_task copies of full train the base too (model.dtype auto: fp32)

    def needs_dense_base(self) -> str | None:
        reason = self.delta.needs_dense_base()  # each copy is the inner method
        return reason and f"(of {self.delta.method}) {reason}"


@register("per_task")
class PerTaskDelta(Delta[PerTask]):
    """Per-task deltas: one copy of a method (e.g. LoRA) per task, the active task's copy in the forward."""

    per_task = False  # no copies of copies

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        self.inner = method_of(cfg.delta).delta_class(self.model, cfg.delta)
        try:
            owned = self.inner.build()
        except BaseException:
            self.inner._undo()
            raise
        try:  # last: nothing after joining fails
            self.router = routing.join(self.model, cfg.tasks, self.activate)
        except BaseException:
            self.inner.restore()
            self.inner._undo()
            raise
        self.preserves_output = self.inner.preserves_output
        return owned

    def attach(self) -> PerTaskDelta:
        """Attach the inner method (its tensors: the first task's bank), then copy them for the other tasks."""
        super().attach()
        first = dict(self._params)
        self.tasks, self.active = list(self.router.names), self.router.names[0]
        self.banks = {task: {name: p if i == 0 else nn.Parameter(p.detach().clone()) for name, p in first.items()}
                      for i, task in enumerate(self.tasks)}
        self.slots, self.holders = _slots(self.model, first), []
        self._params = {_bank_name(name, task): p for task, bank in self.banks.items() for name, p in bank.items()}
        homes = {id(places[0][0]): places[0][0] for places in self.slots.values()}
        if clash := sorted({t for m in homes.values() for t in self.tasks if hasattr(m, t)}):
            self.detach()
            raise ConfigError(f"task names {clash} are attribute names of the modules {self.config.delta.method} "
                              "trains; rename the tasks")
        self._hold_banks()
        if self.router.active != self.active:
            self.activate(self.router.active)
        return self

    def _hold_banks(self) -> None:
        """Register every task's tensors in the model, as `<module>.<task>.<attr>` (the name they are saved as)."""
        holders: dict[tuple[int, str], nn.Module] = {}
        for name, places in self.slots.items():
            module, attr = places[0]
            for task in self.tasks:
                if (id(module), task) not in holders:
                    holders[id(module), task] = nn.Module()
                    module.add_module(task, holders[id(module), task])
                    self.holders.append((module, task))
                holders[id(module), task].register_parameter(attr, self.banks[task][name])

    def activate(self, task: str) -> None:
        """Point every inner parameter slot at `task`'s tensors."""
        for name, places in self.slots.items():
            for module, attr in places:
                setattr(module, attr, self.banks[task][name])
        self.active = task

    def restore(self) -> None:
        routing.leave(self.model, self.activate)
        for module, task in self.holders:
            delattr(module, task)
        self.activate(self.tasks[0])  # the inner method's own tensors, which it restores and unswaps
        self.inner.restore()
        self.inner._undo()

    def extra_loss(self) -> Any:
        return self.inner.extra_loss()

    def switch_off(self) -> None:
        if self.inner._kept or not self.inner._swaps:  # the routed task's tensors sit in the base's own slots
            raise ConfigError(f"per_task over {self.config.delta.method} cannot be switched off: it trains the base "
                              "tensors in place, one copy per task; use a method that wraps modules (e.g. lora)")
        self.inner.switch_off()

    def switch_on(self) -> None:
        self.inner.switch_on()

    def merge(self) -> None:
        raise ConfigError("per_task cannot be merged into the base weights: every task has its own copy; "
                          "keep it attached and select the task (routing.set_task)")


def _bank_name(name: str, task: str) -> str:
    """`a.b.weight` of task t -> `a.b.t.weight` (the layer index and the tensor's own name stay visible)."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{task}.{leaf}" if parent else f"{task}.{leaf}"


def _slots(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter (a tied tensor has several)."""
    by_id = {id(p): name for name, p in params.items()}
    slots: dict[str, list[tuple[nn.Module, str]]] = {name: [] for name in params}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in by_id:
                slots[by_id[id(p)]].append((module, attr))
    return slots
