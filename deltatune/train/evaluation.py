"""Evaluation: a model's metrics over a whole split, sharded over the ranks under torchrun, with the causal-LM loss
computed without materialising the logits where possible (compute.py's chunked loss)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.errors import DataError
from deltatune.train import distributed
from deltatune.train.compute import lm_loss_sum, model_inputs, output_head, to_device
from deltatune.train.metrics import MetricState, check_task, logits_of, units

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Collate, task: str,
             batch_size: int) -> dict[str, float]:
    """Metrics of `model` over a whole split (eval mode, no gradients; the previous mode is restored)."""
    check_task(task)
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    state = MetricState(task)
    device = next(model.parameters()).device
    try:
        for rows, counted in distributed.eval_batches(len(dataset), batch_size):  # this rank's share
            batch = to_device(collate([dataset[i] for i in rows]), device)
            update_metrics(state, model, model_inputs(batch), batch["labels"], count=counted)
    finally:
        model.train(was_training)
    return distributed.gather_metrics(state).result()


def update_metrics(state: MetricState, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   count: bool = True) -> None:
    """Run one evaluation batch and (if `count`) add it to `state`; causal-LM loss without materialising the
    logits where possible. (Sharded evaluation runs uncounted batches too: every rank joins every forward.)"""
    where = output_head(model) if state.task == "text" else None
    if where is None:
        logits = logits_of(model(**inputs))
        if count:
            state.update(logits, labels)
        return
    loss = float(lm_loss_sum(model, where, inputs, labels))
    if count:
        state.add_loss(loss, units(labels, "text"))
