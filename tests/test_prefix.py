"""Prefix-tuning and P-tuning v2: cache injection, padding, gradient checkpointing, collapse for inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.methods.prefix import Prefix
from deltatune.methods.ptuning_v2 import PTuningV2
from tests.test_prompt import left_pad, perturb
from tests.tiny import tiny_batch, tiny_model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_padding_side_and_pads_do_not_matter(arch):
    model, batch = tiny_model(arch), tiny_batch()
    perturb(deltatune.attach(model, PTuningV2(n_tokens=4)))
    with torch.no_grad():
        right = model(**batch).logits
        n = int(batch["attention_mask"][0].sum())
        alone = model(input_ids=batch["input_ids"][:1, :n]).logits
    torch.testing.assert_close(alone[0], right[0], atol=1e-5, rtol=1e-4)
    if arch != "bert":  # BERT's absolute positions are not padding-aware on their own
        with torch.no_grad():
            torch.testing.assert_close(model(**left_pad(batch)).logits, right, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    grads = []
    for checkpointing in (False, True):
        model, batch = tiny_model(arch), tiny_batch()
        delta = deltatune.attach(model, Prefix(n_tokens=3, hidden_size=16))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        for m in model.modules():  # no dropout: the two runs must see the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        F.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 1, 0])).backward()
        grads.append({n: p.grad.clone() for n, p in delta.trainable_parameters().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_collapse_keeps_outputs_and_saves_only_the_prefix(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch()
    delta = deltatune.attach(model, Prefix(n_tokens=4, hidden_size=16))
    perturb(delta, 0.1)
    with torch.no_grad():
        before = model(**batch).logits
    delta.collapse()
    assert list(delta.trainable_parameters()) == ["model.embed_tokens.prefix.weight"]
    assert delta.trainable_parameters()["model.embed_tokens.prefix.weight"].shape == (4, 2 * 2 * 2 * 8)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-6, rtol=1e-5)
    delta.save(tmp_path)
    fresh = tiny_model("llama")
    loaded = deltatune.load(fresh, tmp_path)
    assert loaded.config.reparam == "none"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    delta.detach()
    assert not any("prefix" in n for n, _ in model.named_parameters())


def test_ptuning_v2_is_prefix_without_reparameterisation():
    assert PTuningV2().reparam == "none" and Prefix().reparam == "mlp"
    delta = deltatune.attach(tiny_model("gpt2"), PTuningV2(n_tokens=5))
    assert {n: tuple(p.shape) for n, p in delta.trainable_parameters().items()} == \
        {"transformer.wte.prefix.weight": (5, 2 * 2 * 32)}
