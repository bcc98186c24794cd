"""AdapterFusion: config checks, incompatible adapters, the fusion weights, exact start, save/load with pinned
adapters. (The mixed-task comparison with single adapters is measured by examples/fusion_toy.py, not asserted.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.delta import CONFIG_FILE, TENSOR_FILE
from deltatune.errors import CheckpointError, ConfigError
from deltatune.storage import load_tensors
from deltatune.methods.adapter import Adapter
from deltatune.methods.fusion import Fusion, FusionModule
from tests.saved_adapters import save_adapter
from tests.tiny import tiny_batch, tiny_model

_CACHE: dict[tuple, nn.Module] = {}


def model(arch: str = "bert", num_labels: int = 2) -> nn.Module:
    if (arch, num_labels) not in _CACHE:
        _CACHE[arch, num_labels] = tiny_model(arch, num_labels=num_labels)
    return copy.deepcopy(_CACHE[arch, num_labels])


def logits(m: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).logits


@pytest.fixture
def two(tmp_path):
    """Two different adapters saved for the tiny BERT (Pfeiffer, layer-normed input)."""
    m = model()
    return [str(save_adapter(m, tmp_path / f"a{i}", seed=i, std=0.3, layer_norm=True)) for i in range(2)]


def fusion_of(m: nn.Module) -> dict[str, FusionModule]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, FusionModule)}


def test_fewer_than_two_adapters_is_a_config_error(two):
    with pytest.raises(ConfigError, match="at least 2 saved adapters, got 1"):
        Fusion(adapters=two[:1])
    with pytest.raises(ConfigError, match="distinct"):
        Fusion(adapters=[two[0], two[0]])


def test_only_fusion_attention_trains_and_weights_start_uniform(two):
    m, batch = model(), tiny_batch()
    delta = deltatune.attach(m, Fusion(adapters=two))
    sites = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert list(fusion_of(m)) == sites
    assert {n.split(".fusion.")[1] for n in delta.trainable_parameters()} == {
        f"{qkv}.{wb}" for qkv in ("query", "key", "value") for wb in ("weight", "bias")}
    assert not any(p.requires_grad for w in fusion_of(m).values() for p in w.adapters.parameters())
    assert delta.fusion_weights() == {}
    logits(m, batch)
    weights = delta.fusion_weights()
    assert list(weights) == sites
    for w in weights.values():
        assert w.shape == (4, 10, 2)
        torch.testing.assert_close(w, torch.full_like(w, 0.5), rtol=0, atol=0)  # Q = 0: exactly uniform
    assert delta.extra_loss().item() == 0.0  # V = I


def test_fusion_starts_as_the_mean_of_the_adapters(tmp_path):
    """Two identical adapters: uniform weights and V = I make the fusion the single adapter exactly."""
    m, batch = model(), tiny_batch()
    folders = [str(save_adapter(m, tmp_path / f"same{i}", seed=7, std=0.3)) for i in range(2)]
    single = model()
    deltatune.load(single, folders[0])
    deltatune.attach(m, Fusion(adapters=folders))
    torch.testing.assert_close(logits(m, batch), logits(single, batch), rtol=0, atol=1e-6)


def test_training_lowers_loss_and_weights_stay_a_distribution(two):
    torch.manual_seed(0)
    m, batch, labels = model(), tiny_batch(), torch.tensor([0, 1, 1, 0])
    delta = deltatune.attach(m, Fusion(adapters=two))
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(m(**batch).logits, labels)

    first = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        (loss() + delta.extra_loss()).backward()
        optimizer.step()
    assert loss().item() < first
    for w in delta.fusion_weights().values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert not torch.allclose(w, torch.full_like(w, 0.5))  # no longer uniform
    assert delta.extra_loss().item() > 0  # V moved away from identity


def test_save_load_round_trip_pins_the_adapters(two, tmp_path):
    m, batch = model(), tiny_batch()
    delta = deltatune.attach(m, Fusion(adapters=two))
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    expected = logits(m, batch)
    delta.save(tmp_path / "fusion")
    assert set(load_tensors(tmp_path / "fusion" / TENSOR_FILE)) == set(delta.trainable_parameters())
    saved = json.loads((tmp_path / "fusion" / CONFIG_FILE).read_text())["deltas"][0]["config"]
    assert saved["adapters"] == ["adapters/0", "adapters/1"] and len(saved["adapter_sha256"]) == 2  # own copies

    save_adapter(model(), tmp_path / "a1", seed=99, std=0.3, layer_norm=True)  # retrain adapter a1 in place
    fresh = model()
    loaded = deltatune.load(fresh, tmp_path / "fusion")  # the saved fusion uses its copies: still the same
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)
    loaded.detach()

    save_adapter(model(), tmp_path / "fusion" / "adapters" / "0", seed=99, std=0.3, layer_norm=True)  # changed copy
    with pytest.raises(CheckpointError, match=r"changed since this fusion was trained"):
        deltatune.load(fresh, tmp_path / "fusion")
    assert not fusion_of(fresh)


def test_detach_restores_the_model(two):
    m = model()
    original = {k: v.clone() for k, v in m.state_dict().items()}
    deltatune.attach(m, Fusion(adapters=two)).detach()
    assert not fusion_of(m)
    assert m.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())


def test_adapters_of_different_bases_are_refused(two, tmp_path):
    other = str(save_adapter(model("llama"), tmp_path / "llama", seed=0, layer_norm=True))
    with pytest.raises(CheckpointError, match="trained on different base models"):
        deltatune.attach(model(), Fusion(adapters=[two[0], other]))


def test_adapters_at_different_placements_are_refused(two, tmp_path):
    houlsby = str(save_adapter(model(), tmp_path / "houlsby", seed=0, placement="houlsby", layer_norm=True))
    with pytest.raises(ConfigError, match="different modules.*same placement"):
        deltatune.attach(model(), Fusion(adapters=[two[0], houlsby]))


def test_adapters_with_different_heads_and_saved_with_a_head_fuse(two, tmp_path):
    """Stage-1 runs save adapter + head together, and tasks differ in label count: the body is what counts."""
    three = model(num_labels=3)
    group = deltatune.attach(three, [Adapter(layer_norm=True), deltatune.Head()])
    with torch.no_grad():
        for p in group.trainable_parameters().values():
            p.normal_(std=0.3)
    group.save(tmp_path / "with-head")
    m = model()
    delta = deltatune.attach(m, [Fusion(adapters=[two[0], str(tmp_path / "with-head")]), deltatune.Head()])
    assert len(fusion_of(m)) == 2 and logits(m, tiny_batch()).shape == (4, 2)
    delta.detach()


def test_folders_that_are_not_single_adapters_are_clear_errors(two, tmp_path):
    lora = deltatune.attach(model(), deltatune.LoRA(targets=["query"]))
    lora.save(tmp_path / "lora")
    with pytest.raises(ConfigError, match=r"exactly one `adapter` delta"):
        deltatune.attach(model(), Fusion(adapters=[two[0], str(tmp_path / "lora")]))
    with pytest.raises(ConfigError, match=r"adapter folders \[.*missing'\] not found"):
        Fusion(adapters=[two[0], str(tmp_path / "missing")])


def test_fusion_is_not_mergeable(two):
    delta = deltatune.attach(model(), Fusion(adapters=two))
    with pytest.raises(ConfigError, match="cannot be merged"):
        delta.merge()
