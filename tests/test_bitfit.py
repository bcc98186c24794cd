"""BitFit: only biases train, subset selection, the task head, bias-free models (add_missing), exact detach."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.errors import TargetError
from deltatune.methods.bitfit import BitFit
from deltatune.methods.head import Head
from deltatune.registry import parse_delta_config
from deltatune.targeting import DeltaModule
from tests.tiny import tiny_batch, tiny_model

_MODELS: dict[str, nn.Module] = {}

# For the shared suites (test_contract.py, ...): tiny Llama has no biases: add them (GPT-2, BERT: plain BitFit); not
# on the residual writers, whose zero-init biases move the random model's 0.02-scale residual stream ~50% per Adam
# step at lr 1e-2 (loss rises)
CONTRACT_ARGS = {"add_missing": True, "exclude": ["o_proj", "down_proj"]}


def model(arch: str) -> nn.Module:
    """A fresh copy of one cached tiny classification model (building from config is the slow part)."""
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch)
    return copy.deepcopy(_MODELS[arch])


def logits(m: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).logits


def biases(m: nn.Module) -> set[str]:
    return {n for n, _ in m.named_parameters() if n.endswith("bias")}


def test_default_trains_every_bias_but_the_head():
    m = model("bert")
    delta = deltatune.attach(m, BitFit())
    trained = set(delta.trainable_parameters())
    assert trained == biases(m) - {"classifier.bias"}  # LayerNorm, attention, FFN, pooler, embeddings' norm
    assert any("LayerNorm.bias" in n for n in trained) and "bert.pooler.dense.bias" in trained
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trained
    delta.detach()
    assert deltatune.attach(m, BitFit(include_head=True)).trainable_parameters().keys() == biases(m)


def test_targets_pick_subsets_with_layers_and_exclude():
    m = model("bert")
    delta = deltatune.attach(m, BitFit(targets=["query", "re:.*intermediate.*"]))
    assert set(delta.trainable_parameters()) == {f"bert.encoder.layer.{i}.{part}.bias" for i in (0, 1)
                                                 for part in ("attention.self.query", "intermediate.dense")}
    delta.detach()
    delta = deltatune.attach(m, BitFit(targets=["query", "key"], layers=[1], exclude=["key"]))
    assert set(delta.trainable_parameters()) == {"bert.encoder.layer.1.attention.self.query.bias"}
    delta.detach()
    delta = deltatune.attach(m, BitFit(layers="0-0", exclude=["re:.*LayerNorm"]))
    assert delta.trainable_parameters() and all(n.startswith("bert.encoder.layer.0.") and "LayerNorm" not in n
                                                for n in delta.trainable_parameters())
    assert parse_delta_config({"method": "bitfit", "targets": "query"}).targets == ["query"]


def test_targets_without_bias_and_nothing_matching_are_clear_errors():
    m = model("bert")
    with pytest.raises(TargetError, match=r"'attention' matches .* none of them holds a bias.*Candidates: .*query"):
        deltatune.attach(m, BitFit(targets=["attention"]))
    with pytest.raises(TargetError, match="matches no module.*Candidates"):
        deltatune.attach(m, BitFit(targets=["qeury"]))
    with pytest.raises(TargetError, match="include_head: true"):
        deltatune.attach(m, BitFit(targets=["classifier"]))
    with pytest.raises(TargetError, match="no bias terms are left"):
        deltatune.attach(m, BitFit(exclude=["re:.*"]))
    assert not any(p.requires_grad is False for p in m.parameters())  # failed attaches left the model alone


def test_bias_free_architecture_gets_zero_biases_unless_add_missing_is_false():
    m, batch = model("llama"), tiny_batch()
    with pytest.raises(TargetError, match="LlamaForSequenceClassification has no bias terms.*add_missing: true"):
        deltatune.attach(m, BitFit(add_missing=False))
    with pytest.raises(TargetError, match="'q_proj' matches .* none of them holds a bias"):
        deltatune.attach(m, BitFit(targets=["q_proj"], add_missing=False))

    before, keys = logits(m, batch), set(m.state_dict())
    delta = deltatune.attach(m, BitFit())  # add_missing: auto adds them, as the model has none
    linears = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "score"}
    assert set(delta.trainable_parameters()) == {f"{n}.bias" for n in linears}  # 7 per layer, not the head
    assert torch.equal(logits(m, batch), before)  # zero biases change nothing
    assert not any(isinstance(mod, DeltaModule) for mod in m.modules())  # real Linear biases, no wrappers
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.normal_(std=0.1)
    trained = logits(m, batch)
    delta.merge()  # already ordinary biases: merging changes nothing
    assert torch.equal(logits(m, batch), trained)
    delta.unmerge()
    delta.detach()
    assert set(m.state_dict()) == keys and all(mod.bias is None for n, mod in m.named_modules() if n in linears)
    assert torch.equal(logits(m, batch), before)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_training_changes_only_biases_and_detach_restores_them(arch):
    m, batch = model(arch), tiny_batch()
    original = {k: v.clone() for k, v in m.state_dict().items()}
    delta = deltatune.attach(m, BitFit(include_head=True))
    assert delta.trainable_parameters() and all(n.endswith("bias") for n in delta.trainable_parameters())
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    m.eval()  # no dropout: measure training, not noise
    labels = torch.tensor([0, 1, 1, 0])
    first = F.cross_entropy(m(**batch).logits, labels).item()
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(m(**batch).logits, labels).backward()
        optimizer.step()
    assert F.cross_entropy(m(**batch).logits, labels).item() < first
    now = m.state_dict()
    changed = {k for k in original if not torch.equal(now[k], original[k])}
    assert changed and changed <= set(delta.trainable_parameters())
    delta.detach()
    assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())


def test_composes_with_a_new_head_in_either_order():
    m = model("bert")
    group = deltatune.attach(m, [BitFit(), Head(num_labels=3)])  # the head owns the new classifier
    assert "classifier.bias" in group.parts()[1].trainable_parameters()
    assert logits(m, tiny_batch()).shape[-1] == 3
    group.detach()
    group = deltatune.attach(m, [Head(num_labels=3), BitFit(include_head=True)])  # head first: its bias is taken
    bitfit = group.parts()[1].trainable_parameters()
    assert "classifier.bias" not in bitfit and "bert.pooler.dense.bias" in bitfit


def test_save_and_load_with_added_biases(tmp_path):
    m, batch = model("llama"), tiny_batch()
    delta = deltatune.attach(m, BitFit(add_missing=True, targets=["q_proj", "v_proj"], layers=[0]))
    assert set(delta.trainable_parameters()) == {"model.layers.0.self_attn.q_proj.bias",
                                                 "model.layers.0.self_attn.v_proj.bias"}
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.normal_()
    delta.save(tmp_path)
    fresh = model("llama")
    deltatune.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), logits(m, batch))
