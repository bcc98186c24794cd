"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while training, uniform
noise is added to the input embeddings; evaluation and generation (the model in eval mode) see none.

Each token's noise is uniform(-1, 1) · alpha / sqrt(L · d), d the embedding width and L its example's real length,
as in the paper's reference code: the attention-mask ones of its row (padding gets no noise), or in a packed row
(position_ids restarting at 0, no mask) the length of the example it belongs to. For a batch without padding this is
transformers' `neftune_post_forward_hook` (Trainer's `neftune_noise_alpha`, TRL's SFT); that hook uses the padded
row length for every example and noises the padding too, so with padding the scale differs from it.

It works with any delta: a forward hook on `get_input_embeddings()` (a LoRA on the embeddings included; virtual
tokens of prompt tuning are not noised), plus a forward pre-hook on the model that reads the call's attention_mask /
position_ids. Encoder-decoder models embed twice per call (encoder, then decoder inputs with decoder_attention_mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError


class NEFTune:
    """Context manager: noisy input embeddings in training mode while inside; `alpha=None` does nothing."""

    def __init__(self, model: nn.Module, alpha: float | None):
        self.model, self.alpha = model, alpha
        self._hooks: list[Any] = []
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []

    def __enter__(self) -> NEFTune:
        if self.alpha is None:
            return self
        get_embeddings = getattr(self.model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if not isinstance(embeddings, nn.Module):
            raise ConfigError(f"train.neftune_alpha adds noise to the input embeddings, and {type(self.model).__name__}"
                              " has none (no get_input_embeddings()): remove neftune_alpha")
        self._hooks = [self.model.register_forward_pre_hook(self._read_inputs, with_kwargs=True, prepend=True),
                       embeddings.register_forward_hook(self._add_noise)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._pending = [], []

    def _read_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """What tells the real lengths of this call's rows: encoder (or decoder-only) inputs, then decoder ones."""
        self._pending = [(kwargs.get("attention_mask"), kwargs.get("position_ids")),
                         (kwargs.get("decoder_attention_mask"), None)]

    def _add_noise(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mask, positions = self._pending.pop(0) if self._pending else (None, None)
        noise = torch.zeros_like(output).uniform_(-1, 1)
        lengths = real_lengths(output.shape[:2], mask, positions).to(output.device)
        scale = self.alpha / torch.sqrt(lengths * output.shape[-1])
        if mask is not None and mask.shape == output.shape[:2]:
            scale = scale * mask  # no noise on padding
        return output + noise * scale.unsqueeze(-1).to(output.dtype)


def real_lengths(shape: torch.Size, mask: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
    """Per token (a float tensor of `shape` = (rows, length)): the length of the example it belongs to."""
    rows, length = shape
    if mask is not None and mask.shape == shape:
        return mask.sum(1, keepdim=True).clamp(min=1).expand(shape).float()
    if positions is not None and positions.shape == shape:  # packed rows: an example starts where positions restart
        example = (positions == 0).cumsum(1) + torch.arange(rows, device=positions.device)[:, None] * (length + 1)
        return torch.bincount(example.flatten(), minlength=rows * (length + 1))[example].float()
    return torch.full(shape, float(length))

