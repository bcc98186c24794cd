"""Side-tuning: learnable alpha in (0, 1), the blend formula, training on classification and LM, the curriculum."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import deltatune  # noqa: E402
from deltatune.errors import ConfigError, TargetError  # noqa: E402
from deltatune.methods.side import SequenceMean, Side, SideBlend, TokenOnly  # noqa: E402
from deltatune.registry import parse_delta_config  # noqa: E402
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

LAST = {"bert": "bert.encoder.layer.1", "gpt2": "transformer.h.1", "llama": "model.layers.1"}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def task_loss(model, batch, head):
    out = model(**batch).logits
    if head == "lm":
        return F.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    return F.cross_entropy(out, torch.tensor([0, 1, 1, 0]))


def randomize(delta, seed=0):
    """Non-zero side weights (the output layer starts at zero) so the side network visibly contributes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in delta.trainable_parameters().items():
            if ".side." in name:
                p.normal_(std=0.3)


def test_config_is_validated_and_parsed():
    assert parse_delta_config({"method": "side", "hidden_size": 8, "alpha_schedule": "linear"}).hidden_size == 8
    for bad in ({"alpha_init": 1.0}, {"alpha_init": 0.0}, {"hidden_size": 0}, {"alpha_schedule": "cosine"},
                {"context": "causal"}, {"width": 3}):
        with pytest.raises(ConfigError):
            Side(**bad)


def test_alpha_is_learnable_and_stays_in_the_open_interval():
    model, batch = tiny_model("bert"), tiny_batch()
    delta = deltatune.attach(model, Side(alpha_init=0.9))
    params = delta.trainable_parameters()
    logit = params["bert.encoder.layer.1.side_alpha_logit"]
    assert logit.requires_grad and logit.numel() == 1
    assert delta.alpha() == pytest.approx(0.9, abs=1e-6)
    assert not delta.preserves_output and not delta.mergeable
    optimizer = torch.optim.SGD(params.values(), lr=50.0)  # huge steps: sigmoid keeps alpha inside (0, 1)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        task_loss(model, batch, "classification").backward()
        assert logit.grad != 0
        optimizer.step()
    assert delta.alpha() != pytest.approx(0.9, abs=1e-3)
    assert 0.0 < delta.alpha() < 1.0


@pytest.mark.parametrize("arch,head,context", [("bert", "classification", SequenceMean),
                                               ("gpt2", "lm", TokenOnly)])
def test_blended_output_matches_a_manual_computation(arch, head, context):
    model, batch = tiny_model(arch, head=head), tiny_batch()
    seen = {}
    last = model.get_submodule(LAST[arch])
    hook = last.register_forward_hook(lambda m, i, o: seen.__setitem__("base", o[0] if isinstance(o, tuple) else o))
    embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.__setitem__("embeds", o))
    delta = deltatune.attach(model, Side(hidden_size=8, num_layers=2))
    randomize(delta)
    blend = model.get_submodule(LAST[arch])
    assert isinstance(blend, SideBlend) and isinstance(blend.side.context, context)
    blend.register_forward_hook(lambda m, i, o: seen.__setitem__("blended", o))
    logits(model, batch)

    # side network by hand: LayerNorm (no affine) -> context -> Linear+GELU, Linear+GELU -> Linear
    p = {n.removeprefix(LAST[arch] + "."): t.detach() for n, t in delta.trainable_parameters().items()}
    x = F.layer_norm(seen["embeds"], seen["embeds"].shape[-1:])
    if context is SequenceMean:
        w = batch["attention_mask"].float()[..., None]
        x = torch.cat([x, ((x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)).expand_as(x)], dim=-1)
    h = F.gelu(F.linear(x, p["side.mlp.0.weight"], p["side.mlp.0.bias"]))
    h = F.gelu(F.linear(h, p["side.mlp.2.weight"], p["side.mlp.2.bias"]))
    side = F.linear(h, p["side.out.weight"], p["side.out.bias"])
    alpha = torch.sigmoid(p["side_alpha_logit"])
    torch.testing.assert_close(seen["blended"], alpha * seen["base"] + (1 - alpha) * side, rtol=1e-5, atol=1e-6)
    assert side.abs().mean() > 0.01  # the side network really contributed
    hook.remove()
    embed_hook.remove()


@pytest.mark.parametrize("arch,head", [("bert", "classification"), ("llama", "classification"), ("gpt2", "lm"),
                                       ("llama", "lm")])
def test_classification_and_language_modelling_train(arch, head):
    model, batch = tiny_model(arch, head=head), tiny_batch()
    delta = deltatune.attach(model, Side(hidden_size=16))
    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    first = task_loss(model, batch, head).item()
    for _ in range(15):
        optimizer.zero_grad()
        task_loss(model, batch, head).backward()
        optimizer.step()
    assert task_loss(model, batch, head).item() < first - 0.01


def test_generative_models_get_a_causal_side_network():
    model, batch = tiny_model("gpt2", head="lm"), tiny_batch()
    with pytest.raises(ConfigError, match="later tokens"):
        deltatune.attach(model, Side(context="mean"))
    delta = deltatune.attach(model, Side())
    randomize(delta)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, -1] = 5  # a later token must not change earlier positions
    torch.testing.assert_close(logits(model, changed)[:, :-1], logits(model, batch)[:, :-1], rtol=0, atol=0)
    # per-token side network: KV-cache generation gives what recomputing the whole sequence gives
    prompt = {"input_ids": batch["input_ids"][1:2, :5], "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**prompt, use_cache=True, **kw), model.generate(**prompt, use_cache=False, **kw))


def test_linear_schedule_starts_exactly_at_the_base_and_decays_the_floor(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch()
    before = logits(model, batch)
    delta = deltatune.attach(model, Side(alpha_schedule="linear", schedule_steps=4, alpha_init=0.5))
    assert delta.preserves_output
    randomize(delta)
    assert torch.equal(logits(model, batch), before)  # floor 1: alpha exactly 1, whatever the side network says
    floor = delta.trainable_parameters()["model.layers.1.side_alpha_floor"]
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2, weight_decay=0.1)
    model.train()
    floors = []
    for _ in range(3):
        optimizer.zero_grad()
        task_loss(model, batch, "classification").backward()
        assert floor.grad is None  # never trained: only the schedule moves it
        optimizer.step()
        floors.append(float(floor.detach()))
    assert floors == pytest.approx([0.75, 0.5, 0.25])
    assert delta.alpha() == pytest.approx(0.25 + 0.75 * float(torch.sigmoid(
        delta.trainable_parameters()["model.layers.1.side_alpha_logit"].detach())))
    model.eval()
    logits(model, batch)  # eval passes do not advance the curriculum
    assert float(floor.detach()) == pytest.approx(0.25)
    expected = logits(model, batch)
    delta.save(tmp_path)  # the floor is saved: a loaded delta continues the curriculum where it was
    fresh = tiny_model("llama")
    loaded = deltatune.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    fresh.train()
    for _ in range(3):
        task_loss(fresh, batch, "classification")
    assert float(loaded.trainable_parameters()["model.layers.1.side_alpha_floor"].detach()) == 0.0  # clamped at 0


def test_attach_twice_is_refused_and_detach_removes_every_hook():
    model = tiny_model("bert")
    embedding = model.get_input_embeddings()
    hooks = (dict(model._forward_pre_hooks_with_kwargs), dict(embedding._forward_hooks))
    delta = deltatune.attach(model, Side())
    with pytest.raises(TargetError, match="already carries a side delta"):
        deltatune.attach(model, Side())
    delta.detach()
    assert (dict(model._forward_pre_hooks_with_kwargs), dict(embedding._forward_hooks)) == hooks
    assert not any(isinstance(m, SideBlend) for m in model.modules())


def test_combines_with_a_head_and_runs_under_gradient_checkpointing():
    model, batch = tiny_model("bert", num_labels=3), tiny_batch()
    group = deltatune.attach(model, [Side(hidden_size=8), deltatune.Head(num_labels=3)])
    model.gradient_checkpointing_enable()
    model.train()
    F.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 2, 0])).backward()
    grads = {n: p.grad for n, p in group.trainable_parameters().items()}
    assert grads["bert.encoder.layer.1.side.out.weight"].abs().sum() > 0
    assert grads["classifier.weight"].abs().sum() > 0
