"""torchrun on 2 CPU ranks (gloo): DDP and FSDP give the single-process result; only rank 0 writes and prints."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
from launch import (
    assert_close_runs,
    best_delta,
    env,
    metrics,
    review_rows,
    text_rows,
    torchrun,
    write_config,
    write_jsonl,
)
from tiny import save_tiny_model_dir

from deltatune.cli import main
from deltatune.data import Collator
from deltatune.data.batching import real_tokens
from deltatune.delta import base_fingerprint
from deltatune.storage import load_tensors
from deltatune.train import distributed
from deltatune.train.checkpoint import checkpoint_dirs
from deltatune.train.metrics import loss_sum, units

WORKER = Path(__file__).with_name("fsdp_worker.py")  # FSDP: straight, then interrupted and resumed


def run_config(tmp_path, model, train, evaluation, fmt, delta, **train_cfg):
    """Config of a run on `train`; `evaluation` rows are both the validation and the test split."""
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", train)), "format": fmt, "split": [1.0, 0.0, 0.0],
            "validation": str(write_jsonl(tmp_path / "evaluation.jsonl", evaluation)),
            "test": str(tmp_path / "evaluation.jsonl"), "max_length": 32}
    return write_config(tmp_path / "config.yaml", model={"path": str(model)}, data=data, delta=delta,
                        train={"batch_size": 4, "eval_batch_size": 4, "log_every": 1,
                               "precision": "fp32", **train_cfg},  # float-precision equality: bf16 rounds per shard
                        output_dir=str(tmp_path / "run"))


@pytest.mark.slow
def test_ddp_text_lora_equals_single_process(tmp_path, capsys):
    """21 examples in global batches of 4 (the last one has 1: rank 1 runs an ignored example), 2 batches per step:
    the per-token loss of each step is normalised by the tokens of all ranks, so the runs agree to float precision."""
    model = save_tiny_model_dir(tmp_path / "gpt2", "gpt2", head="lm", dropout=0.0)
    config = run_config(tmp_path, model, text_rows(21, 0), text_rows(9, 1), "text",
                        [{"method": "lora", "r": 4, "targets": ["c_attn"]}], epochs=2, grad_accum=2,
                        optimizer={"lr": 0.01})
    launched = subprocess.run(torchrun("-m", "deltatune", "train", str(config), "--set",
                                       f"output_dir={tmp_path / 'ddp'}"),
                              env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert launched.stdout.count("run folder:") == 1 and launched.stdout.count("trainable parameters") == 1
    assert main(["train", str(config), "--set", f"output_dir={tmp_path / 'single'}"]) == 0
    capsys.readouterr()

    assert_close_runs(tmp_path / "single", tmp_path / "ddp", tol=1e-5)
    rows = metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote, once
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    assert [r["kind"] for r in rows if r["kind"] in ("baseline", "final")] == ["baseline", "baseline", "final"]
    assert any(t.abs().max() > 1e-3 for t in best_delta(tmp_path / "ddp").values())  # LoRA B left zero: trained


@pytest.mark.slow
def test_fsdp_full_finetuning_equals_single_process_and_resumes_exactly(tmp_path):
    """FSDP shards every BERT layer over 2 ranks; the checkpoints hold full tensors; interrupted after step 7 and
    resumed from the step-6 checkpoint, it ends bitwise where the uninterrupted FSDP run ends."""
    model = save_tiny_model_dir(tmp_path / "bert", "bert", dropout=0.0)
    config = run_config(tmp_path, model, review_rows(20), review_rows(9, offset=3), "classification",
                        [{"method": "full"}], epochs=2, eval_every=5, checkpoint_every=2, keep_checkpoints=3,
                        parallel="fsdp", optimizer={"lr": 1e-3, "weight_decay": 0.1})
    launched = subprocess.run(torchrun(str(WORKER), str(config), str(tmp_path / "fsdp"), "7"),
                              env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert main(["train", str(config), "--set", f"output_dir={tmp_path / 'single'}"]) == 0

    straight, resumed = tmp_path / "fsdp" / "straight", tmp_path / "fsdp" / "resumed"
    assert_close_runs(tmp_path / "single", straight, tol=1e-5)  # incl. the test split, on the unsharded model
    final = [[r for r in metrics(run) if r["kind"] == "final"] for run in (tmp_path / "single", straight)]
    assert final[1][0]["accuracy"] == final[0][0]["accuracy"]
    assert metrics(resumed) == metrics(straight)
    for name, value in best_delta(straight).items():
        assert torch.equal(best_delta(resumed)[name], value), name
    newest = checkpoint_dirs(resumed / "checkpoints")[-1]
    shapes = {k: v.shape for k, v in best_delta(tmp_path / "single").items()}
    assert {k: v.shape for k, v in load_tensors(newest / "delta.safetensors").items()} == shapes  # full, not shards


# ---- the pieces, without processes ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, rank, expected", [(5, 0, [0, 1, 2]), (5, 1, [3, 4]), (1, 0, [0]), (1, 1, None)])
def test_each_rank_collates_its_contiguous_shard(n, rank, expected):
    par = distributed.Parallel(torch.nn.Linear(1, 1))
    par.rank, par.world = rank, 2
    examples = [{"input_ids": [i + 1] * (i + 2), "attention_mask": [1] * (i + 2), "labels": i} for i in range(n)]
    batch = par.sharded(Collator(0))(examples)
    if expected is None:  # nothing left for this rank: one example that counts for nothing
        assert batch["labels"].tolist() == [-100] and units(batch["labels"], "classification") == 0
        assert loss_sum(torch.randn(1, 2), batch["labels"], "classification") == 0
        assert real_tokens(batch) == 0  # nor to tokens/s
    else:
        assert real_tokens(batch) == sum(i + 2 for i in expected)
        assert batch["labels"].tolist() == expected


def test_ignored_regression_and_token_labels_count_for_nothing():
    labels = torch.tensor([0.5, float("nan")])
    assert units(labels, "regression") == 1
    assert loss_sum(torch.tensor([[1.5], [7.0]]), labels, "regression") == 1.0
    tokens = torch.full((1, 4), -100)
    assert units(tokens, "text") == 0 and loss_sum(torch.randn(1, 4, 5), tokens, "text") == 0


@pytest.mark.parametrize("rank, expected", [(0, [([0, 1], True), ([2], True)]), (1, [([3, 4], True), ([0], False)])])
def test_evaluation_batches_run_in_lockstep(monkeypatch, rank, expected):
    """5 examples, batch 2, 2 ranks: rank 1 has one real batch and repeats a forward so FSDP ranks stay in step."""
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, 2))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    assert list(distributed.eval_batches(5, 2)) == expected


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_ddp_wraps_a_quantized_base(monkeypatch, tmp_path, mode):
    """DDP broadcasts the model's tensors from rank 0 when it wraps it: torchao's int8 / int4 weights cannot be
    (`Int8Tensor dispatch: ... aten.view`); every rank quantized the same checkpoint, so they are left out."""
    import deltatune
    from deltatune.models.quantize import quantize_base
    from tiny import tiny_batch, tiny_model

    model = tiny_model("llama", head="lm")
    quantize_base(model, mode, torch.float32)
    delta = deltatune.attach(model, deltatune.LoRA(r=4, init="gaussian"))
    batch = tiny_batch()
    expected = model(**batch).logits
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))  # wrap as under torchrun, in one process
    distributed.dist.init_process_group("gloo", store=distributed.dist.FileStore(str(tmp_path / "store"), 1),
                                        rank=0, world_size=1)
    try:
        par = distributed.setup(model, delta)
        assert par.model is not model  # the DDP wrapper
        torch.testing.assert_close(par.model(**batch).logits, expected)
    finally:
        distributed.dist.destroy_process_group()


def test_a_checkpoint_of_an_fsdp_run_resumes_in_one_process(tmp_path):
    """FSDP checkpoints key the optimizer state by parameter name; a plain optimizer takes them back exactly."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import deltatune
    from deltatune.methods.full import Full
    from deltatune.train.checkpoint import Checkpoint

    def trained(steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        delta = deltatune.attach(model, Full())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(steps):
            model(torch.ones(2, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, delta, optimizer

    model, delta, optimizer = trained(2)
    by_name = copy.deepcopy(get_optimizer_state_dict(model, optimizer))  # as read from disk: no shared tensors
    assert by_name["param_groups"][0]["params"][0] == "0.weight"
    ckpt = Checkpoint(tmp_path, 2, delta.state_dict(), by_name, {}, {}, {}, base=base_fingerprint(model))
    fresh, fresh_delta, fresh_optimizer = trained(0)
    distributed.Parallel(fresh).load_checkpoint(ckpt, fresh_delta, fresh_optimizer)
    for a, b in ((model, optimizer), (fresh, fresh_optimizer)):
        a(torch.ones(2, 3)).sum().backward()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
