"""Padding-free packing: the examples of a training step laid out as a few rows of at most max_length tokens.

Packing changes how a step's examples sit in memory, never which examples form the step: the loader draws the
same batches with or without it, and `pack_examples` (called by batching.Collator) concatenates each batch's
examples into rows, so a packed run takes the same steps on the same examples as an unpacked one and differs only
by float rounding. (Packing the whole data set into fixed rows once, as we did before, trained measurably worse:
SmolLM2-135M LoRA on chat data ended 0.1 higher in held-out loss after the same tokens, from the different
composition of the steps; bench/README.md.) Each row holds whole examples (best-fit decreasing into the fewest rows,
then the smallest row length that keeps that number, so that little padding is left after the last example) and
carries `position_ids` that restart at 0 for every example. The label of each example's first token is -100: it
would be the target of the previous example's last token. The rows go to the model without an `attention_mask`:
from the position restarts transformers (masking_utils.find_packed_sequence_indices) builds a block-diagonal
causal mask for sdpa and eager attention, and flash-attention uses the same position_ids for varlen kernels. It
does so only when there is no KV cache, and models build one whenever `config.use_cache` is on, even in training:
then the examples of a row silently attend to each other. `prepare_model` therefore turns the cache off for packed
rows (a forward hook; the config keeps `use_cache`, so merged and exported models still generate with it) and
checks on the model itself that a packed row gives the logits of its examples run one by one (this also catches
deltas that rewrite the model inputs, such as prompt or prefix tuning, and models that ignore packed position_ids).
On sdpa models it also switches attention to one sdpa call per example instead of the row's block-diagonal mask
(packed_attention.py: the same result, about a third of the attention work for rows of 3–4 examples).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltatune.data.packed_attention import use_packed_attention
from deltatune.errors import ConfigError

_PROBE_LENGTHS = (5, 3)


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """The examples (input_ids, labels) as rows with input_ids, labels and position_ids, each row at most
    max_length tokens (or the longest example, if that is longer)."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows = []
    for members in _balanced_bins(lengths, max(max_length, *lengths)):
        ids, labels, positions = [], [], []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += [-100, *examples[i]["labels"][1:]]
            positions += range(lengths[i])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


def _balanced_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The fewest bins best-fit decreasing finds within `capacity`, with the smallest capacity that still gives
    that many: the rows come out of similar length, so padding them to the longest costs little."""
    bins = _best_fit(lengths, capacity)
    low = max(max(lengths), -(-sum(lengths) // len(bins)))  # no capacity below this can hold them in len(bins)
    while low < capacity:  # bisect for the smallest capacity that needs no more bins
        mid = (low + capacity) // 2
        if len(tighter := _best_fit(lengths, mid)) == len(bins):
            bins, capacity = tighter, mid
        else:
            low = mid + 1
    return bins


def _best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices (each bin's lengths sum to <= capacity), longest examples first, each into the
    fullest bin it fits; deterministic. Returns the bins in order of creation, members in file order."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = free.pop(slot)
            bins[b].append(i)
            space -= lengths[i]
        bisect.insort(free, (space, b))
    return [sorted(members) for members in bins]


@torch.no_grad()
def prepare_model(model: nn.Module) -> None:
    """Run packed rows without a KV cache and check that they keep their examples apart; ConfigError if not."""
    if not any(hook is _no_cache_for_packed_rows for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_no_cache_for_packed_rows, with_kwargs=True)
    use_packed_attention(model)  # each example attends alone (packed_attention.py); checked with the rest below
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, vocab, (1, n), generator=generator) for n in _PROBE_LENGTHS]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        separate = torch.cat([model(input_ids=p.to(device)).logits for p in parts], 1)
        positions = torch.cat([torch.arange(n) for n in _PROBE_LENGTHS])[None]
        packed = model(input_ids=torch.cat(parts, 1).to(device), position_ids=positions.to(device)).logits
        gap = float((packed.float() - separate.float()).abs().max())
    except Exception as e:  # any failure of the model on a packed row means it cannot train on packed rows
        raise ConfigError(f"padding-free packing does not work with this model and delta: a packed row fails "
                          f"({type(e).__name__}: {e}); set data.packing: false (train.length_grouping: true "
                          "also reduces padding)") from e
    finally:
        model.train(was_training)
    tolerance = 1e-3 if separate.dtype == torch.float32 else 5e-2
    if gap > tolerance:
        raise ConfigError(f"padding-free packing does not work with this model and delta: a packed row gives "
                          f"other logits than its examples run one by one (max difference {gap:.3g}); the model "
                          "ignores packed position_ids or a delta (e.g. prompt or prefix tuning) rewrites the inputs. "
                          "Set data.packing: false (train.length_grouping: true also reduces padding)")


def _no_cache_for_packed_rows(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Packed rows (position_ids without an attention_mask, see batching.Collator) run with use_cache=False."""
    if "position_ids" in kwargs and kwargs.get("attention_mask") is None and kwargs.get("past_key_values") is None:
        kwargs["use_cache"] = False
    return args, kwargs
