"""NEFTune (train.neftune_alpha): transformers' noise where there is no padding, real lengths with padding and packing,
nothing in eval mode, with any delta, and in the training loop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.integrations.neftune import neftune_post_forward_hook  # noqa: E402

import deltatune  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.methods.prefix import Prefix  # noqa: E402
from deltatune.methods.prompt import Prompt  # noqa: E402
from deltatune.optim import OptimizerConfig  # noqa: E402
from deltatune.train import TrainConfig, train  # noqa: E402
from deltatune.train.neftune import NEFTune  # noqa: E402
from tests.test_loop import COLLATE, rows, task_data  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

ALPHA = 5.0


def lm(arch: str = "llama") -> nn.Module:
    return tiny_model(arch, head="lm", dropout=0.0)


def noisy_embeddings(model: nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) input embeddings of one training-mode forward under NEFTune, noise drawn after seed 7."""
    seen = []
    embeddings = model.get_input_embeddings()
    clean = embeddings(inputs["input_ids"]).detach()
    model.train()
    with NEFTune(model, ALPHA):
        hook = embeddings.register_forward_hook(lambda m, a, out: seen.append(out.detach()))  # runs after the noise
        torch.manual_seed(7)
        model(**inputs)
        hook.remove()
    return clean, seen[0]


def test_no_padding_equals_transformers_hook():
    model, ids = lm(), torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    with NEFTune(model, ALPHA):
        torch.manual_seed(7)
        ours = model(**batch).logits
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = ALPHA
    hook = embeddings.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(7)
    theirs = model(**batch).logits
    hook.remove()
    clean = model(**batch).logits
    assert (ours - clean).abs().max() > 1e-3  # the noise is really there
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_padding_gets_no_noise_and_each_row_its_own_length():
    model = lm()
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # row 0: 6 real tokens, right padding; row 1: 10
    clean, noisy = noisy_embeddings(model, input_ids=ids, attention_mask=mask)
    torch.manual_seed(7)
    uniform = torch.zeros_like(clean).uniform_(-1, 1)
    width = clean.shape[-1]
    expected = uniform * torch.tensor([ALPHA / math.sqrt(6 * width), ALPHA / math.sqrt(10 * width)])[:, None, None]
    expected[0, 6:] = 0
    torch.testing.assert_close(noisy - clean, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(noisy[0, 6:], clean[0, 6:])


def test_packed_rows_use_each_examples_length():
    model = lm()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # examples of 3, 2 and 4 tokens in one row
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(2))
    clean, noisy = noisy_embeddings(model, input_ids=ids, position_ids=positions)
    torch.manual_seed(7)
    uniform = torch.zeros_like(clean).uniform_(-1, 1)
    lengths = torch.tensor([3, 3, 3, 2, 2, 4, 4, 4, 4], dtype=torch.float)
    expected = uniform * (ALPHA / torch.sqrt(lengths * clean.shape[-1]))[None, :, None]
    torch.testing.assert_close(noisy - clean, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", [LoRA(targets=["embed_tokens", "q_proj"]), Prompt(n_tokens=3), Prefix(n_tokens=3)],
                         ids=["lora-on-embeddings", "prompt", "prefix"])
def test_any_delta_noisy_in_training_untouched_in_eval(method):
    model = lm()
    deltatune.attach(model, method)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    clean = model(**batch).logits
    with NEFTune(model, ALPHA):
        assert torch.equal(model(**batch).logits, clean)  # eval mode: no noise
        model.train()
        assert (model(**batch).logits - clean).abs().max() > 1e-3
    assert torch.equal(model(**batch).logits, clean)  # training mode after the context: hooks are gone


def test_training_with_neftune_changes_training_not_evaluation(tmp_path):
    results = {}
    for alpha in (None, 15.0):
        model = tiny_model("gpt2", head="lm", dropout=0.0)
        delta = deltatune.attach(model, LoRA(r=4))
        cfg = TrainConfig(epochs=1, batch_size=8, neftune_alpha=alpha, optimizer=OptimizerConfig(lr=1e-2))
        out = tmp_path / str(alpha)
        results[alpha] = train(model, delta, task_data("text", n_train=32), cfg, out, collate=COLLATE)
        results[alpha, "losses"] = [r["loss"] for r in rows(out, "train")]
        assert not model.get_input_embeddings()._forward_hooks  # removed after training
    assert results[None].baseline == results[15.0].baseline  # evaluation before training: no noise
    assert results[None, "losses"][0] != results[15.0, "losses"][0]  # the first step already sees the noise


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="neftune_alpha"):
        TrainConfig(neftune_alpha=0)
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        TrainConfig(neftune_noise_alpha=5)
    assert TrainConfig().neftune_alpha is None
    with pytest.raises(ConfigError, match="train.neftune_alpha adds noise to the input embeddings, and Sequential has "
                                          r"none \(no get_input_embeddings\(\)\): remove neftune_alpha"):
        NEFTune(nn.Sequential(nn.Linear(2, 2)), ALPHA).__enter__()
