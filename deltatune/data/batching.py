"""Batching: dynamic padding (Collator) and length-grouped ordering to reduce padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from deltatune.data.packing import pack_examples
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Collator:
    """Pad a list of examples to the longest one (rounded up to `pad_to_multiple_of`).

    Returns input_ids, attention_mask (LongTensor [batch, length]) and labels: padded with -100 where they are
    token sequences (causal LM), else a 1-D tensor (long for class ids, float for regression); token_type_ids
    (sentence pairs on BERT-style models) are padded with 0 when the examples have them. Other keys are ignored.
    With `pack_to` (causal-LM examples; data.packing) the examples are first packed into rows of at most that many
    tokens (packing.pack_examples). Packed rows (with position_ids) give input_ids, labels, position_ids and
    num_tokens (the real tokens, a 0-d tensor the loop counts) and no attention_mask: the padding is one more short
    sequence at the end.
    """

    tokenizer_pad_id: int
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"
    pack_to: int | None = None
    decoder_start: int | None = None  # an encoder-decoder's decoder_start_token_id: collate as seq2seq

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.decoder_start is not None:
            return self._seq2seq(examples)
        if self.pack_to:
            examples = pack_examples(examples, self.pack_to)
        length = self._length([ex["input_ids"] for ex in examples])
        batch = {"input_ids": self._pad([ex["input_ids"] for ex in examples], length, self.tokenizer_pad_id)}
        if "position_ids" in examples[0]:
            if self.padding_side != "right":
                raise ConfigError("packed rows are padded on the right (padding_side='right')")
            fill = [list(ex["position_ids"]) + list(range(length - len(ex["position_ids"]))) for ex in examples]
            batch |= {"position_ids": self._pad(fill, length, 0),
                      "num_tokens": torch.tensor(sum(len(ex["input_ids"]) for ex in examples))}
        else:
            batch["attention_mask"] = self._pad([ex["attention_mask"] for ex in examples], length, 0)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad([ex["token_type_ids"] for ex in examples], length, 0)
        labels = [ex["labels"] for ex in examples]
        if isinstance(labels[0], (list, tuple)):
            batch["labels"] = self._pad(labels, length, -100)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
        return batch

    def _seq2seq(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Causal-LM examples (prompt + response, labels -100 on the prompt) as an encoder-decoder batch: the
        encoder reads the prompt; the decoder reads [start] + response, and `labels` = [-100] + the response's
        labels, so the loop's next-token loss (logits[:, :-1] against labels[:, 1:]) scores the response."""
        sources, targets, labels = [], [], []
        for ex in examples:
            first = next((i for i, label in enumerate(ex["labels"]) if label != -100), len(ex["labels"]))
            sources.append(ex["input_ids"][:first])
            targets.append([self.decoder_start, *ex["input_ids"][first:]])
            labels.append([-100, *ex["labels"][first:]])
        source_length, target_length = (self._length(rows) for rows in (sources, targets))
        return {"input_ids": self._pad(sources, source_length, self.tokenizer_pad_id),
                "attention_mask": self._pad([[1] * len(row) for row in sources], source_length, 0),
                "decoder_input_ids": self._pad(targets, target_length, self.tokenizer_pad_id),
                "decoder_attention_mask": self._pad([[1] * len(row) for row in targets], target_length, 0),
                "labels": self._pad(labels, target_length, -100)}

    def _length(self, rows: Sequence[Sequence[int]]) -> int:
        """The longest row, rounded up to `pad_to_multiple_of`."""
        length = max(len(row) for row in rows)
        return -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of if self.pad_to_multiple_of else length

    def _pad(self, rows: list[Sequence[int]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long)
            if self.padding_side == "right":
                out[i, :len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a collated batch that are not padding (for tokens/s)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return int(batch.get("attention_mask", batch["input_ids"]).bool().sum())


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> list[int]:
    """A seeded order of example indices in which consecutive `batch_size` runs have similar lengths.

    Shuffle, sort by length (longest first) within mega-batches of `mega * batch_size`, cut into batches and
    shuffle the batches, so batches need little padding while the order stays random.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    size = mega * batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [i for b in rng.permutation(len(batches)) for i in batches[b]]


def epoch_batches(examples: int, batch_size: int, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The batches (lists of example indices) of `epoch`: a seeded shuffle that depends only on (seed, epoch), or
    with `lengths` (of the examples) a length-grouped one."""
    epoch_seed = seed * 1_000_003 + epoch
    if lengths is not None:
        order = [int(i) for i in length_grouped_order(lengths, batch_size, epoch_seed)]
    else:
        order = torch.randperm(examples, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def example_lengths(dataset: Sequence[dict[str, Any]]) -> list[int]:
    """The token count of every example (for length grouping)."""
    if hasattr(dataset, "column_names"):  # datasets.Dataset: read the column at once
        return [len(ids) for ids in dataset["input_ids"]]
    return [len(ex["input_ids"]) for ex in dataset]
