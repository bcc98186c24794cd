"""Parameter groups (layer decay, head LR, per-pattern LRs, no-decay) and LR schedules with exact resume."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import math  # noqa: E402

import pydantic  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import deltatune  # noqa: E402
from deltatune.methods.full import Full  # noqa: E402
from deltatune.methods.head import Head  # noqa: E402
from deltatune.optim import (  # noqa: E402
    OptimizerConfig,
    build_optimizer,
    build_scheduler,
    describe_groups,
)
from tests.tiny import tiny_model  # noqa: E402

LR = 1e-3


def lr_and_wd(optimizer):
    """Parameter id -> (lr, weight_decay, group name)."""
    return {id(p): (g["lr"], g["weight_decay"], g["name"]) for g in optimizer.param_groups for p in g["params"]}


def setup(configs, **opt):
    model = tiny_model("bert")
    delta = deltatune.attach(model, configs)
    optimizer = build_optimizer(model, delta, OptimizerConfig(lr=LR, **opt))
    return model, delta, optimizer, lr_and_wd(optimizer)


def test_layer_decay_gives_geometric_lrs_from_the_head_down():
    model, delta, optimizer, got = setup(Full(), layer_decay=0.5)
    enc = model.bert.encoder.layer  # L = 2
    assert got[id(model.bert.embeddings.word_embeddings.weight)][0] == pytest.approx(LR * 0.5 ** 3)
    assert got[id(model.bert.embeddings.LayerNorm.weight)][0] == pytest.approx(LR * 0.5 ** 3)
    assert got[id(enc[0].attention.self.query.weight)][0] == pytest.approx(LR * 0.5 ** 2)
    assert got[id(enc[1].output.dense.bias)][0] == pytest.approx(LR * 0.5)
    assert got[id(model.bert.pooler.dense.weight)][0] == got[id(model.classifier.weight)][0] == LR
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["embeddings", "layer 0", "layer 1", "after layers"]  # weight_decay 0: one group per lr
    rows = describe_groups(optimizer)
    assert sum(r["n_params"] for r in rows) == delta.parameter_counts()[0]
    assert [r["lr"] for r in rows] == pytest.approx([LR / 8, LR / 4, LR / 2, LR])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"] is True


def test_head_lr_applies_to_head_role_tensors():
    model, _, _, got = setup([Head(num_labels=3), Full()], head_lr=5e-2, layer_decay=0.5)
    assert got[id(model.classifier.weight)][0] == got[id(model.classifier.bias)][0] == 5e-2
    assert got[id(model.classifier.weight)][2] == "head"
    assert got[id(model.bert.pooler.dense.weight)][0] == LR  # after the stack, but not a head delta


def test_lr_groups_regex_overrides_and_first_match_wins():
    model, _, _, got = setup([Head(num_labels=3), Full()], head_lr=5e-2,
                             lr_groups={r"layer\.0\.attention": 1e-5, r"attention": 2e-5, r"^classifier": 3e-5})
    layer0, layer1 = model.bert.encoder.layer
    assert got[id(layer0.attention.self.key.weight)][:3:2] == (1e-5, r"lr_groups[layer\.0\.attention]")
    assert got[id(layer1.attention.output.dense.weight)][0] == 2e-5
    assert got[id(layer1.intermediate.dense.weight)][0] == LR
    assert got[id(model.classifier.weight)][0] == 3e-5  # explicit patterns win over head_lr


def test_unmatched_lr_groups_pattern_is_an_error_listing_names():
    with pytest.raises(deltatune.ConfigError, match=r"\['atention\\\\.query'\] match no trainable.*such as bert\."):
        setup(Full(), lr_groups={r"atention\.query": 1e-4, "query": 1e-4})
    with pytest.raises(deltatune.ConfigError, match="not a valid regex"):
        OptimizerConfig(lr_groups={"(": 1e-4})
    with pytest.raises(deltatune.ConfigError, match="optimizer.learning_rate: unknown key; allowed keys: name, lr, "):
        OptimizerConfig(learning_rate=1e-4)
    with pytest.raises(deltatune.ConfigError, match="optimizer.lr: .*greater than 0"):
        OptimizerConfig(lr=0)
    with pytest.raises(ValidationError):  # nested in a bigger config, pydantic reports it with the outer model
        pydantic.TypeAdapter(OptimizerConfig).validate_python({"lr": -1})


def test_no_decay_for_biases_and_norms():
    model, _, optimizer, got = setup(Full(), weight_decay=0.1)
    layer = model.bert.encoder.layer[0]
    assert got[id(layer.attention.self.query.weight)][1] == 0.1
    assert got[id(model.bert.embeddings.word_embeddings.weight)][1] == 0.1
    for p in (layer.attention.self.query.bias, layer.output.LayerNorm.weight, model.bert.embeddings.LayerNorm.weight,
              model.classifier.bias):
        assert got[id(p)][1] == 0.0
    assert [g["name"] for g in optimizer.param_groups] == ["default", "default (no decay)"]
    llama = tiny_model("llama")
    groups = lr_and_wd(build_optimizer(llama, deltatune.attach(llama, Full()), OptimizerConfig(weight_decay=0.1)))
    assert groups[id(llama.model.layers[0].input_layernorm.weight)][1] == groups[id(llama.model.norm.weight)][1] == 0
    assert groups[id(llama.model.layers[0].mlp.up_proj.weight)][1] == 0.1


def test_sgd():
    _, _, optimizer, _ = setup(Full(), name="sgd", momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


def lrs(schedule, total, steps, **cfg):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, OptimizerConfig(lr=1.0, schedule=schedule, **cfg), total)
    out = []
    for step in range(max(steps) + 1):
        if step in steps:
            out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_with_warmup():
    # 100 steps, 10 of warmup: step 0, warmup end, middle of the decay, end
    steps = [0, 5, 10, 55, 100]
    assert lrs("linear", 100, steps, warmup_ratio=0.1) == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert lrs("cosine", 100, steps, warmup_ratio=0.1) == pytest.approx([0, 0.5, 1, 0.5, 0], abs=1e-12)
    assert lrs("constant", 100, steps, warmup_steps=10) == pytest.approx([0, 0.5, 1, 1, 1])
    assert lrs("linear", 100, [0, 50, 100]) == pytest.approx([1, 0.5, 0])  # no warmup
    cosine = lrs("cosine", 100, [25])  # a quarter of the way: (1 + cos(pi/4)) / 2
    assert cosine == pytest.approx([(1 + math.cos(math.pi / 4)) / 2])
    assert lrs("linear", 100, [4], warmup_ratio=0.1, warmup_steps=5) == pytest.approx([0.8])  # steps override ratio
    with pytest.raises(deltatune.ConfigError, match="longer than the whole run"):
        lrs("linear", 10, [0], warmup_steps=20)


def test_scheduler_state_round_trip_resumes_exactly():
    def make(total):
        torch.manual_seed(0)
        model = tiny_model("bert")
        delta = deltatune.attach(model, Full())
        cfg = OptimizerConfig(lr=LR, schedule="cosine", warmup_ratio=0.2, layer_decay=0.8, weight_decay=0.01)
        optimizer = build_optimizer(model, delta, cfg)
        return model, optimizer, build_scheduler(optimizer, cfg, total)

    def step(model, optimizer, scheduler):
        optimizer.zero_grad()
        model(input_ids=torch.arange(3, 13).view(2, 5)).logits.square().sum().backward()
        optimizer.step()
        scheduler.step()
        return [g["lr"] for g in optimizer.param_groups]

    model, optimizer, scheduler = make(total=20)
    for _ in range(7):
        step(model, optimizer, scheduler)
    saved_opt, saved_sched = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = [step(model, optimizer, scheduler) for _ in range(13)]

    resumed, optimizer2, scheduler2 = make(total=999)  # the saved schedule wins over a recomputed total
    resumed.load_state_dict(saved_weights)
    optimizer2.load_state_dict(saved_opt)
    scheduler2.load_state_dict(saved_sched)
    assert scheduler2.lr_lambdas[0].total == 20
    assert [step(resumed, optimizer2, scheduler2) for _ in range(13)] == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert expected[-1] == [0.0] * len(expected[-1])
