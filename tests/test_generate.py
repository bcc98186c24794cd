"""Generation with the KV cache: prompt-family deltas decode the same with and without the cache, batched or not."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.generation.sampling import Sampling, cut_at_stop, generate, generate_ids
from deltatune.methods.prefix import Prefix
from deltatune.methods.ptuning_v2 import PTuningV2
from deltatune.methods.prompt import Prompt
from deltatune.methods.ptuning import PTuning
from tests.test_prompt import perturb
from tests.tiny import tiny_model
from tests.tiny_lm import tiny_llama, tiny_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
DELTAS = {"prompt": Prompt(n_tokens=4), "ptuning": PTuning(template="[P][P][P] {text}", encoder="lstm"),
          "ptuning_words": PTuning(template="[P] Q: [P] {text}", encoder="mlp", literal_token_ids=[[9, 10]]),
          "prefix": Prefix(n_tokens=4, hidden_size=16), "ptuning_v2": PTuningV2(n_tokens=4)}


@pytest.mark.parametrize("method", sorted(DELTAS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_equals_uncached_and_batch_equals_one_by_one(arch, method):
    model = tiny_model(arch, head="lm", seed=3)
    perturb(deltatune.attach(model, DELTAS[method]), 1.0)
    six = Sampling(max_new_tokens=6)
    cached = generate_ids(model, PROMPTS, six, pad_token_id=0)
    assert cached == generate_ids(model, PROMPTS, six, pad_token_id=0, use_cache=False)
    assert cached == [generate_ids(model, [p], six, pad_token_id=0)[0] for p in PROMPTS]
    assert all(len(row) == 6 for row in cached)


def test_generation_needs_a_causal_lm():
    with pytest.raises(deltatune.ConfigError, match="cannot generate"):
        generate_ids(tiny_model("gpt2"), PROMPTS, pad_token_id=0)


def test_prompt_and_new_tokens_beyond_the_context_are_an_error():
    """GPT-2 has 64 learned positions: one more would be an index error deep inside the model."""
    model = tiny_model("gpt2", head="lm")
    assert len(generate_ids(model, [list(range(3, 63))], Sampling(max_new_tokens=4), pad_token_id=0)[0]) == 4
    with pytest.raises(deltatune.ConfigError, match="a prompt of 60 tokens and max_new_tokens=5 do not fit the "
                                                    "model's context of 64 tokens; shorten the prompt or lower"):
        generate_ids(model, [list(range(3, 63)), [5]], Sampling(max_new_tokens=5), pad_token_id=0)

    for config in [Prompt(n_tokens=10), Prefix(n_tokens=10)]:  # their positions come out of the context
        delta = deltatune.attach(model, config)
        assert len(generate_ids(model, [list(range(3, 53))], Sampling(max_new_tokens=4), pad_token_id=0)[0]) == 4
        with pytest.raises(deltatune.ConfigError, match="a prompt of 50 tokens and max_new_tokens=5 do not fit the "
                           r"model's context of 54 tokens \(with 10 positions taken by the delta"):
            generate_ids(model, [list(range(3, 53))], Sampling(max_new_tokens=5), pad_token_id=0)
        delta.detach()


def test_stop_strings_cut_the_output():
    assert cut_at_stop("a. b\nc", ["\n", "."]) == "a"
    assert cut_at_stop("abc", []) == "abc"


# ---------------------------------------------------------------- text generation with a real tokenizer

@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer), tokenizer


TEXTS = ["hello world", "the quick brown fox jumps", "I am"]


def test_greedy_text_generation_is_deterministic_and_batch_independent(lm):
    model, tokenizer = lm
    sampling = Sampling(max_new_tokens=12)
    batch = generate(model, tokenizer, TEXTS, sampling)
    assert batch == generate(model, tokenizer, TEXTS, sampling)
    assert batch == [generate(model, tokenizer, [t], sampling)[0] for t in TEXTS]
    ids = tokenizer(TEXTS[0])["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert batch[0] == tokenizer.decode(expected, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(lm):
    model, tokenizer = lm
    rng = torch.get_rng_state()
    hot = [Sampling(max_new_tokens=12, temperature=1.5, seed=seed) for seed in range(4)]
    first = [generate(model, tokenizer, TEXTS, s) for s in hot]
    assert first == [generate(model, tokenizer, TEXTS, s) for s in hot]
    assert len({tuple(texts) for texts in first}) == 4  # the seed matters
    assert torch.equal(torch.get_rng_state(), rng)
    greedy = generate(model, tokenizer, TEXTS, Sampling(max_new_tokens=12))
    assert greedy != first[0]
    assert generate(model, tokenizer, TEXTS, Sampling(max_new_tokens=12, temperature=1.5, top_k=1, seed=0)) == greedy


def test_stop_strings_end_generation_early_and_cut_the_text(lm):
    model, tokenizer = lm
    full = generate(model, tokenizer, TEXTS[:1], Sampling(max_new_tokens=20))[0]
    stop = next(full[i:i + 2] for i in range(2, len(full)) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    expected = full[:full.find(stop)]
    assert generate(model, tokenizer, TEXTS[:1], Sampling(max_new_tokens=20, stop=[stop, "never there"]))[0] \
        == expected
    ids = [tokenizer(TEXTS[0])["input_ids"]]
    stopped = generate_ids(model, ids, Sampling(max_new_tokens=20, stop=[stop]), pad_token_id=0, tokenizer=tokenizer)
    assert len(stopped[0]) < 20 and stop in tokenizer.decode(stopped[0])


@pytest.mark.parametrize("stop", [[], ["o"], ["never", "dom"]])
def test_streamed_pieces_join_to_the_returned_text(lm, stop):
    model, tokenizer = lm
    sampling = Sampling(max_new_tokens=20, stop=stop)
    for text in TEXTS:
        pieces: list[str] = []
        streamed = generate(model, tokenizer, [text], sampling, on_text=pieces.append)[0]
        assert "".join(pieces) == streamed == generate(model, tokenizer, [text], sampling)[0]
    with pytest.raises(deltatune.ConfigError, match="one prompt at a time, got 3"):
        generate(model, tokenizer, TEXTS, sampling, on_text=pieces.append)


def test_repetition_penalty_breaks_a_greedy_loop(lm):
    model, tokenizer = lm
    ids = [tokenizer("I am")["input_ids"]]  # greedy repeats two tokens four times here
    plain = generate_ids(model, ids, Sampling(max_new_tokens=20), pad_token_id=0)[0]
    penalised = generate_ids(model, ids, Sampling(max_new_tokens=20, repetition_penalty=1.2), pad_token_id=0)[0]
    assert len(set(plain)) == 12 and len(set(penalised)) == 20
    assert penalised[:4] == plain[:4]  # the same until the first repeat


def test_generation_ends_at_the_eos_token(lm):
    model, tokenizer = lm
    ids = [tokenizer(TEXTS[0])["input_ids"]]
    free = generate_ids(model, ids, Sampling(max_new_tokens=8), pad_token_id=0)[0]
    eos = free[3]  # pretend the fourth new token ends the text
    assert generate_ids(model, ids, Sampling(max_new_tokens=8), pad_token_id=0, eos_token_id=[99999, eos])[0] \
        == free[:free.index(eos)]


def test_bad_sampling_settings_name_the_setting():
    with pytest.raises(deltatune.ConfigError, match="sampling.top_p: Input should be less than or equal to 1"):
        Sampling(top_p=1.5)
    with pytest.raises(deltatune.ConfigError, match="sampling.temperature: Input should be greater than or equal"):
        Sampling(temperature=-1)
