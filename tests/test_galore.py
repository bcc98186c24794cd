"""GaLore-AdamW: projection, refresh, projected moments, torch-AdamW parity of the other tensors, the 8-bit
quantiser, 8-bit and per-layer variants, exact resume, config errors, and parity with the reference galore-torch."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import sys
import types
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import deltatune  # noqa: E402
from deltatune.config import load_config  # noqa: E402
from deltatune.errors import ConfigError, TargetError  # noqa: E402
from deltatune.storage import load_tensors  # noqa: E402
from deltatune.methods.full import Full  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.optim import (  # noqa: E402
    GaLoreAdamW,
    GaLoreAdamW8bit,
    OptimizerConfig,
    OptimizerStep,
    build_optimizer,
    build_scheduler,
    check_train_settings,
    galore,
    quant,
)
from deltatune.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint  # noqa: E402
from tests.test_cli import reviews, tiny_bert_dir  # noqa: E402, F401  (fixtures)
from tests.tiny import tiny_batch, tiny_model  # noqa: E402

RANK = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm(seed: int = 0) -> torch.nn.Module:
    """Tiny GPT-2 LM (hidden 32, Conv1D 32x96 / 32x32 / 32x128 / 128x32) without dropout, in train mode."""
    model = tiny_model("gpt2", head="lm", seed=seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def setup(name: str = "galore_adamw", model=None, **galore_cfg):
    model = model or lm()
    delta = deltatune.attach(model, Full())
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1,
                          galore={"rank": RANK, "update_proj_gap": 3, **galore_cfg})
    return model, delta, build_optimizer(model, delta, cfg), cfg


def train_steps(model, optimizer, steps: int, scheduler=None) -> list[float]:
    batch, losses = tiny_batch(), []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def projected(optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups if "rank" in g for p in g["params"]]


# ---- projection ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 16)])
def test_basis_is_orthonormal_and_std_projects_the_smaller_side(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    side = galore.projection_side(torch.Size(shape), "std")
    assert side == ("right" if shape[0] >= shape[1] else "left")  # as the reference: rows >= cols -> right
    for side in ("left", "right"):
        basis = galore.orthonormal_basis(grad, 5, side)
        gram = basis.T @ basis if side == "left" else basis @ basis.T
        torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
        low = galore.project(grad, basis, side)
        assert low.shape == ((5, shape[1]) if side == "left" else (shape[0], 5))
        # projecting back the projection of a gradient already in the subspace gives it back
        inside = galore.project_back(low, basis, side)
        torch.testing.assert_close(galore.project_back(galore.project(inside, basis, side), basis, side), inside,
                                   atol=1e-5, rtol=0)
    assert galore.projection_side(torch.Size((40, 12)), "left") == "left"


def test_basis_is_refreshed_exactly_every_gap_steps():
    weight = torch.nn.Parameter(torch.zeros(24, 10))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 3, "scale": 1.0,
                              "proj_type": "std"}], lr=1e-3)
    gen, bases = torch.Generator().manual_seed(0), []
    for step in range(8):
        weight.grad = torch.randn(24, 10, generator=gen)
        optimizer.step()
        bases.append(optimizer.state[weight]["basis"].clone())
        if step % 3 == 0:  # the basis comes from this step's gradient
            torch.testing.assert_close(bases[-1], galore.orthonormal_basis(weight.grad, 4, "right"))
    changed = [i for i in range(1, 8) if not torch.equal(bases[i], bases[i - 1])]
    assert changed == [3, 6]
    assert optimizer.state[weight]["step"] == 8 and optimizer.state[weight]["side"] == "right"


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit"])
def test_moments_live_in_the_projected_space(name):
    model, _, optimizer, _ = setup(name)
    assert isinstance(optimizer, GaLoreAdamW8bit if name == "galore_adamw8bit" else GaLoreAdamW)
    train_steps(model, optimizer, 1)
    targets = projected(optimizer)
    assert len(targets) == 8 and all(p.dim() == 2 for p in targets)  # 4 Conv1D per block, 2 blocks; no head
    assert id(model.transformer.wte.weight) not in {id(p) for p in targets}
    for p in targets:
        state = optimizer.state[p]
        rows, cols = p.shape
        shape = (rows, RANK) if rows >= cols else (RANK, cols)
        if name == "galore_adamw":
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == shape
        else:
            assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].numel() == math.prod(shape)
            assert state["exp_avg_sq_absmax"].numel() == quant.num_blocks(math.prod(shape))
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["default", "default (no decay)", "default (galore)"]


def test_other_tensors_follow_torch_adamw_exactly():
    model, _, optimizer, _ = setup()
    twin = copy.deepcopy(model)
    twin_of = dict(zip((id(p) for p in model.parameters()), twin.parameters()))
    plain = [g for g in optimizer.param_groups if "rank" not in g]
    reference = torch.optim.AdamW([{"params": [twin_of[id(p)] for p in g["params"]], "lr": g["lr"],
                                    "weight_decay": g["weight_decay"]} for g in plain],
                                  lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            twin_of[id(p)].grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for g in plain:
        for p in g["params"]:
            assert torch.equal(p, twin_of[id(p)])
            assert torch.equal(optimizer.state[p]["exp_avg_sq"], reference.state[twin_of[id(p)]]["exp_avg_sq"])


# ---- the 8-bit quantiser -------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_quantiser_round_trip_error_bound_and_bytes(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=gen) * torch.exp(3 * torch.randn(10_000, generator=gen))  # wide range
    x = x if signed else x.abs()
    x[:300] = 0.0
    codes, absmax = quant.quantize(x, signed=signed)
    y = quant.dequantize(codes, absmax, signed=signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and absmax.numel() == math.ceil(10_000 / 256)
    bound = quant.max_error(signed) * absmax.repeat_interleave(256)[:x.numel()]
    assert bool(((x - y).abs() <= bound * (1 + 1e-6)).all())
    assert quant.max_error(signed) < (0.0071 if signed else 0.0036)  # 64 (128) code points in the top decade
    assert bool((y[:300] == 0).all())
    zero_codes, zero_absmax = quant.zeros(1000, signed)
    assert bool((quant.dequantize(zero_codes, zero_absmax, signed) == 0).all())
    assert torch.equal(zero_codes, quant.quantize(torch.zeros(1000), signed)[0])
    big = x.abs().view(-1)[:256].argmax()
    assert y[big] == x[big]  # each block's absmax is stored exactly
    # small values keep a relative precision a linear int8 code (step absmax / 127) would round to zero
    scale = absmax.repeat_interleave(256)[:x.numel()]
    rel = (x - y).abs() / x.abs()
    assert float(rel[(x.abs() >= 1e-2 * scale) & (x != 0)].max()) < 0.15
    small = (x.abs() >= 1e-5 * scale) & (x.abs() < 1e-2 * scale)
    assert int(small.sum()) > 100 and bool((torch.sign(y[small]) == torch.sign(x[small])).all())
    nbytes = codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
    assert nbytes < 1.02 * x.numel()  # vs 4 bytes per float32 element


@pytest.mark.parametrize("signed", [True, False])
def test_table_lookup_finds_the_nearest_code_like_a_binary_search(signed):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=gen) * torch.exp(4 * torch.randn(50_000, generator=gen))
    x = x / x.abs().max()
    x = x if signed else x.abs()
    x[:3] = torch.tensor([0.0, 1.0, 1e-30])
    code = quant.dynamic_code(signed)
    assert torch.equal(quant.nearest(x, signed).long(), torch.bucketize(x, (code[1:] + code[:-1]) / 2))


def test_quantiser_refuses_negatives_in_the_unsigned_code():
    with pytest.raises(ValueError, match="negative"):
        quant.quantize(torch.tensor([1.0, -1.0]), signed=False)


def test_8bit_galore_trains_with_a_quarter_of_the_state_bytes():
    losses = {}
    states = {}
    for name in ("galore_adamw", "galore_adamw8bit"):
        model, _, optimizer, _ = setup(name, model=lm())
        losses[name] = train_steps(model, optimizer, 15)
        states[name] = sum(t.numel() * t.element_size() for p in projected(optimizer)
                           for k, t in optimizer.state[p].items() if k.startswith("exp_avg"))
    assert losses["galore_adamw8bit"][-1] < 0.5 * losses["galore_adamw8bit"][0]
    assert losses["galore_adamw8bit"][-1] == pytest.approx(losses["galore_adamw"][-1], rel=0.1)
    assert states["galore_adamw8bit"] < 0.3 * states["galore_adamw"]


# ---- per-layer mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit"])
def test_per_layer_mode_equals_a_normal_step(name):
    a, _, opt_a, _ = setup(name, model=lm())
    b, _, opt_b, _ = setup(name, model=lm(), per_layer=True)
    assert train_steps(a, opt_a, 5) == pytest.approx(train_steps(b, opt_b, 5), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    batch = tiny_batch()
    b(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is None for p in b.parameters())  # updated and freed inside backward
    assert math.isfinite(opt_b.grad_norm()) and opt_b.grad_norm() > 0
    before = [p.detach().clone() for p in b.parameters()]
    opt_b.step()  # a no-op for hooked tensors
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))
    opt_b.remove_hooks()


def test_per_layer_mode_refuses_accumulation_and_clipping():
    model, _, _optimizer, cfg = setup(per_layer=True)  # keep a reference: the hooks hold the optimizer weakly
    batch = tiny_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with pytest.raises(ConfigError, match="grad_accum: 1"):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    check_train_settings(cfg, grad_accum=1, max_grad_norm=None)
    with pytest.raises(ConfigError, match=r"grad_accum=4.*max_grad_norm=1\.0"):
        check_train_settings(cfg, grad_accum=4, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="2 processes: each one would update before the gradients are averaged"):
        check_train_settings(cfg, grad_accum=1, max_grad_norm=None, world_size=2)
    check_train_settings(OptimizerConfig(name="galore_adamw"), grad_accum=4, max_grad_norm=1.0)  # not per-layer


def test_a_discarded_per_layer_optimizer_stops_updating():
    model, _, optimizer, _ = setup(per_layer=True)
    assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    del optimizer
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # removed with the optimizer
    batch = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_loops_optimizer_step_is_the_same_calls_with_or_without_per_layer_updates(per_layer):
    """OptimizerStep: the loop's clip runs only where gradients are left after backward; close() takes the hooks off."""
    model, _, optimizer, cfg = setup(per_layer=per_layer)
    updates = OptimizerStep(optimizer, build_scheduler(optimizer, cfg, total_steps=10))
    assert updates.in_backward is per_layer
    batch, clipped = tiny_batch(), []
    model(**batch, labels=batch["input_ids"]).loss.backward()
    norm = updates.grad_norm(clip=lambda: clipped.append(1) or 7.0)
    if per_layer:
        assert clipped == [] and norm == updates.optimizer.grad_norm() and 0 < norm != 7.0
    else:
        assert clipped == [1] and norm == 7.0
    lr = updates.lr
    updates.step()
    assert all(p.grad is None for p in model.parameters()) and updates.lr != lr  # zeroed, scheduled
    updates.close()
    before = [p.detach().clone() for p in model.parameters()]
    model(**batch, labels=batch["input_ids"]).loss.backward()  # e.g. a later evaluation with gradients
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing updated behind the loop


# ---- exact resume --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, per_layer", [("galore_adamw", False), ("galore_adamw8bit", True)])
def test_state_dict_round_trip_continues_bitwise(tmp_path, name, per_layer):
    model, delta, optimizer, cfg = setup(name, per_layer=per_layer)
    scheduler = build_scheduler(optimizer, cfg, total_steps=20)
    train_steps(model, optimizer, 4, scheduler)  # basis refreshed at step 0 and 3; the next one at 6
    path = save_checkpoint(tmp_path, 4, delta=delta, optimizer=optimizer, scheduler=scheduler, state={}, keep=1)
    ckpt = load_checkpoint(path)
    model2, delta2, optimizer2, _ = setup(name, model=lm(seed=1), per_layer=per_layer)
    scheduler2 = build_scheduler(optimizer2, cfg, total_steps=20)
    delta2.load_state_dict(ckpt.delta)
    optimizer2.load_state_dict(ckpt.optimizer)
    scheduler2.load_state_dict(ckpt.scheduler)
    if name == "galore_adamw8bit":
        p = projected(optimizer2)[0]
        assert optimizer2.state[p]["exp_avg_codes"].dtype == torch.uint8  # not cast to the parameter's dtype
    assert train_steps(model, optimizer, 4, scheduler) == train_steps(model2, optimizer2, 4, scheduler2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


class Interrupt(Exception):
    pass


def loop_run(out, name: str, per_layer: bool, interrupt_at: int | None = None, resume: bool = False,
             clip: bool | None = None, model=None, grad_accum: int = 1):
    """The real training loop on a toy counting task: 2 epochs of 4 steps, checkpoints every 3 steps.
    Gradients are clipped to norm 1 (`clip`, default: unless per-layer)."""
    from datasets import Dataset

    from deltatune.data import Collator, TaskData
    from deltatune.train import TrainConfig, train

    rows = [{"input_ids": list(range(3 + i, 11 + i)), "attention_mask": [1] * 8, "labels": list(range(3 + i, 11 + i))}
            for i in range(16)]
    data = TaskData(Dataset.from_list(rows), Dataset.from_list(rows[:4]), Dataset.from_list([]), task="text",
                    label_names=None, num_labels=None, source={})
    clip = not per_layer if clip is None else clip
    cfg = TrainConfig(epochs=2, batch_size=4, checkpoint_every=3, log_every=1, eval_baseline=False,
                      max_grad_norm=1.0 if clip else None, grad_accum=grad_accum,
                      optimizer=OptimizerConfig(name=name, lr=1e-2, warmup_steps=2,
                                                galore={"rank": 4, "update_proj_gap": 5, "per_layer": per_layer}))
    model = model or lm()
    delta = deltatune.attach(model, Full())

    def stop(kind, info):
        if kind == "step" and info["step"] == interrupt_at:
            raise Interrupt

    if interrupt_at:
        with pytest.raises(Interrupt):
            train(model, delta, data, cfg, out, collate=Collator(tokenizer_pad_id=0), on_event=stop)
        return None
    train(model, delta, data, cfg, out, collate=Collator(tokenizer_pad_id=0), resume=resume)
    return load_tensors(checkpoint_dirs(out / "checkpoints")[-1] / "delta.safetensors")  # the last weights


@pytest.mark.parametrize("name, per_layer", [("galore_adamw", False), ("galore_adamw8bit", True)])
def test_training_loop_resumes_exactly(tmp_path, name, per_layer):
    """Through the unchanged loop: checkpoint at step 6 (bases refreshed at steps 0 and 5), interrupted at 7, resumed."""
    whole = loop_run(tmp_path / "a", name, per_layer)
    loop_run(tmp_path / "b", name, per_layer, interrupt_at=7)
    resumed = loop_run(tmp_path / "b", name, per_layer, resume=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit"])
def test_per_layer_run_through_the_loop_equals_the_normal_run(tmp_path, name):
    """Without clipping, updating inside the gradient hooks gives the weights and logged gradient norms of
    the usual backward-then-step run; afterwards no hook is left on the model."""
    model = lm()
    normal = loop_run(tmp_path / "a", name, per_layer=False, clip=False)
    hooked = loop_run(tmp_path / "b", name, per_layer=True, model=model)
    for key in normal:
        torch.testing.assert_close(hooked[key], normal[key], atol=1e-6, rtol=1e-5)
    norms = [[r["grad_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"] for out in (tmp_path / "a", tmp_path / "b")]
    assert len(norms[1]) == 8 and all(n > 0 for n in norms[1])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("clip, grad_accum, message", [
    (True, 1, r"optimizer\.galore\.per_layer=true cannot work with train\.max_grad_norm=1\.0.*max_grad_norm: null"),
    (False, 2, r"per_layer=true cannot work with train\.grad_accum=2.*set grad_accum: 1"),
])
def test_loop_refuses_per_layer_with_clipping_or_accumulation(tmp_path, clip, grad_accum, message):
    with pytest.raises(ConfigError, match=message):
        loop_run(tmp_path, "galore_adamw", per_layer=True, clip=clip, grad_accum=grad_accum)
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


def test_cli_trains_the_galore_example_with_per_layer_updates(tmp_path, tiny_bert_dir, reviews, capsys):  # noqa: F811
    """examples/galore.yaml with per_layer: true (and no clipping), on a tiny BERT through `deltatune train`."""
    import yaml

    from deltatune.cli import main

    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "examples", "galore.yaml")))
    config["model"]["path"], config["output_dir"] = str(tiny_bert_dir), str(tmp_path / "run")
    config["data"].update(train=str(reviews), max_length=32)
    config["train"].update(epochs=2, batch_size=16, max_grad_norm=None)
    config["train"]["optimizer"].update(lr=1e-2, head_lr=1e-2)
    config["train"]["optimizer"]["galore"].update(rank=8, per_layer=True)
    path = tmp_path / "galore.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["steps"] == 12 and result["test"]["accuracy"] == 1.0
    assert main(["train", str(path), "--set", "train.max_grad_norm=1.0", "--set", f"output_dir={tmp_path}/r2"]) == 1
    assert "per_layer=true cannot work with train.max_grad_norm=1.0" in capsys.readouterr().err


# ---- configuration -------------------------------------------------------------------------------------------
def write_config(tmp_path, optimizer: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: minilm}\ndata: {train: rotten_tomatoes, format: classification}\n"
                    f"delta: [{{method: head}}, {{method: full}}]\ntrain: {{optimizer: {optimizer}}}\n")
    return str(path)


@pytest.mark.parametrize("optimizer, message", [
    ("{name: galore_adamw, galore: {rank: 0}}", r"train\.optimizer\.galore\.rank: Input should be greater than 0"),
    ("{name: galore_adamw, galore: {rnak: 8}}", (r"galore\.rnak: unknown key \(did you mean 'rank'\?\); allowed "
                                                 r"keys: rank, update_proj_gap, scale, proj_type, targets, per_layer")),
    ("{name: galore_adamw, galore: {proj_type: up}}", r"proj_type: Input should be 'std', 'left' or 'right'"),
    ("{name: galore_adamw, galore: {update_proj_gap: 0, scale: 0}}", r"update_proj_gap.*\n.*scale"),
    ("{name: galore_adamw, galore: {targets: []}}", r"galore\.targets: List should have at least 1 item"),
    ("{name: adamw, galore: {rank: 8}}", r"galore settings are given, but name is 'adamw'"),
    ("{name: galore_adam}", r"train\.optimizer\.name: Input should be .*'galore_adamw8bit'"),
])
def test_yaml_config_errors(tmp_path, optimizer, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, optimizer))


def test_yaml_config_defaults_and_example():
    cfg = OptimizerConfig(name="galore_adamw8bit")
    assert cfg.galore == galore.GaLoreConfig(rank=128, update_proj_gap=200, scale=0.25, proj_type="std",
                                             targets=["all-linear"], per_layer=False)
    example = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "galore.yaml"))
    assert example.train.optimizer.name == "galore_adamw" and example.train.optimizer.galore.rank == 128


def test_targets_must_select_trained_weights():
    with pytest.raises(TargetError, match="'c_atn'.*Did you mean 'c_attn'"):
        setup(targets=["c_atn"])
    model = lm()
    delta = deltatune.attach(model, LoRA(r=2, targets=["c_attn"]))
    with pytest.raises(ConfigError, match="use it with the `full` method"):
        build_optimizer(model, delta, OptimizerConfig(name="galore_adamw"))
    model, _, optimizer, _ = setup(targets=["all-linear", "wte"])  # embeddings by name
    assert len(projected(optimizer)) == 9 and any(p is model.transformer.wte.weight for p in projected(optimizer))


# ---- the reference implementation ----------------------------------------------------------------------------
def reference_adamw(monkeypatch):
    """galore-torch 1.0's GaLoreAdamW. Its package __init__ imports bitsandbytes (for the 8-bit class, CUDA-first,
    not installed), so the package module is replaced by an empty one and only `galore_torch.adamw` (which needs
    just torch, transformers and galore_projector) is imported."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.skip("galore-torch is not installed (make venv installs it: pip install --no-deps galore-torch==1.0)")
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    for name in [n for n in sys.modules if n.startswith("galore_torch")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "galore_torch", package)
    return importlib.import_module("galore_torch.adamw").AdamW


def test_trajectory_matches_reference_galore_torch(monkeypatch):
    """Same seed, groups and settings; 12 steps with a basis refresh every 4. The reference puts eps outside the
    bias correction (sqrt(v) + eps, with lr * sqrt(bc2) / bc1), torch's AdamW and ours inside (sqrt(v / bc2) + eps):
    giving the reference eps * sqrt(bc2) at each step makes the two formulas the same, so what remains is float
    rounding. (Weight decay is 0: the reference decays after the update, torch and we before.)"""
    Reference = reference_adamw(monkeypatch)

    class ReferenceTorchEps(Reference):
        def step(self, closure=None):
            self.t = getattr(self, "t", 0) + 1
            for group in self.param_groups:
                group["eps"] = EPS * math.sqrt(1 - group["betas"][1] ** self.t)
            return super().step(closure)

    EPS = 1e-6

    def run(make):
        model = lm()
        matrices = [m.weight for m in model.modules() if type(m).__name__ == "Conv1D"]
        others = [p for p in model.parameters() if all(p is not m for m in matrices)]
        optimizer = make([{"params": others}, {"params": matrices, "rank": RANK, "update_proj_gap": 4,
                                               "scale": 0.25, "proj_type": "std"}])
        trajectory = []
        for _ in range(12):
            train_steps(model, optimizer, 1)
            trajectory.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return trajectory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ours = run(lambda groups: GaLoreAdamW(groups, lr=1e-3, eps=EPS))
        theirs = run(lambda groups: ReferenceTorchEps(groups, lr=1e-3, eps=EPS, no_deprecation_warning=True))
    start = torch.cat([p.detach().flatten() for p in lm().parameters()])
    assert (ours[-1] - start).abs().max() > 5e-3  # the weights did move
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() < 1e-6, f"step {step + 1}: max difference {(a - b).abs().max():.3g}"
