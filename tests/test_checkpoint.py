"""Checkpoints: pickle-free round trip of delta/optimizer/scheduler/RNG, atomic writes, checksums, fallback, pruning."""

from __future__ import annotations

import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from deltatune.errors import CheckpointError  # noqa: E402
from deltatune.optim import OptimizerConfig, build_optimizer, build_scheduler  # noqa: E402
from deltatune.train.checkpoint import (  # noqa: E402
    checkpoint_dirs,
    decode,
    encode,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    set_aside_newer,
    set_rng_state,
)
from tests.tiny import AllParams, TrainAll  # noqa: E402




def trained(steps: int = 3, seed: int = 0):
    """A small model + delta + AdamW (two param groups: decay / no decay) + warmup schedule after `steps` steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    delta = TrainAll(model, AllParams()).attach()
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, no_decay=["bias"], warmup_steps=2)
    optimizer = build_optimizer(model, delta, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, delta, optimizer, scheduler, x


def save(root, step, parts, keep=3, **state):
    _, delta, optimizer, scheduler, _ = parts
    return save_checkpoint(root, step, delta=delta, optimizer=optimizer, scheduler=scheduler,
                           state={"epoch": 0, **state}, keep=keep)


def test_round_trip_continues_bitwise(tmp_path):
    a = trained()
    path = save(tmp_path, 3, a, best=0.5)
    assert {p.name for p in path.iterdir()} == {"delta.safetensors", "delta.json", "optimizer.safetensors",
                                                 "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json",
                                                 "state.json", "checksums.json"}
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.state["best"] == 0.5

    b = trained(steps=0, seed=1)  # different init, fresh optimizer: everything comes from the checkpoint
    b[1].load_state_dict(ckpt.delta)
    b[2].load_state_dict(ckpt.optimizer)
    b[3].load_state_dict(ckpt.scheduler)
    assert b[3].get_last_lr() == a[3].get_last_lr() and b[3].last_epoch == 3
    for model, _, optimizer, scheduler, x in (a, b):
        for _ in range(2):
            model(x).square().mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), name


def test_rng_state_round_trip(tmp_path):
    path = save(tmp_path, 1, trained(steps=1))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    set_rng_state(load_checkpoint(path).rng)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_encode_is_json_and_tensors_only():
    tensors, tree = encode({"state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2)}},
                            "param_groups": [{"betas": (0.9, 0.99), "params": [0]}]}, "opt")
    assert set(tensors) == {"opt.state.0.step", "opt.state.0.buf"}
    back = decode(json.loads(json.dumps(tree)), tensors)
    assert list(back["state"]) == [0]  # int keys survive (the optimizer matches params by them)
    assert back["param_groups"] == [{"betas": [0.9, 0.99], "params": [0]}]
    with pytest.raises(CheckpointError, match="without pickle"):
        encode({"projector": object()}, "opt")


def test_only_safetensors_and_json_no_temp_leftovers(tmp_path):
    save(tmp_path, 1, trained(steps=1))
    files = list(tmp_path.rglob("*"))
    assert all(p.suffix in {".safetensors", ".json"} for p in files if p.is_file())
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    for p in files:
        if p.is_file():
            assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header


def test_keep_newest_and_overwrite_same_step(tmp_path):
    parts = trained(steps=1)
    for step in range(1, 6):
        save(tmp_path, step, parts, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004", "step-00000005"]
    save(tmp_path, 5, parts, keep=2, marker=1)  # a redone step replaces the folder
    assert load_latest(tmp_path).state["marker"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


@pytest.mark.parametrize("damage", ["truncate", "delete_checksums", "bad_json"])
def test_broken_newest_falls_back_with_warning(tmp_path, damage):
    parts = trained(steps=1)
    save(tmp_path, 1, parts)
    newest = save(tmp_path, 2, parts)
    if damage == "truncate":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "delete_checksums":
        (newest / "checksums.json").unlink()  # e.g. a copy interrupted before the end
    else:
        (newest / "state.json").write_text("{not json")
    with pytest.warns(UserWarning, match="step-00000001"):
        ckpt = load_latest(tmp_path)
    assert ckpt.step == 1
    assert [p.name for p in set_aside_newer(tmp_path, ckpt.step)] == ["step-00000002.corrupt"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001"]


def test_none_good_or_none_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume in"):
        load_latest(tmp_path / "missing")
    path = save(tmp_path, 1, trained(steps=1))
    (path / "delta.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*checksum"):
        load_latest(tmp_path)
