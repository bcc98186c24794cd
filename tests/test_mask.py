"""Mask tuning: threshold checks, all-ones start, straight-through gradients, flips, 1-bit export, merge."""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.errors import CheckpointError, ConfigError  # noqa: E402
from deltatune.storage import load_tensors  # noqa: E402
from deltatune.methods.mask import Mask, MaskModule, pack_bits, unpack_bits  # noqa: E402
from deltatune.registry import parse_delta_config  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

LABELS = torch.tensor([0, 1, 1, 0])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, delta, batch, steps=5, lr=0.05):
    """High LR: Adam moves every score by ~lr per step, so scores with a positive gradient cross the threshold."""
    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(**batch).logits, LABELS).backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("bad", [{"threshold": 0.0}, {"threshold": 1.0}, {"threshold": -0.1}, {"threshold": 1.5},
                                 {"threshold": 0.5, "init_score": 0.5}, {"init_score": 1e-3}, {"scores": 1}])
def test_bad_configs_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="threshold|init_score|scores"):
        Mask(**bad)


def test_yaml_style_config():
    cfg = parse_delta_config({"method": "mask", "threshold": 0.1, "init_score": 0.2, "targets": "query"})
    assert cfg.targets == ["query"] and cfg.threshold == 0.1


@pytest.mark.parametrize("arch", ["gpt2", "bert"])  # GPT-2 Conv1D and nn.Linear
def test_starts_all_ones_with_identical_outputs(arch):
    model, batch = tiny_model(arch), tiny_batch()
    before = logits(model, batch)
    delta = deltatune.attach(model, Mask())
    assert delta.preserves_output and delta.sparsity() == 0.0
    assert torch.equal(logits(model, batch), before)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MaskModule)]
    assert wrapped and not any(n.endswith(("score", "classifier")) for n in wrapped)  # heads stay untouched
    assert all(n.endswith(".mask_scores") for n in delta.trainable_parameters())


def test_straight_through_gradient_is_the_gradient_of_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    deltatune.attach(model, Mask(targets=["0"]))
    x = torch.randn(5, 6)
    model(x).sum().backward()
    weight = model[0].base_layer.weight
    # y = x (W ⊙ m)^T + b, so dL/dm[o, i] = sum_b x[b, i] · W[o, i]; STE hands exactly that to the scores
    expected = x.sum(0)[None, :] * weight.detach()
    torch.testing.assert_close(model[0].mask_scores.grad, expected)
    assert weight.grad is None  # the base weight is frozen


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_flips_bits_and_never_touches_base_weights(arch):
    model, batch = tiny_model(arch), tiny_batch()
    original = base_weights(model)
    delta = deltatune.attach(model, Mask())
    before = logits(model, batch)
    train(model, delta, batch)
    assert 0.0 < delta.sparsity() < 1.0
    assert not torch.equal(logits(model, batch), before)
    masks = delta.masks()
    assert 1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == delta.sparsity()
    delta.detach()
    after = dict(model.named_parameters())
    assert after.keys() == original.keys() and all(torch.equal(after[n], original[n]) for n in original)


def test_bit_packed_export_is_one_32nd_of_the_scores_and_reloads_exactly(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch()
    delta = deltatune.attach(model, Mask())
    train(model, delta, batch, steps=3)
    expected = logits(model, batch)
    delta.export_mask(tmp_path / "mask.safetensors")
    packed = load_tensors(tmp_path / "mask.safetensors")
    bits = {k: v for k, v in packed.items() if k.endswith(".mask_bits")}
    assert all(v.dtype == torch.uint8 for v in bits.values())
    packed_bytes = sum(v.numel() * v.element_size() for v in bits.values())
    scores = delta.trainable_parameters().values()
    score_bytes = sum(p.numel() * p.element_size() for p in scores)
    assert all(p.dtype == torch.float32 for p in scores)
    assert packed_bytes == sum(math.ceil(p.numel() / 8) for p in scores)
    assert packed_bytes * 32 == pytest.approx(score_bytes, rel=1e-3)

    fresh = tiny_model("bert")
    loaded = deltatune.attach(fresh, Mask())
    loaded.import_mask(tmp_path / "mask.safetensors")
    assert torch.equal(logits(fresh, batch), expected)
    assert loaded.sparsity() == delta.sparsity()

    other = deltatune.attach(tiny_model("bert"), Mask(targets=["query"]))
    with pytest.raises(CheckpointError, match="does not fit"):
        other.import_mask(tmp_path / "mask.safetensors")


@pytest.mark.parametrize("shape", [(3, 5), (8,), (2, 3, 7), (1,)])
def test_pack_bits_matches_numpy_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.flatten().numpy()).tolist()
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_merge_is_weight_times_mask_and_unmerge_restores(arch):
    model, batch = tiny_model(arch), tiny_batch()
    original = base_weights(model)
    delta = deltatune.attach(model, Mask())
    train(model, delta, batch, steps=3)
    masks, unmerged = delta.masks(), logits(model, batch)
    assert delta.sparsity() > 0
    delta.merge()
    assert not any(isinstance(m, MaskModule) for m in model.modules())
    merged = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = f"{name}.weight"
        assert torch.equal(merged[weight], original[weight] * mask)
    assert torch.equal(logits(model, batch), unmerged)
    delta.unmerge()
    assert torch.equal(logits(model, batch), unmerged)
    delta.detach()
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_merge_refuses_a_tied_weight():
    model = tiny_model("gpt2", head="lm")  # lm_head shares its weight with the input embeddings
    delta = deltatune.attach(model, Mask(targets=["lm_head"]))
    with pytest.raises(ConfigError, match="shared"):
        delta.merge()
