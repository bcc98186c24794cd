"""Task heads: replace/resize the head, train only it, restore the original head and config on detach."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.methods.full import Full  # noqa: E402
from deltatune.methods.head import Head, TaskHead  # noqa: E402
from deltatune.registry import parse_delta_config  # noqa: E402
from deltatune.targeting import DeltaModule  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

HEAD = {"bert": "classifier", "llama": "score", "gpt2": "score"}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_new_head_with_three_labels_then_detach_restores(arch):
    model, batch = tiny_model(arch), tiny_batch()
    original_head, before = getattr(model, HEAD[arch]), logits(model, batch)
    delta = deltatune.attach(model, Head(num_labels=3))
    assert not delta.preserves_output
    new = getattr(model, HEAD[arch])
    assert isinstance(new, TaskHead) and isinstance(new, nn.Linear) and new.out_features == 3
    assert logits(model, batch).shape == (4, 3)
    expected = {f"{HEAD[arch]}.weight"} | ({f"{HEAD[arch]}.bias"} if arch == "bert" else set())
    assert trainable_names(model) == set(delta.trainable_parameters()) == expected
    assert (model.config.num_labels, model.config.id2label[2]) == (3, "LABEL_2")
    assert abs(new.weight.std().item() - 0.02) < 0.01 and (new.bias is None or not new.bias.any())

    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=5e-2)
    labels, losses = torch.tensor([0, 1, 2, 0]), []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    delta.detach()
    model.eval()
    assert getattr(model, HEAD[arch]) is original_head
    assert (model.config.num_labels, model.config.id2label) == (2, {0: "LABEL_0", 1: "LABEL_1"})
    assert torch.equal(logits(model, batch), before)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_regression_head_and_labels_update_config_then_restore():
    model, batch = tiny_model("bert"), tiny_batch()
    delta = deltatune.attach(model, Head(task="regression"))
    assert logits(model, batch).shape == (4, 1)
    assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    delta.detach()
    assert (model.config.num_labels, model.config.problem_type) == (2, None)

    delta = deltatune.attach(model, Head(labels=["neg", "neutral", "pos"]))
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and model.config.label2id["pos"] == 2
    delta.detach()
    assert model.config.label2id == {"LABEL_0": 0, "LABEL_1": 1}


def test_bad_configs_are_clear_errors():
    with pytest.raises(deltatune.TargetError, match="'clasifier' matches no module.*Did you mean.*Candidates"):
        deltatune.attach(tiny_model("bert"), Head(module="clasifier"))
    with pytest.raises(deltatune.TargetError, match="matches 2 modules"):
        deltatune.attach(tiny_model("bert"), Head(module="re:.*(pooler.dense|classifier)"))
    with pytest.raises(deltatune.ConfigError, match="2 labels are given"):
        parse_delta_config({"method": "head", "num_labels": 3, "labels": ["a", "b"]})
    with pytest.raises(deltatune.ConfigError, match="reinit: true"):
        deltatune.attach(tiny_model("bert"), Head(num_labels=3, reinit=False))


def test_model_without_known_head_lists_linear_candidates_and_module_option_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(deltatune.TargetError, match="no known task head.*Candidate Linear modules.*0, 2"):
        deltatune.attach(model, Head())
    delta = deltatune.attach(model, Head(module="2", num_labels=5))
    assert model(torch.randn(3, 4)).shape == (3, 5) and set(delta.trainable_parameters()) == {"2.weight", "2.bias"}


def test_attaching_a_second_head_on_the_same_module_is_an_error():
    model = tiny_model("llama")
    deltatune.attach(model, Head(num_labels=3))
    with pytest.raises(deltatune.TargetError, match="already carries a head delta"):
        deltatune.attach(model, Head(num_labels=4))
    assert model.score.out_features == 3


def test_reinit_false_trains_a_copy_and_keeps_outputs():
    model, batch = tiny_model("bert"), tiny_batch()
    original, before = model.classifier, logits(model, batch)
    weight = original.weight.detach().clone()
    delta = deltatune.attach(model, Head(reinit=False, also_train=["pooler"]))
    assert delta.preserves_output and torch.equal(logits(model, batch), before)
    assert trainable_names(model) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                      "bert.pooler.dense.bias"}
    pooler = model.bert.pooler.dense.weight.detach().clone()
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.1)
    assert torch.equal(original.weight, weight)  # the original head is never touched
    delta.detach()
    assert model.classifier is original and torch.equal(model.bert.pooler.dense.weight, pooler)
    assert torch.equal(logits(model, batch), before)


def test_merge_leaves_a_plain_linear_with_the_same_tensors():
    model, batch = tiny_model("gpt2"), tiny_batch()
    delta = deltatune.attach(model, Head(num_labels=3))
    out = logits(model, batch)
    delta.merge()
    assert type(model.score) is nn.Linear and model.score.weight is delta.trainable_parameters()["score.weight"]
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert torch.equal(logits(model, batch), out)
    delta.unmerge()
    assert isinstance(model.score, TaskHead)
    delta.merge()
    delta.detach()
    assert model.score.out_features == 2 and not isinstance(model.score, DeltaModule)


def test_save_load_onto_the_original_base(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch()
    delta = deltatune.attach(model, Head(labels=["a", "b", "c"]))
    expected = logits(model, batch)
    delta.save(tmp_path)
    fresh = tiny_model("bert")  # the base still has its 2-label head
    deltatune.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected) and fresh.config.id2label[2] == "c"


def test_head_with_full_fine_tuning(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch()
    group = deltatune.attach(model, [Head(num_labels=3), Full(freeze_first=1)])
    assert [part.role for part in group.parts()] == ["head", "delta"]
    head_names = set(group.parts()[0].trainable_parameters())
    assert head_names == {"classifier.weight", "classifier.bias"}
    assert not head_names & set(group.parts()[1].trainable_parameters())
    with torch.no_grad():
        for p in group.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    expected = logits(model, batch)
    group.save(tmp_path)
    fresh = tiny_model("bert")
    deltatune.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    group.detach()
    assert model.classifier.out_features == 2

    with pytest.raises(deltatune.ConfigError, match="attach the head first"):
        deltatune.attach(tiny_model("bert"), [Full(), Head(num_labels=3)])
