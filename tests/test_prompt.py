"""Prompt tuning and P-tuning v1: layout of virtual tokens, padding on either side, inits, templates."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.methods.prompt import Prompt
from deltatune.methods.ptuning import PTuning
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
    assert PTuning(template="[P][P][P] {text} [P][P]").pieces() == (["[P]"] * 3, ["[P]"] * 2)
    assert PTuning(template="[P] Review: {text} [P] It was {mask}.").pieces() == (
        ["[P]", " Review:"], ["[P]", " It was", "{mask}", "."])
    for bad in ["[P] {text} {text}", "{text} It was {mask}", "[P] text"]:
        with pytest.raises(deltatune.ConfigError, match="exactly one {text} and at least one"):
            PTuning(template=bad)
    model = tiny_model("gpt2")
    for encoder, modules in [("lstm", "lstm"), ("mlp", "encoder.0"), ("none", None)]:
        delta = deltatune.attach(model, PTuning(template="[P] {text} [P]", encoder=encoder))
        names = list(delta.trainable_parameters())
        assert any(modules in n for n in names) if modules else names == ["transformer.wte.tokens.embedding"]
        delta.detach()


def test_template_words_and_mask_sit_in_the_layout():
    mask = torch.tensor([[1, 1, 1, 0]])
    config = PTuning(template="[P] {text} [P] It {mask}", encoder="none", literal_token_ids=[[7], [5]])
    bert = deltatune.attach(tiny_model("bert"), config)
    # table rows: 0-3 input, 4-5 virtual tokens, 6 "It", 7 mask token
    assert bert.layout(mask).tolist() == [[0, 4, 1, 2, 5, 6, 7, 3]]  # CLS, P, text, P, It, MASK, pad
    assert len(bert.trainable_parameters()["bert.embeddings.word_embeddings.tokens.embedding"]) == 2


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_template_words_equal_the_same_words_written_into_the_input(arch):
    """Literal template tokens are embedded by the frozen table: exactly as if they were in the input ids."""
    model, ids = tiny_model(arch), tiny_batch()["input_ids"][1:]
    words = PTuning(template="[P][P] {text} It was {mask}", encoder="none", literal_token_ids=[[7, 8], [5]])
    delta = deltatune.attach(model, words)
    perturb(delta)
    virtual = next(iter(delta.trainable_parameters().values())).detach().clone()
    with torch.no_grad():
        with_words = model(input_ids=ids).logits
    delta.detach()
    delta = deltatune.attach(model, PTuning(template="[P][P] {text}", encoder="none"))
    with torch.no_grad():
        next(iter(delta.trainable_parameters().values())).copy_(virtual)
        written = model(input_ids=torch.cat([ids, torch.tensor([[7, 8, 5]]).expand(len(ids), -1)], 1)).logits
    torch.testing.assert_close(with_words, written, atol=1e-5, rtol=1e-4)


def test_template_words_are_tokenized_once_and_saved(tmp_path):
    from deltatune.models.load import load_model

    model, tokenizer = load_model("minilm", "classification", 2)
    delta = deltatune.attach(model, PTuning(template="[P][P] {text} [P] It was {mask}"))
    assert delta.config.literal_token_ids == [tokenizer(" It was", add_special_tokens=False)["input_ids"],
                                              [tokenizer.mask_token_id]]
    delta.save(tmp_path)
    fresh = load_model("minilm", "classification", 2)[0]
    fresh.config._name_or_path = ""  # loading needs no tokenizer: the ids are in the saved config
    assert deltatune.load(fresh, tmp_path).config.literal_token_ids == delta.config.literal_token_ids


def test_template_errors(monkeypatch):
    with pytest.raises(deltatune.ConfigError, match="needs the model's tokenizer.*give literal_token_ids"):
        deltatune.attach(tiny_model("gpt2"), PTuning(template="[P] {text} It was"))
    with pytest.raises(deltatune.ConfigError, match="literal_token_ids has 1 entries but the template"):
        deltatune.attach(tiny_model("gpt2"), PTuning(template="[P] {text} It was {mask}", literal_token_ids=[[5]]))

    class NoMask:
        mask_token_id = None

    monkeypatch.setattr("deltatune.models.load.load_tokenizer", lambda path: NoMask())
    model = tiny_model("gpt2")
    model.config._name_or_path = "some/decoder"
    with pytest.raises(deltatune.ConfigError, match="has no mask token .*drop {mask}"):
        deltatune.attach(model, PTuning(template="[P] {text} It was {mask}"))


def test_ptuning_for_inference_keeps_only_the_encoded_tokens(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch()
    delta = deltatune.attach(model, PTuning(template="[P][P] {text} [P]", encoder="lstm", hidden_size=8))
    perturb(delta, 0.1)
    with torch.no_grad():
        before = model(**batch).logits
    delta.for_inference()
    assert {n: tuple(p.shape) for n, p in delta.trainable_parameters().items()} == {
        "model.embed_tokens.tokens.embedding": (3, 32)}
    delta.save(tmp_path)
    fresh = tiny_model("llama")
    assert deltatune.load(fresh, tmp_path).config.encoder == "none"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, before, atol=1e-6, rtol=1e-5)
