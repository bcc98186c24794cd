"""Attention per example on packed rows (data/packed_attention.py) gives the loss and gradients of sdpa's mask path."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import deltatune
from deltatune.data import packed_attention
from deltatune.data.packed_attention import NAME, block_diagonal_segments, use_packed_attention
from deltatune.data.packing import prepare_model

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=2),  # grouped-query attention
    "qwen2": lambda: T.Qwen2Config(**SMALL, num_key_value_heads=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
}
LENGTHS = [[7, 1, 12, 5], [9, 16], [25]]  # examples per row: several, a one-token example, one example alone


def packed_batch() -> dict[str, torch.Tensor]:
    """Rows of the examples in LENGTHS, each padded to 25 tokens by a last, -100-labelled sequence."""
    generator = torch.Generator().manual_seed(1)
    width = max(sum(row) for row in LENGTHS)
    positions = [[p for n in row for p in range(n)] for row in LENGTHS]
    positions = torch.tensor([row + list(range(width - len(row))) for row in positions])
    ids = torch.randint(3, 97, positions.shape, generator=generator)
    labels = ids.clone()
    labels[positions == 0] = -100
    for r, row in enumerate(LENGTHS):
        labels[r, sum(row):] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def lora_model(arch: str) -> torch.nn.Module:
    config = CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    deltatune.attach(model, deltatune.registry.parse_delta_config({"method": "lora", "r": 4}))
    for name, p in model.named_parameters():
        if "lora" in name:  # B starts at zero: make the gradients of A non-trivial too
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got: tuple, expected: tuple) -> None:
    """Equal loss and gradients of every trainable tensor, within float tolerance."""
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 4
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_per_example_attention_gives_the_loss_and_gradients_of_the_mask_path(arch: str, monkeypatch) -> None:
    model, batch = lora_model(arch), packed_batch()
    loss, grads = loss_and_grads(model, batch)
    prepare_model(model)
    assert model.config._attn_implementation == NAME
    calls = []
    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1))
    fast_loss, fast_grads = loss_and_grads(model, batch)
    assert not calls  # every layer took the per-example path
    assert_same((fast_loss, fast_grads), (loss, grads))


def test_per_example_attention_under_activation_checkpointing() -> None:
    """The recomputed forward finds the examples on the same mask: same loss and gradients as without it."""
    model, batch = lora_model("llama"), packed_batch()
    loss, grads = loss_and_grads(model, batch)
    prepare_model(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast_loss, fast_grads = loss_and_grads(model, batch)
    assert_same((fast_loss, fast_grads), (loss, grads))


def test_padded_and_cached_inputs_take_the_plain_sdpa_path() -> None:
    model = lora_model("llama").eval()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        use_packed_attention(model)
        assert model.config._attn_implementation == NAME and "attn_implementation" not in model.config.to_dict()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), generated)


def test_block_diagonal_segments_reads_only_block_diagonal_causal_masks() -> None:
    block = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = ((block[:, None] == block[None, :]).tril())[None, None]
    assert block_diagonal_segments(mask) == [[(0, 3), (3, 5), (5, 6)]]
    assert block_diagonal_segments(torch.ones(6, 6, dtype=torch.bool).tril()[None, None]) == [[(0, 6)]]
    padded = mask.clone()
    padded[..., 0] = False  # a padded first token: not block-diagonal causal
    assert block_diagonal_segments(padded) is None
    assert block_diagonal_segments(mask.float()) is None
    windowed = torch.ones(6, 6, dtype=torch.bool).tril().triu(-2)[None, None]  # sliding window of 3
    assert block_diagonal_segments(windowed) is None
