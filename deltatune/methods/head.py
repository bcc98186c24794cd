"""Task head: replace the model's output layer by a fresh one sized for the task (or keep and train it).

The replacement is a `TaskHead`, an `nn.Linear` that is also a `DeltaModule`: code that expects a Linear still
works, its tensors keep the original names (`classifier.weight`, `score.weight`), and attaching a second head to
the same module is refused by targeting. The original head object is never modified, so `detach()` puts it back
exactly; `model.config` (num_labels, id2label, label2id, problem_type) is restored too. Merging swaps in a plain
`nn.Linear` holding the same tensors, so a merged model contains only standard modules.

A head made of several modules (RoBERTa's `classifier.dense` + `classifier.out_proj`) gets its last Linear
replaced and its other tensors trained in place. Attach the head before `full` when combining the two.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.delta import Delta, DeltaConfig, owned_tensors
from deltatune.errors import ConfigError, TargetError
from deltatune.registry import register
from deltatune.schema import MAX_LABELS, Patterns
from deltatune.targeting import DeltaModule, check_not_taken, find_modules, head_module_name

CONFIG_KEYS = ("id2label", "label2id", "problem_type")


class Head(DeltaConfig):
    """Task head settings: task, output size, which module, fresh or kept weights."""

    task: Literal["classification", "regression", "token_classification"] = Field(
        "classification", description="what the head predicts")
    num_labels: int | None = Field(None, ge=1, le=MAX_LABELS,
                                   description="outputs of the head; None keeps the current size "
                                               "(regression: 1)")
    labels: list[str] | None = Field(None, min_length=1, description="label names, written to model.config.id2label")
    module: str | None = Field(None, description="the head module to replace (name, dot-suffix or 're:...'); "
                                                 "default: the model's known head (classifier, score, ...)")
    reinit: bool = Field(True, description="a fresh Linear (normal(0, initializer_range), zero bias); "
                                           "False trains a copy of the existing head")
    also_train: Patterns = Field(default_factory=list, description="module patterns trained with the head, "
                                                                   "e.g. ['pooler']")

    @model_validator(mode="after")
    def _labels_fit(self) -> Head:
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be distinct, got {self.labels}")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(f"num_labels={self.num_labels} but {len(self.labels)} labels are given")
        return self

    def outputs(self, current: int) -> int:
        if self.labels is not None:
            return len(self.labels)
        if self.num_labels is not None:
            return self.num_labels
        return 1 if self.task == "regression" else current


class TaskHead(nn.Linear, DeltaModule):
    """A task head put in by the `head` method (a Linear; marked so it is never wrapped or replaced twice)."""

    owner_method = "head"


@register("head")
class HeadDelta(Delta[Head]):
    """Task head: replace or retrain the classification / regression / token-classification head."""

    role = "head"
    mergeable = True  # the head lives in the model: merge only swaps the TaskHead for a plain Linear
    fsdp = True
    per_task = False  # multi-task runs get a head per task from task_heads
    peft_type = "modules_to_save"  # PEFT saves a task head whole, next to the adapter

    @property
    def preserves_output(self) -> bool:  # type: ignore[override]
        return not self.config.reinit

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        head_name = head_module_name(self.model, cfg.module)
        head = self.model.get_submodule(head_name)
        name, old = head_name, head
        if not isinstance(head, nn.Linear):
            linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise TargetError(f"head {head_name!r} ({type(head).__name__}) contains no Linear layer to replace; "
                                  "name the output Linear with `module`")
            name, old = f"{head_name}.{linears[-1][0]}", linears[-1][1]
        check_not_taken({name: old})  # a head put in by another `head` delta: one clear error
        outputs = cfg.outputs(old.out_features)
        if not cfg.reinit and outputs != old.out_features:
            raise ConfigError(f"reinit: false keeps the head {name!r} with {old.out_features} outputs, but "
                              f"{outputs} are asked for; use reinit: true for a new head")
        in_place = {id(p): p for p in head.parameters() if not any(p is q for q in old.parameters())}
        if cfg.also_train:
            for module in find_modules(self.model, cfg.also_train).values():
                in_place |= {id(p): p for p in module.parameters()}
        owned_elsewhere = owned_tensors(self.model)
        if clash := [n for n, p in self.model.named_parameters() if id(p) in owned_elsewhere
                     and (id(p) in in_place or any(p is q for q in old.parameters()))]:
            raise ConfigError(f"the head tensors {clash[:3]} are already trained by another attached delta; "
                              "attach the head first (e.g. [head, full]), then the other method")

        new = self._new_head(old, outputs, cfg.reinit)
        self.swap(name, new)
        self._head, self._home = new, (self.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
        self.keep_values(in_place.values())
        self._update_config(cfg, outputs)  # last: nothing after this can fail
        return [p for p in new.parameters()] + list(in_place.values())

    def restore(self) -> None:
        config = getattr(self.model, "config", None)
        for key, value in self._saved_config.items():
            setattr(config, key, value)

    def merge_weights(self) -> None:
        head = self._head
        plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        plain.weight = head.weight
        plain.bias = head.bias
        setattr(*self._home, plain)

    def unmerge_weights(self) -> None:
        setattr(*self._home, self._head)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _new_head(self, old: nn.Linear, outputs: int, reinit: bool) -> TaskHead:
        new = TaskHead(old.in_features, outputs, bias=old.bias is not None, device=old.weight.device,
                       dtype=old.weight.dtype)
        with torch.no_grad():
            if reinit:  # as Hugging Face initialises a new head
                std = getattr(getattr(self.model, "config", None), "initializer_range", 0.02)
                new.weight.normal_(0.0, std)
                if new.bias is not None:
                    new.bias.zero_()
            else:
                new.weight.copy_(old.weight)
                if new.bias is not None:
                    new.bias.copy_(old.bias)
        return new

    def _update_config(self, cfg: Head, outputs: int) -> None:
        config = getattr(self.model, "config", None)
        self._saved_config = {}
        if config is None or not hasattr(config, "num_labels"):
            return
        self._saved_config = {key: copy.deepcopy(getattr(config, key, None)) for key in CONFIG_KEYS}
        if cfg.labels is not None:
            config.id2label = dict(enumerate(cfg.labels))
            config.label2id = {label: i for i, label in enumerate(cfg.labels)}
        elif config.num_labels != outputs:
            config.num_labels = outputs
        if cfg.task == "regression":
            config.problem_type = "regression"
        elif config.problem_type == "regression":
            config.problem_type = None  # let the model infer single/multi-label classification from the labels
