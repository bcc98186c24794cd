"""Padding-free packing: several causal-LM examples per row of at most max_length tokens, kept apart.

A packed row concatenates whole examples (best-fit decreasing: few rows, no example is split) and carries
`position_ids` that restart at 0 for every example. The label of each example's first token is -100: it would be
the target of the previous example's last token. The rows go to the model without an `attention_mask`: from the
position restarts transformers (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask for
sdpa and eager attention, and flash-attention uses the same position_ids for varlen kernels. It does so only
when there is no KV cache, and models build one whenever `config.use_cache` is on, even in training: then the
examples of a row silently attend to each other. `prepare_model` therefore turns the cache off for packed rows
(a forward hook; the config keeps `use_cache`, so merged and exported models still generate with it) and checks on
the model itself that a packed row gives the logits of its examples run one by one (this also catches deltas that
rewrite the model inputs, such as prompt or prefix tuning, and models that ignore packed position_ids).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from datasets import Dataset
from torch import nn

from deltatune.errors import ConfigError

_PROBE_LENGTHS = (5, 3)


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Rows of whole examples (columns input_ids, labels) with input_ids, labels and position_ids."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = next((i for i, n in enumerate(lengths) if n > max_length), None)
    if too_long is not None:
        raise ConfigError(f"example {too_long} has {lengths[too_long]} tokens, more than max_length={max_length}")
    columns = dataset.select_columns(["input_ids", "labels"]).to_dict()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in _best_fit(lengths, max_length):
        ids, labels, positions = [], [], []
        for i in members:
            ids += columns["input_ids"][i]
            labels += [-100, *columns["labels"][i][1:]]
            positions += range(lengths[i])
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    return Dataset.from_dict(rows)


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
