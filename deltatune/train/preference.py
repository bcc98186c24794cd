"""Preference tuning: DPO and SimPO on pairs of a chosen and a rejected answer (data/preference.py), as TRL does.

With c, r the summed log-probabilities of the chosen and rejected answer tokens under the model with the delta, and
c0, r0 the same under the base model, i.e. the same model with the delta switched off (`DeltaBase.disabled()`, no
second copy of the model), per pair:

  dpo    z = beta * ((c - r) - (c0 - r0))         rewards: beta * (c - c0), beta * (r - r0)   (TRL DPOTrainer)
  simpo  z = beta * (c' - r') - gamma             rewards: beta * c', beta * r'                (TRL CPOTrainer,
         with c', r' the mean log-probabilities per answer token, and no reference model       loss_type=simpo)
  loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)      eps = label_smoothing (conservative DPO)

The reference forward runs first, without gradients and in eval mode (no dropout), then the forward that trains;
both see the 2B rows of a batch of B pairs at once (chosen rows, then rejected rows). Metrics, as TRL names them:
rewards/chosen, rewards/rejected, rewards/accuracies (share of pairs whose chosen reward is higher),
rewards/margins, logps/chosen, logps/rejected (the log-probabilities the loss uses), and loss; train rows average
them over the steps since the previous row. The best delta is chosen by `loss` (default), `rewards/accuracies` or
`rewards/margins` (train.metric).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from deltatune.errors import ConfigError, DataError
from deltatune.schema import MAX_SCALE, Schema
from deltatune.train import compute
from deltatune.train.metrics import logits_of

if TYPE_CHECKING:
    from deltatune.delta import DeltaBase

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")
METRICS = ("loss", *STATS)
SELECTABLE = ("loss", "rewards/accuracies", "rewards/margins")
SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma default


class PreferenceConfig(Schema):
    """The `preference:` section: the objective of a run on `format: preference` data."""

    section = "preference"

    loss: Literal["dpo", "simpo"] = Field("dpo", description="dpo: sigmoid DPO against the base model (the delta "
                                                             "switched off); simpo: length-normalised, no reference")
    beta: float = Field(0.1, gt=0, le=MAX_SCALE, description="inverse temperature of the reward (SimPO paper: 2.0)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="share of pairs assumed mislabelled "
                                                                  "(conservative DPO); 0: plain sigmoid loss")
    gamma: float | None = Field(None, ge=0, le=MAX_SCALE, description=f"simpo: target reward margin "
                                                                      f"(TRL simpo_gamma); unset: {SIMPO_GAMMA}")

    @model_validator(mode="after")
    def _gamma_is_simpo(self) -> PreferenceConfig:
        if self.gamma is not None and self.loss != "simpo":
            raise ValueError("gamma is the target margin of loss: simpo; remove it or set loss: simpo")
        return self

    @property
    def margin(self) -> float:
        return SIMPO_GAMMA if self.gamma is None else self.gamma


def sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed log-probabilities."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from mean log-probabilities per answer token."""
    losses = sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def sequence_logps(model: nn.Module, inputs: dict[str, torch.Tensor],
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, their number): next-token targets are labels[:, 1:]
    where not -100. Only target positions go through the LM head (compute.output_head), not the whole sequence."""
    targets = labels[:, 1:]
    keep = targets != -100
    where = compute.output_head(model)
    if where is None:
        logits = logits_of(model(**inputs))[:, :-1][keep]
    else:
        with compute.hidden_states_out(where) as head:
            logits = head(logits_of(model(**inputs))[:, :-1][keep])
    token_logps = logits.float().log_softmax(-1).gather(-1, targets[keep][:, None])[:, 0]
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(targets)[keep]
    sums = torch.zeros(len(labels), device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return sums, keep.sum(1)


class Preference:
    """The loop's objective (train/tasks.py) for preference pairs: DPO or SimPO with `delta` on its model."""

    kind = "preference"
    metrics = METRICS
    default_metric = "loss"

    def __init__(self, config: PreferenceConfig, delta: DeltaBase):
        self.config, self.delta = config, delta
        self._window: list[dict[str, torch.Tensor]] = []  # train batches since the last logged row

    def check_metric(self, metric: str) -> None:
        if metric not in SELECTABLE:
            raise ConfigError(f"unknown metric {metric!r} for preference data; available: {', '.join(SELECTABLE)}")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["input_ids"]) // 2  # pairs

    def forward_loss_sum(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                         batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of the batch's pairs, with the reference and the training forward (compute.TrainingLoss)."""
        losses, stats = self.pair_losses(model, inputs, batch["labels"])
        self._window.append(stats)
        return losses.sum()

    def pair_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                    labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses, per-pair values of STATS) of a collated batch of pairs."""
        cfg = self.config
        if cfg.loss == "dpo":
            with self._reference(model):
                ref_chosen, ref_rejected = sequence_logps(model, inputs, labels)[0].chunk(2)
        sums, counts = sequence_logps(model, inputs, labels)
        if cfg.loss == "dpo":
            chosen, rejected = sums.chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                cfg.beta, cfg.label_smoothing)
        else:
            chosen, rejected = (sums / counts.clamp(min=1)).chunk(2)
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, cfg.beta, cfg.margin,
                                                                  cfg.label_smoothing)
        stats = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                 "rewards/margins": chosen_rewards - rejected_rewards,
                 "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        return losses, stats

    @contextmanager
    def _reference(self, model: nn.Module) -> Iterator[None]:
        """The base model, without gradients or dropout. Under autocast the cast-weight cache is off: weights
        exchanged in place (full fine-tuning) must not be served from, or left in, the cache of the other forward."""
        device = next(model.parameters()).device.type
        autocast = torch.autocast(device, enabled=torch.is_autocast_enabled(device), cache_enabled=False,
                                  dtype=torch.get_autocast_dtype(device))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.delta.disabled(), autocast:
                yield
        finally:
            model.train(was_training)

    def step_losses(self, batches: list[dict[str, torch.Tensor]], losses: list[float]) -> dict[str, float]:
        """The STATS of the train batches since the last logged row (a train row's extra fields)."""
        stats, self._window = _mean_stats(self._window), []
        return stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Collate,
                 batch_size: int) -> dict[str, float]:
        """loss and STATS over a split (eval mode; the previous mode is restored)."""
        if len(dataset) == 0:
            raise DataError("cannot evaluate on an empty split")
        was_training = model.training
        model.eval()
        parts, device = [], next(model.parameters()).device
        try:
            for start in range(0, len(dataset), batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch = {k: v.to(device) for k, v in batch.items()}
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                losses, stats = self.pair_losses(model, inputs, batch["labels"])
                parts.append({"loss": losses, **stats})
        finally:
            model.train(was_training)
        return _mean_stats(parts)


def _mean_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each key's mean over all pairs of `parts` (per-pair tensors); {} for no parts."""
    if not parts:
        return {}
    return {key: float(torch.cat([p[key] for p in parts]).float().mean()) for key in parts[0]}
