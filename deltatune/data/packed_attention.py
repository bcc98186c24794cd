"""Attention per example for packed rows: the same result as sdpa over the row's block-diagonal causal mask, with
a fraction of its work.

For a packed row transformers builds a 4-D mask that keeps each example to itself, and sdpa then computes every
row × row score: for a row of 3–4 examples about 3× the scores that count. `use_packed_attention` switches a
model whose attention is "sdpa" to `NAME`, registered with transformers' AttentionMaskInterface and
AttentionInterface. Its mask function builds sdpa's mask and, when that mask is exactly block-diagonal causal (a
packed row, or one plain row), notes on it where each example starts; its attention function then runs causal
sdpa on each example alone. Any other mask (padding, sliding window, a KV cache, a sliced mask), dropout, a
position bias or sinks take the plain sdpa path unchanged, so evaluation and generation behave as with sdpa. The
name is not saved with the model (transformers never writes `_attn_implementation` into config.json).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

NAME = "deltatune_packed"
_SEGMENTS = "_deltatune_segments"  # attribute on the mask tensor: per row, the (start, end) of each example


def use_packed_attention(model: nn.Module) -> None:
    """Run `model`'s attention per example on packed rows (a no-op unless it uses sdpa)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, _packed_mask)
        AttentionInterface.register(NAME, _packed_attention)
    model.config._attn_implementation = NAME


def _packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, noting the examples on it when it is block-diagonal causal."""
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor) and (segments := block_diagonal_segments(mask)) is not None:
        setattr(mask, _SEGMENTS, segments)
    return mask


def block_diagonal_segments(mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each causal block of a (batch, 1, L, L) boolean mask; None unless the mask is
    exactly causal within blocks and False across them."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    length = mask.shape[-1]
    starts = torch.ones(mask.shape[0], length, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~mask[:, 0].diagonal(offset=-1, dim1=1, dim2=2)  # a token that cannot see its predecessor
    block = starts.cumsum(-1)
    expected = (block[:, :, None] == block[:, None, :]).tril()
    if not torch.equal(mask[:, 0], expected):
        return None
    return [[(int(s), int(e)) for s, e in zip(row, [*row[1:], length])] for row in
            (torch.nonzero(r).flatten().tolist() for r in starts)]


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal sdpa per example when the mask notes the examples; otherwise transformers' sdpa."""
    segments = getattr(attention_mask, _SEGMENTS, None)
    special = dropout or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "s_aux", "softcap"))
    if segments is None or special or not getattr(module, "is_causal", True) or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not indexing: its backward is one cat of the gradients, where every slice's backward would zero-fill
    # a whole (batch, heads, length, dim) tensor; 4-D pieces keep sdpa on its flash kernel
    lengths = [[e - s for s, e in row] for row in segments]
    rows = [torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling) for q, k, v in
                       zip(q_row.split(n, dim=2), k_row.split(n, dim=2), v_row.split(n, dim=2))], dim=2)
            for q_row, k_row, v_row, n in zip(query.split(1), key.split(1), value.split(1), lengths)]
    return torch.cat(rows).transpose(1, 2).contiguous(), None
