"""Prompt tuning and P-tuning v1: layout of virtual tokens, padding on either side, inits, templates."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.methods.prompt import Prompt, PTuning
from tests.tiny import tiny_batch, tiny_model


def perturb(delta, scale=0.5):
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(scale * torch.randn_like(p))


def left_pad(batch):
    """The same rows, padded on the left instead of the right."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for i in range(len(ids)):
        n = int(mask[i].sum())
        ids[i], mask[i] = ids[i].roll(len(ids[i]) - n), mask[i].roll(len(ids[i]) - n)
    return {"input_ids": ids, "attention_mask": mask}


CONFIGS = [Prompt(n_tokens=4), PTuning(template="[P][P] {text} [P]", encoder="mlp")]


@pytest.mark.parametrize("config", CONFIGS, ids=["prompt", "ptuning"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_classification_ignores_padding_side_and_pads(arch, config):
    model, batch = tiny_model(arch), tiny_batch()
    perturb(deltatune.attach(model, config))
    with torch.no_grad():
        right = model(**batch).logits
        left = model(**left_pad(batch)).logits
        n = int(batch["attention_mask"][0].sum())
        alone = model(input_ids=batch["input_ids"][:1, :n]).logits  # the padded row without its padding
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone[0], right[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_level_logits_keep_the_input_length(arch):
    model, batch = tiny_model(arch, head="lm"), tiny_batch()
    perturb(deltatune.attach(model, Prompt(n_tokens=3)))
    with torch.no_grad():
        right = model(**batch).logits
        left = model(**left_pad(batch)).logits
    assert right.shape[:2] == batch["input_ids"].shape
    n = int(batch["attention_mask"][0].sum())
    torch.testing.assert_close(left[0, -n:], right[0, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left[1:], right[1:], atol=1e-5, rtol=1e-4)


def test_layout_encoder_keeps_cls_first_decoder_left_aligns():
    mask = torch.tensor([[1, 1, 1, 0]])
    bert = deltatune.attach(tiny_model("bert"), PTuning(template="[P][P] {text} [P]", encoder="none"))
    assert bert.layout(mask).tolist() == [[0, 4, 5, 1, 2, 6, 3]]  # CLS, P, P, text, P, pad
    gpt2 = deltatune.attach(tiny_model("gpt2"), PTuning(template="[P][P] {text} [P]", encoder="none"))
    assert gpt2.layout(mask).tolist() == [[3, 4, 5, 0, 1, 2, 6]]  # pad, P, P, text, P


def test_inits():
    model = tiny_model("llama")
    table = model.get_input_embeddings().weight.detach().clone()
    delta = deltatune.attach(model, Prompt(n_tokens=5, init="text", init_token_ids=[7, 8]))
    tokens = next(iter(delta.trainable_parameters().values()))
    torch.testing.assert_close(tokens, table[[7, 8, 7, 8, 7]], rtol=0, atol=0)
    delta.detach()
    delta = deltatune.attach(model, Prompt(n_tokens=5, init="vocab"))
    tokens = next(iter(delta.trainable_parameters().values()))
    assert all((table == row).all(1).any() for row in tokens)
    delta.detach()
    with pytest.raises(deltatune.ConfigError, match="init_token_ids"):
        deltatune.attach(model, Prompt(init="text", init_text="Classify the sentiment:"))  # no tokenizer path
    with pytest.raises(deltatune.ConfigError, match="init_text"):
        Prompt(init="text")


def test_templates_and_encoders():
    assert PTuning(template="[P][P][P] {text} [P][P]").counts() == (3, 2)
    with pytest.raises(deltatune.ConfigError, match="template"):
        PTuning(template="[P] {text} It was {mask}")
    model = tiny_model("gpt2")
    for encoder, modules in [("lstm", "lstm"), ("mlp", "encoder.0"), ("none", None)]:
        delta = deltatune.attach(model, PTuning(template="[P] {text} [P]", encoder=encoder))
        names = list(delta.trainable_parameters())
        assert any(modules in n for n in names) if modules else names == ["transformer.wte.tokens.embedding"]
        delta.detach()
