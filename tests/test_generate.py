"""Generation with the KV cache: prompt-family deltas decode the same with and without the cache, batched or not."""

from __future__ import annotations

import pytest

import deltatune
from deltatune.generate import _cut, generate_ids
from deltatune.methods.prefix import Prefix, PTuningV2
from deltatune.methods.prompt import Prompt, PTuning
from tests.test_prompt import perturb
from tests.tiny import tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
DELTAS = {"prompt": Prompt(n_tokens=4), "ptuning": PTuning(template="[P][P][P] {text}", encoder="lstm"),
          "ptuning_words": PTuning(template="[P] Q: [P] {text}", encoder="mlp", literal_token_ids=[[9, 10]]),
          "prefix": Prefix(n_tokens=4, hidden_size=16), "ptuning_v2": PTuningV2(n_tokens=4)}


@pytest.mark.parametrize("method", sorted(DELTAS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_equals_uncached_and_batch_equals_one_by_one(arch, method):
    model = tiny_model(arch, head="lm", seed=3)
    perturb(deltatune.attach(model, DELTAS[method]), 1.0)
    cached = generate_ids(model, PROMPTS, 6, pad_token_id=0)
    assert cached == generate_ids(model, PROMPTS, 6, pad_token_id=0, use_cache=False)
    assert cached == [generate_ids(model, [p], 6, pad_token_id=0)[0] for p in PROMPTS]
    assert all(len(row) == 6 for row in cached)


def test_generation_needs_a_causal_lm():
    with pytest.raises(deltatune.ConfigError, match="cannot generate"):
        generate_ids(tiny_model("gpt2"), PROMPTS, 2, pad_token_id=0)


def test_stop_strings_cut_the_output():
    assert _cut("a. b\nc", ["\n", "."]) == "a"
    assert _cut("abc", []) == "abc"
