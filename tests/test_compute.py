"""The loop's compute (train/compute.py): chunked LM loss equals the plain one, bf16 autocast with fp32 master
weights, activation checkpointing with every method, no gradient work for frozen weights."""

from __future__ import annotations


import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

import deltatune
from deltatune.errors import ConfigError
from deltatune.registry import methods
from deltatune.train import TrainConfig, compute, evaluate, train
from deltatune.train.metrics import logits_of, loss_sum
from deltatune.train.tasks import SingleTask
from tests.test_contract import make_config
from tests.test_loop import COLLATE, task_data
from tests.tiny import VOCAB, tiny_batch, tiny_model


TEXT = SingleTask("text")


def lm_batch() -> dict[str, torch.Tensor]:
    """A causal-LM batch with a padded row and a masked prompt, so only some positions are targets."""
    batch = tiny_batch(batch=4, length=12)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[1, :5] = -100
    return {**batch, "labels": labels}


def loss_and_grads(model, delta, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in delta.trainable_parameters().values():
        p.grad = None
    loss = compute()
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone()  # None: unused (another task's copy)
                           for n, p in delta.trainable_parameters().items()}


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def plain_loss(model, batch, task="text"):
    return loss_sum(logits_of(model(**inputs_of(batch))), batch["labels"], task)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", VOCAB * 5)  # 5 target rows per chunk: several chunks per batch


# ---- chunked causal-LM loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", [deltatune.LoRA(r=4), deltatune.Full(), deltatune.LoRA(r=4, targets=["lm_head"])],
                         ids=["lora", "full-tied-head", "lora-on-head"])
def test_chunked_loss_equals_plain_loss_and_gradients(arch, method, small_chunks):
    model, batch = tiny_model(arch, head="lm", dropout=0.0).train(), lm_batch()
    delta = deltatune.attach(model, method)
    fast = compute.TrainingLoss(model, TEXT, precision="fp32")
    assert (fast.head is None) == ("lm_head" in getattr(method, "targets", []))  # a wrapped head: the plain loss
    expected, expected_grads = loss_and_grads(model, delta, lambda: plain_loss(model, batch))
    got, grads = loss_and_grads(model, delta, lambda: fast(batch))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_linear_cross_entropy_matches_torch_also_for_huge_logits(scale, monkeypatch):
    """Equal chunks, one exp per logit: the loss and the hidden-state gradient of F.cross_entropy (summed), also
    where the logits are in the thousands (exp would overflow without subtracting each row's maximum)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, VOCAB, bias=True)
    hidden = (torch.randn(13, 8) * scale).requires_grad_()
    targets = torch.randint(0, VOCAB, (13,))
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", VOCAB * 5)  # 13 rows: chunks of 5, 4, 4
    got = compute.linear_cross_entropy(hidden, targets, head)
    (grad,) = torch.autograd.grad(got, hidden)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


class VocabSizedResults(TorchFunctionMode):
    """Records the shape of every torch function result whose last dimension is the vocabulary (logits)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == VOCAB:
            self.shapes.append(tuple(out.shape))
        return out


def test_chunked_loss_never_builds_the_full_logits(small_chunks):
    model, batch = tiny_model("llama", head="lm").train(), lm_batch()
    deltatune.attach(model, deltatune.LoRA(r=4))
    with VocabSizedResults() as seen:
        compute.TrainingLoss(model, TEXT, precision="fp32")(batch).backward()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert targets > 10 and seen.shapes
    assert all(len(shape) == 2 and shape[0] <= 5 for shape in seen.shapes)  # chunks of target rows only


def test_evaluate_uses_the_chunked_loss_and_matches_the_plain_one(small_chunks):
    model = tiny_model("llama", head="lm")
    data = task_data("text")
    with VocabSizedResults() as seen:
        scores = evaluate(model, data.validation, COLLATE, "text", batch_size=8)
    assert seen.shapes and all(len(shape) == 2 and shape[0] <= 5 for shape in seen.shapes)
    total = units = 0.0
    with torch.no_grad():
        for start in range(0, len(data.validation), 8):
            batch = COLLATE([data.validation[i] for i in range(start, min(start + 8, len(data.validation)))])
            total += float(plain_loss(model, batch))
            units += int((batch["labels"][:, 1:] != -100).sum())
    assert scores["loss"] == pytest.approx(total / units, rel=1e-6)


def test_models_outside_the_checked_list_get_the_plain_loss():
    assert compute.output_head(tiny_model("bert", head="lm")) is None  # masked LM: not a causal LM
    assert compute.TrainingLoss(tiny_model("llama", head="lm"), TEXT, chunked_loss=False).head is None
    assert compute.TrainingLoss(tiny_model("llama"), SingleTask("classification")).head is None


# ---- precision ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx512f", "avx2"}, None),  # no native bf16 dot products
    (set(), None),  # no /proc/cpuinfo
])
def test_auto_precision_picks_bf16_where_the_cpu_has_it(monkeypatch, flags, expected):
    monkeypatch.setattr(compute, "cpu_flags", lambda: flags)
    model = tiny_model("llama", head="lm")
    assert compute.resolve_precision("auto", model) is expected
    assert compute.resolve_precision("fp32", model) is None
    assert compute.resolve_precision("bf16", model) is torch.bfloat16


def test_cpu_flags_are_read_from_cpuinfo():
    text = open("/proc/cpuinfo").read()
    line = next(line for line in text.splitlines() if line.startswith("flags"))
    assert compute.cpu_flags() == set(line.split(":")[1].split())


def test_bf16_training_keeps_fp32_master_weights_and_stays_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model("llama", head="lm", dropout=0.0)
        delta = deltatune.attach(model, deltatune.LoRA(r=4))
        dtypes = set()
        model.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(  # training forwards (eval is fp32)
            lambda m, args, out: dtypes.add(out.dtype) if m.training else None)
        cfg = TrainConfig(epochs=2, batch_size=8, precision=precision, eval_baseline=False,
                          optimizer={"lr": 1e-2})
        runs[precision] = train(model, delta, task_data("text"), cfg, tmp_path / precision, collate=COLLATE)
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {p.dtype for p in delta.trainable_parameters().values()} == {torch.float32}
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert runs["bf16"].test["loss"] == pytest.approx(runs["fp32"].test["loss"], rel=0.02)
    assert runs["bf16"].best_validation["loss"] == pytest.approx(runs["fp32"].best_validation["loss"], rel=0.02)


# ---- activation checkpointing -------------------------------------------------------------------------------------
TASK = "classification"  # every method applies to a classifier
# they train only what sits after (heads) / beside (side-tuning) the layers
NO_GRADIENT_THROUGH_LAYERS = {name for name, m in methods().items() if m.delta_class.role == "head"} | {"side"}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", sorted(methods()))
def test_checkpointing_gives_the_same_gradients_for_every_method(method, arch):
    model, batch = tiny_model(arch, dropout=0.0).train(), tiny_batch()
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    delta = deltatune.attach(model, make_config(method, arch))
    layer = model.get_submodule(f"{'transformer.h' if arch == 'gpt2' else 'model.layers'}.0.mlp")
    calls = []
    layer.register_forward_pre_hook(lambda *a: calls.append(1))  # (recompute stops early: not a forward hook)
    paths = {flag: compute.TrainingLoss(model, SingleTask(TASK), precision="fp32", checkpointing=flag)
             for flag in (False, True)}
    expected, expected_grads = loss_and_grads(model, delta, lambda: paths[False](batch))
    calls.clear()
    got, grads = loss_and_grads(model, delta, lambda: paths[True](batch))
    # the layer ran again in backward (it was checkpointed), unless no gradient flows through it
    assert len(calls) == (1 if method in NO_GRADIENT_THROUGH_LAYERS else 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert {n for n, g in grads.items() if g is None} == {n for n, g in expected_grads.items() if g is None}
    for name in grads:
        if grads[name] is not None:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not model.is_activation_checkpointing  # switched on for that forward only
    assert not getattr(model, "_require_grads_hooks", None)


def test_training_with_checkpointing_equals_training_without(tmp_path):
    results = {}
    for flag in (False, True):
        model = tiny_model("llama", head="lm", dropout=0.0)
        delta = deltatune.attach(model, deltatune.LoRA(r=4))
        cfg = TrainConfig(epochs=1, batch_size=16, precision="fp32", gradient_checkpointing=flag,
                          eval_baseline=False)
        results[flag] = train(model, delta, task_data("text"), cfg, tmp_path / str(flag), collate=COLLATE)
    assert results[True].test["loss"] == pytest.approx(results[False].test["loss"], rel=1e-5)


def test_checkpointing_a_model_that_cannot_is_a_config_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="Sequential does not support activation checkpointing.*"
                                          "gradient_checkpointing: false"):
        compute.TrainingLoss(model, SingleTask("regression"), checkpointing=True)


# ---- frozen weights get no gradient work --------------------------------------------------------------------------
def fwd_bwd_flops(method) -> tuple[int, int]:
    model, batch = tiny_model("llama", head="lm").train(), lm_batch()
    deltatune.attach(model, method)
    fast = compute.TrainingLoss(model, TEXT, precision="fp32", chunked_loss=False)  # model FLOPs only
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            fast(batch)
    with FlopCounterMode(display=False) as both:
        fast(batch).backward()
    return forward.get_total_flops(), both.get_total_flops()


def test_frozen_weights_get_no_gradient_work():
    model, batch = tiny_model("llama", head="lm").train(), lm_batch()
    delta = deltatune.attach(model, deltatune.LoRA(r=4))
    compute.TrainingLoss(model, TEXT)(batch).backward()
    owned = {id(p) for p in delta.trainable_parameters().values()}
    frozen = [p for p in model.parameters() if id(p) not in owned]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    # backward of a frozen base computes input gradients only (~1x the forward), full fine-tuning also weight
    # gradients (~2x the forward)
    forward, both = fwd_bwd_flops(deltatune.LoRA(r=4))
    assert 1.9 < both / forward < 2.3
    forward, both = fwd_bwd_flops(deltatune.Full())
    assert both / forward > 2.8
