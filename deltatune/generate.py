"""Text generation with a model (and any attached delta) through Hugging Face `generate` and its KV cache.

Batches are left-padded (what decoder generation needs); greedy decoding at temperature 0, otherwise sampling
with temperature and top-p. `generate_ids` works on token ids (no tokenizer), `generate` on text.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_token_id: int,
                 eos_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt (ids), generated as one left-padded batch."""
    if not hasattr(model, "generate") or not model.can_generate():
        raise ConfigError(f"{type(model).__name__} cannot generate text: load the model as a causal LM "
                          "(task: text), not with a classification head")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one non-empty prompt")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=use_cache,
                                 **sampling)
    finally:
        model.train(was_training)
    results = []
    for row in out[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id)]
        results.append(row)
    return results


def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | None = None, use_cache: bool = True) -> list[str]:
    """Completions of `prompts` (text), cut at the first of the `stop` strings if given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    new = generate_ids(model, encoded, max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                       temperature=temperature, top_p=top_p, use_cache=use_cache)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [_cut(t, stop or []) for t in texts]


def _cut(text: str, stop: list[str]) -> str:
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(hits)] if hits else text
