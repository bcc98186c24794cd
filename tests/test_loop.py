"""The training loop: learning, gradient accumulation, early stopping, best delta, logs, exact resume, errors."""

from __future__ import annotations

import json
import math
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import VOCAB, tiny_config, tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.data import Collator, TaskData  # noqa: E402
from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError  # noqa: E402
from deltatune.storage import load_tensors, sha256  # noqa: E402
from deltatune.methods.full import Full  # noqa: E402
from deltatune.optim import OptimizerConfig  # noqa: E402
from deltatune.train import TrainConfig, evaluate, train  # noqa: E402
from deltatune.train.checkpoint import checkpoint_dirs  # noqa: E402
from tests.tiny import AllParams, TrainAll

COLLATE = Collator(tokenizer_pad_id=0)


def toy_classification(n: int, seed: int, flip: bool = False) -> Dataset:
    """Label 1 iff token 5 appears (a learnable rule); `flip` inverts the labels."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        ids = [rng.randrange(6, VOCAB) for _ in range(rng.randrange(4, 10))]
        if label:
            ids[rng.randrange(len(ids))] = 5
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label ^ int(flip)})
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def toy_text(n: int, seed: int) -> Dataset:
    """Token sequences of varying length counting up (learnable), labels = input_ids."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(3, 40), rng.randrange(5, 16)
        ids = [start + j for j in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return Dataset.from_list(rows)


def task_data(task: str, n_train: int = 64, n_eval: int = 32, flip_validation: bool = False) -> TaskData:
    if task == "text":
        splits = [toy_text(n_train, 1), toy_text(n_eval, 2), toy_text(n_eval, 3)]
        return TaskData(*splits, task="text", label_names=None, num_labels=None, source={})
    splits = [toy_classification(n_train, 1), toy_classification(n_eval, 2, flip_validation),
              toy_classification(n_eval, 3)]
    return TaskData(*splits, task="classification", label_names=["no", "yes"], num_labels=2, source={})


def setup(task: str = "classification", dropout: bool = True):
    """A fresh tiny model (same random init every time) with a full fine-tuning delta."""
    if task == "text":
        model = tiny_model("gpt2", head="lm") if dropout else _no_dropout_model("gpt2", task)
    else:
        model = tiny_model("bert") if dropout else _no_dropout_model("bert", task)
    return model, deltatune.attach(model, Full())


def _no_dropout_model(arch: str, task: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if arch == "gpt2":
        return T.AutoModelForCausalLM.from_config(tiny_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return T.AutoModelForSequenceClassification.from_config(
        tiny_config("bert", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def rows(out_dir, kind=None):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


# ---- learning, logs, results -------------------------------------------------------------------------------
def test_learns_toy_classification_and_writes_logs(tmp_path):
    model, delta = setup()
    data = task_data("classification", n_train=128)
    events = []
    cfg = TrainConfig(epochs=4, batch_size=8, log_every=2, optimizer=OptimizerConfig(lr=1e-2))
    result = train(model, delta, data, cfg, tmp_path, collate=COLLATE, on_event=lambda k, i: events.append((k, i)))

    assert result.steps == 4 * 16 and result.epochs == 4 and not result.stopped_early
    assert result.best_validation["accuracy"] >= 0.9 > result.baseline["validation"]["accuracy"] + 0.2
    assert result.test["accuracy"] >= 0.85
    assert result.trainable_params == result.total_params == sum(p.numel() for p in model.parameters())
    assert result.train_tokens_per_s > 0 and result.peak_rss_mb > 10
    assert json.loads((tmp_path / "results.json").read_text())["test"] == result.test
    assert (tmp_path / "best" / "delta.safetensors").is_file()

    train_rows = rows(tmp_path, "train")
    assert [r["step"] for r in train_rows] == list(range(2, 65, 2))
    assert set(train_rows[0]) == {"kind", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"}
    first, last = train_rows[0]["loss"], sum(r["loss"] for r in train_rows[-4:]) / 4
    assert last < first / 3
    evals = rows(tmp_path, "eval")
    assert [r["step"] for r in evals] == [16 * e for e in range(1, 5)]  # validation at every epoch end
    assert {"loss", "accuracy", "macro_f1", "split"} <= set(evals[0])
    assert [r["split"] for r in rows(tmp_path, "baseline")] == ["validation", "test"]
    assert [r["split"] for r in rows(tmp_path, "final")] == ["test"]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == ["kind", "split", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
                                       "elapsed", "accuracy", "macro_f1"]
    assert len(csv_lines) == 1 + len(rows(tmp_path))

    kinds = [k for k, _ in events]
    assert kinds[:3] == ["start", "eval", "eval"] and kinds[-1] == "end"
    assert kinds.count("step") == 64 and kinds.count("checkpoint") == 4
    start = dict(events)["start"]
    assert start["total_steps"] == 64 and start["trainable"] == result.trainable_params
    # One checkpoint per epoch end, the newest 2 kept.
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-00000048", "step-00000064"]


@pytest.mark.parametrize("task", ["classification", "text"])
def test_grad_accum_equals_big_batch(tmp_path, task):
    """batch 4 x grad_accum 2 gives the first update of batch 8 (text: token-weighted, lengths differ)."""
    after = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model, delta = setup(task, dropout=False)
        cfg = TrainConfig(max_steps=1, batch_size=batch_size, grad_accum=accum, eval_baseline=False,
                          optimizer=OptimizerConfig(lr=1e-2, name="sgd"), precision="fp32")  # bf16 rounds per batch
        data = task_data(task)
        result = train(model, delta, data, cfg, tmp_path / f"b{batch_size}", collate=COLLATE)
        assert result.steps == 1
        after.append(delta.state_dict())
    model, _ = setup(task, dropout=False)
    before = dict(model.named_parameters())
    for name, big in after[0].items():
        assert not torch.equal(big, before[name]) or "position" in name or "token_type" in name
        torch.testing.assert_close(after[1][name], big, atol=1e-6, rtol=0)


def test_early_stopping_on_constant_metric(tmp_path):
    model, delta = setup()
    events = []
    cfg = TrainConfig(epochs=3, batch_size=8, eval_every=1, patience=2, eval_baseline=False,
                      optimizer=OptimizerConfig(lr=1e-12))
    result = train(model, delta, task_data("classification"), cfg, tmp_path, collate=COLLATE,
                   on_event=lambda k, i: events.append((k, i)))
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    stop = dict(events)["early_stop"]
    assert stop["step"] == 3 and stop["patience"] == 2
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-00000003"]


def test_best_delta_is_restored_for_test(tmp_path):
    """Validation labels are flipped: training makes validation worse, so the best delta is an early one."""
    model, delta = setup()
    data = task_data("classification", flip_validation=True)
    cfg = TrainConfig(epochs=4, batch_size=8, eval_every=2, optimizer=OptimizerConfig(lr=3e-3))
    result = train(model, delta, data, cfg, tmp_path, collate=COLLATE)
    assert result.best_step < result.steps
    best = load_tensors(tmp_path / "best" / "delta.safetensors")
    last = load_tensors(checkpoint_dirs(tmp_path / "checkpoints")[-1] / "delta.safetensors")
    current = delta.state_dict()
    assert all(torch.equal(current[k], best[k]) for k in best)
    assert not all(torch.equal(current[k], last[k]) for k in last)
    assert result.test == evaluate(model, data.test, COLLATE, "classification", 8)
    assert result.best_validation["accuracy"] == max(r["accuracy"] for r in rows(tmp_path, "eval"))


# ---- exact resume -------------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def interrupt_at(step):
    def on_event(kind, info):
        if kind == "step" and info["step"] == step:
            raise Interrupt

    return on_event


RESUME_CFG = dict(epochs=2, batch_size=4, checkpoint_every=4, eval_every=3, log_every=1,
                  optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.2))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference run: (folder, result, final delta state)."""
    out = tmp_path_factory.mktemp("run_a")
    model, delta = setup("text")  # GPT-2 with dropout: the RNG state matters
    result = train(model, delta, task_data("text", n_train=24, n_eval=8), TrainConfig(**RESUME_CFG), out,
                   collate=COLLATE)
    return out, result, delta.state_dict()


def _interrupted(out, at):
    model, delta = setup("text")
    with pytest.raises(Interrupt):
        train(model, delta, task_data("text", n_train=24, n_eval=8), TrainConfig(**RESUME_CFG), out,
              collate=COLLATE, on_event=interrupt_at(at))


def _resume(out):
    model, delta = setup("text")  # a new process: fresh model, same base
    result = train(model, delta, task_data("text", n_train=24, n_eval=8), TrainConfig(**RESUME_CFG), out,
                   collate=COLLATE, resume=True)
    return result, delta.state_dict()


def _assert_same_run(a_dir, b_dir, result_a, result_b, state_a, state_b):
    assert result_b.steps == result_a.steps == 12
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # best delta, bitwise
    last_a = load_tensors(checkpoint_dirs(a_dir / "checkpoints")[-1] / "delta.safetensors")
    last_b = load_tensors(checkpoint_dirs(b_dir / "checkpoints")[-1] / "delta.safetensors")
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # last weights, bitwise
    strip = ("elapsed", "tokens_per_s")
    curve_a = [{k: v for k, v in r.items() if k not in strip} for r in rows(a_dir)]
    curve_b = [{k: v for k, v in r.items() if k not in strip} for r in rows(b_dir)]
    assert curve_b == curve_a  # same losses, lrs, grad norms, evaluations; no duplicated rows
    assert result_b.best_validation == result_a.best_validation and result_b.test == result_a.test


def test_resume_is_exact(tmp_path, run_a):
    a_dir, result_a, state_a = run_a
    _interrupted(tmp_path / "b", at=10)  # checkpoints at 4 and 8; steps 9-10 are lost and redone
    assert [r["step"] for r in rows(tmp_path / "b", "train")][-1] == 9
    result_b, state_b = _resume(tmp_path / "b")
    _assert_same_run(a_dir, tmp_path / "b", result_a, result_b, state_a, state_b)
    assert len(checkpoint_dirs(tmp_path / "b" / "checkpoints")) == 2  # keep_checkpoints


def test_resume_skips_corrupted_newest_checkpoint(tmp_path, run_a):
    a_dir, result_a, state_a = run_a
    _interrupted(tmp_path / "b", at=10)
    newest = checkpoint_dirs(tmp_path / "b" / "checkpoints")[-1]
    assert newest.name == "step-00000008"
    tensors = newest / "delta.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="step-00000006"):
        result_b, state_b = _resume(tmp_path / "b")
    _assert_same_run(a_dir, tmp_path / "b", result_a, result_b, state_a, state_b)


# state.json as every version so far has written it: renaming a TrainState field would strand old checkpoints
STATE_KEYS = ["step", "epoch", "batch", "best", "best_step", "best_metrics", "bad_evals", "stopped_early", "elapsed",
              "train_time", "tokens", "baseline", "config", "run"]


def test_checkpoint_state_keeps_the_format_of_earlier_versions(run_a):
    state = json.loads((checkpoint_dirs(run_a[0] / "checkpoints")[-1] / "state.json").read_text())
    assert list(state) == STATE_KEYS
    assert (state["step"], state["epoch"], state["batch"], state["best_step"]) == (12, 2, 0, 12)
    assert state["config"] == TrainConfig(**RESUME_CFG).model_dump(mode="json") and state["run"] is None


def test_a_checkpoint_state_of_the_wrong_types_is_one_clear_error(tmp_path):
    _interrupted(tmp_path, at=5)  # checkpoint at step 4
    folder = checkpoint_dirs(tmp_path / "checkpoints")[-1]
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "epoch": "two", "best_metrics": [1]}))
    sums = json.loads((folder / "checksums.json").read_text())
    (folder / "checksums.json").write_text(json.dumps({**sums, "state.json": sha256(folder / "state.json")}))
    with pytest.raises(CheckpointError, match=r"step-00000004/state.json is not a training state \(epoch: Input "
                                              r"should be a valid integer.*; best_metrics: Input should be a valid "
                                              r"dictionary\); resume from another checkpoint or start a new run"):
        _resume(tmp_path)


def test_resume_without_checkpoint_and_fresh_run_over_checkpoints(tmp_path):
    model, delta = setup()
    cfg = TrainConfig(max_steps=2, batch_size=8, eval_baseline=False)
    with pytest.raises(CheckpointError, match="nothing to resume in"):
        train(model, delta, task_data("classification"), cfg, tmp_path, collate=COLLATE, resume=True)
    train(model, delta, task_data("classification"), cfg, tmp_path, collate=COLLATE)
    with pytest.raises(CheckpointError, match="resume=True"):
        train(model, delta, task_data("classification"), cfg, tmp_path, collate=COLLATE)


def test_output_holds_no_pickle(tmp_path):
    model, delta = setup()
    train(model, delta, task_data("classification"), TrainConfig(max_steps=3, batch_size=8, checkpoint_every=1),
          tmp_path, collate=COLLATE)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    ckpt_files = [p for p in files if "checkpoints" in p.parts]
    assert ckpt_files and {p.suffix for p in ckpt_files} == {".safetensors", ".json"}
    assert {p.suffix for p in files if "tensorboard" not in p.parts} == {".safetensors", ".json", ".jsonl", ".csv"}
    for p in files:
        assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"
    for p in ckpt_files:
        load_tensors(p) if p.suffix == ".safetensors" else json.loads(p.read_text())


# ---- errors -------------------------------------------------------------------------------------------------
class BagOfWords(nn.Module):
    """Any nn.Module returning logits works; this one turns NaN on the `poison_at`-th training forward."""

    def __init__(self, poison_at: int):
        super().__init__()
        self.emb, self.out = nn.EmbeddingBag(VOCAB, 8, mode="sum"), nn.Linear(8, 2)
        self.calls, self.poison_at = 0, poison_at

    def forward(self, input_ids, attention_mask):
        self.calls += self.training
        logits = self.out(self.emb(input_ids, per_sample_weights=attention_mask.float()))
        return logits * math.nan if self.training and self.calls == self.poison_at else logits




def test_nan_loss_stops_with_clear_error(tmp_path):
    model = BagOfWords(poison_at=3)
    delta = TrainAll(model, AllParams()).attach()
    cfg = TrainConfig(epochs=1, batch_size=8, checkpoint_every=1, eval_baseline=False)
    with pytest.raises(DeltaTuneError, match=r"loss is nan .*at step 3 .*step-00000002"):
        train(model, delta, task_data("classification"), cfg, tmp_path, collate=COLLATE)
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_metric_lists_available(tmp_path):
    model, delta = setup()
    with pytest.raises(ConfigError, match="available: loss, accuracy, macro_f1"):
        train(model, delta, task_data("classification"), TrainConfig(metric="f2"), tmp_path, collate=COLLATE)
    with pytest.raises(ConfigError, match="train.epoch: unknown key \\(did you mean 'epochs'\\?\\)"):
        TrainConfig(epoch=3)


@pytest.mark.parametrize("length_grouping", [False, True])
def test_each_epoch_visits_every_example_once_in_a_new_order(tmp_path, length_grouping):
    seen = []

    def collate(examples):
        seen.extend(tuple(ex["input_ids"]) for ex in examples)
        return COLLATE(examples)

    model, delta = setup()
    data = task_data("classification", n_train=23, n_eval=4)
    cfg = TrainConfig(epochs=2, batch_size=5, grad_accum=2, eval_baseline=False,  # 5 batches -> 3 steps per epoch
                      length_grouping=length_grouping)
    result = train(model, delta, data, cfg, tmp_path, collate=collate)
    assert result.steps == 6 and result.epochs == 2
    train_seen = [s for s in seen if len(seen) and s in {tuple(ex["input_ids"]) for ex in data.train}]
    everything = sorted(tuple(ex["input_ids"]) for ex in data.train)
    first, second = train_seen[:23], train_seen[23:46]
    assert sorted(first) == sorted(second) == everything and first != second


def test_text_loss_matches_transformers_shifted_loss():
    from deltatune.train.metrics import logits_of, loss_sum, units

    model = tiny_model("gpt2", head="lm")
    batch = COLLATE(list(toy_text(4, 5)))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ours = loss_sum(logits_of(out), batch["labels"], "text") / units(batch["labels"], "text")
    torch.testing.assert_close(ours, out.loss)
