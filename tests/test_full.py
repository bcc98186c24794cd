"""Full fine-tuning: freezing by pattern / position, in-place training, exact detach, save/load, tied weights, CNNs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.delta import TENSOR_FILE  # noqa: E402
from deltatune.storage import load_tensors  # noqa: E402
from deltatune.methods.full import Full  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

LABELS = torch.tensor([0, 1, 1, 0])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train(model, delta, steps=6, lr=1e-2, batch=None):
    batch = batch or tiny_batch()
    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(**batch).logits, LABELS)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_attach_keeps_outputs_and_trains_everything():
    model, batch = tiny_model("bert"), tiny_batch()
    before = logits(model, batch)
    delta = deltatune.attach(model, Full())
    assert torch.equal(logits(model, batch), before)
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}
    n_trainable, n_total = delta.parameter_counts()
    assert n_trainable == n_total == sum(p.numel() for p in model.parameters())


def test_trainable_count_is_total_minus_frozen():
    model = tiny_model("bert")
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.bert.embeddings.parameters()) + model.bert.pooler.dense.bias.numel()
    delta = deltatune.attach(model, Full(freeze=["embeddings", "re:bert\\.pooler\\.dense\\.bias"]))
    assert delta.parameter_counts() == (total - frozen, total)
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert model.bert.pooler.dense.weight.requires_grad and not model.bert.pooler.dense.bias.requires_grad


def test_freeze_first_freezes_embeddings_and_first_layers():
    model = tiny_model("bert")
    deltatune.attach(model, Full(freeze_first=1))
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))}
    assert len(expected) == 16 + 2 + 2
    assert trainable_names(model) == expected


def test_train_last_trains_last_layers_and_everything_after():
    model = tiny_model("llama")
    deltatune.attach(model, Full(train_last=1))
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    assert trainable_names(model) == expected | {"model.norm.weight", "score.weight"}

    only_after = tiny_model("llama")
    deltatune.attach(only_after, Full(train_last=0, freeze=["score"]))
    assert trainable_names(only_after) == {"model.norm.weight"}


def test_freeze_embeddings():
    model = tiny_model("gpt2")
    deltatune.attach(model, Full(freeze_embeddings=True))
    assert trainable_names(model) == {n for n, _ in model.named_parameters()} - {"transformer.wte.weight",
                                                                                   "transformer.wpe.weight"}


def test_freeze_pattern_typo_lists_candidates():
    with pytest.raises(deltatune.TargetError, match=r"'atention'.*Did you mean.*Candidates"):
        deltatune.attach(tiny_model("bert"), Full(freeze=["atention"]))
    with pytest.raises(deltatune.TargetError, match="only 2 layers"):
        deltatune.attach(tiny_model("bert"), Full(freeze_first=3))
    with pytest.raises(deltatune.TargetError, match="selects nothing to train"):
        deltatune.attach(tiny_model("bert"), Full(freeze=["bert", "classifier"]))
    with pytest.raises(deltatune.ConfigError, match="unknown key"):
        deltatune.registry.parse_delta_config({"method": "full", "freez": ["bert"]})


def test_training_lowers_loss_changes_trained_weights_only():
    model = tiny_model("bert")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = deltatune.attach(model, Full(freeze_first=1))
    losses = train(model, delta)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]) != p.requires_grad, name


def test_detach_restores_weights_flags_and_merge_is_a_no_op():
    model, batch = tiny_model("bert"), tiny_batch()
    model.bert.pooler.dense.bias.requires_grad_(False)  # a flag the user set must come back as it was
    original = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    delta = deltatune.attach(model, Full(freeze=["embeddings"]))
    train(model, delta, steps=3)
    trained = logits(model, batch)
    assert not torch.equal(trained, logits(tiny_model("bert"), batch))
    delta.merge()
    assert torch.equal(logits(model, batch), trained)
    delta.detach()  # merged: detach unmerges first
    after = model.state_dict()
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_save_load_round_trip(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch()
    delta = deltatune.attach(model, Full(freeze_first=1))
    train(model, delta, steps=3)
    expected = logits(model, batch)
    delta.save(tmp_path)
    assert set(load_tensors(tmp_path / TENSOR_FILE)) == trainable_names(model)
    fresh = tiny_model("bert")
    loaded = deltatune.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    assert trainable_names(fresh) == trainable_names(model)
    loaded.detach()
    assert torch.equal(logits(fresh, batch), logits(tiny_model("bert"), batch))


def test_tied_weights_are_one_tensor_trained_counted_and_saved_once(tmp_path):
    model, batch = tiny_model("gpt2", head="lm"), tiny_batch()
    assert model.lm_head.weight is model.transformer.wte.weight
    delta = deltatune.attach(model, Full())
    unique = sum(p.numel() for p in model.parameters())
    assert delta.parameter_counts() == (unique, unique)
    names = set(delta.trainable_parameters())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # named as in named_parameters()

    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        optimizer.step()
    expected = logits(model, batch)
    delta.save(tmp_path)
    assert set(load_tensors(tmp_path / TENSOR_FILE)) == names
    fresh = tiny_model("gpt2", head="lm")
    deltatune.load(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(logits(fresh, batch), expected)

    # a tied tensor is frozen if any of its names is: freezing the embeddings freezes the LM head with them
    frozen = tiny_model("gpt2", head="lm")
    deltatune.attach(frozen, Full(freeze_embeddings=True))
    assert not frozen.lm_head.weight.requires_grad


class SmallCNN(nn.Module):
    """A plain PyTorch CNN: a stem, a stack of identical blocks (the generic 'layers'), a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("config, frozen_prefixes", [
    (Full(freeze=["stem", "blocks.0"]), ("stem.", "blocks.0.")),
    (Full(freeze_first=2), ("stem.", "blocks.0.", "blocks.1.")),
    (Full(train_last=1), ("stem.", "blocks.0.", "blocks.1.")),
    (Full(freeze=["type:Conv2d"]), ("stem.", "blocks.0.0.", "blocks.1.0.", "blocks.2.0.")),
])
def test_plain_cnn_freezes_early_convs_and_fine_tunes_the_rest(config, frozen_prefixes):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    delta = deltatune.attach(model, config)
    frozen = {n for n, _ in model.named_parameters() if n.startswith(frozen_prefixes)}
    assert trainable_names(model) == {n for n, _ in model.named_parameters()} - frozen
    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]) == (name in frozen), name
    delta.detach()  # restores weights and BatchNorm running statistics (buffers) exactly
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_generic_model_without_layer_stack():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(deltatune.TargetError, match="need a layer stack"):
        deltatune.attach(model, Full(freeze_first=1))
    deltatune.attach(model, Full(freeze_embeddings=True))
    assert trainable_names(model) == {"1.weight", "1.bias"}
