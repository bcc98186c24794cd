"""Multi-task fine-tuning: task sampling, loss weighting, task heads, per-task deltas, per-task metrics, exact resume,
configs and the command line."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import deltatune
from deltatune.config import validate_config
from deltatune.data import Collator, TaskData
from deltatune.data.multitask import MultiTaskData, TaskCollator, TaskSpec, TaskStream, quotas, task_shares
from deltatune.errors import ConfigError, TargetError
from deltatune.storage import load_tensors
from deltatune.methods.lora import LoRA
from deltatune.methods.per_task import PerTask
from deltatune.methods.task_heads import TaskHeads
from deltatune.registry import methods
from deltatune.routing import set_task
from deltatune.train import TrainConfig, evaluate, train
from deltatune.train.checkpoint import checkpoint_dirs
from deltatune.train.metrics import improved
from deltatune.train.tasks import MultiTask, task_deltas
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)
from tests.test_contract import make_config
from tests.test_loop import Interrupt, interrupt_at, rows, toy_classification
from tests.tiny import VOCAB, tiny_batch, tiny_model

COLLATE = TaskCollator(Collator(tokenizer_pad_id=0))
NO_YES = ["no", "yes"]


def classification(n: int, flip: bool = False, seed: int = 1) -> TaskData:
    """Label 1 iff token 5 appears (`flip`: iff it does not): the two tasks conflict, so only task heads solve both."""
    splits = [toy_classification(n, seed, flip), toy_classification(16, seed + 1, flip),
              toy_classification(16, seed + 2, flip)]
    return TaskData(*splits, task="classification", label_names=NO_YES, num_labels=2, source={})


def specs(weights=(1.0, 1.0)) -> list[TaskSpec]:
    return [TaskSpec("same", "classification", "accuracy", weights[0], NO_YES),
            TaskSpec("flip", "classification", "accuracy", weights[1], NO_YES)]


def toy_tasks(sizes=(64, 32), sampling="proportional", weighting="fixed") -> MultiTaskData:
    return MultiTaskData(specs(), [classification(sizes[0]), classification(sizes[1], flip=True, seed=5)],
                         sampling=sampling, weighting=weighting)


def task_of_batch(data: MultiTaskData, batch: list[int]) -> int:
    tasks = {data.train.task_of(i) for i in batch}
    assert len(tasks) == 1, "a batch mixes tasks"
    return tasks.pop()


# ---- sampling ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling, expected, quota", [
    ("proportional", [0.75, 0.25], [11, 4]),
    ("temperature", [math.sqrt(300) / (math.sqrt(300) + 10), 10 / (math.sqrt(300) + 10)], [10, 5]),  # T = 2
    ("uniform", [0.5, 0.5], [8, 7]),  # ties of the largest remainders go to the lower task id
    ("round_robin", [0.5, 0.5], [8, 7]),
])
def test_task_shares_and_quotas(sampling, expected, quota):
    assert task_shares([300, 100], sampling, 2.0) == pytest.approx(expected)
    assert quotas(task_shares([300, 100], sampling, 2.0), 15) == quota
    assert task_shares([300, 100], "temperature", 1.0) == pytest.approx([0.75, 0.25])  # T = 1 is proportional


@pytest.mark.parametrize("sampling, counts", [("proportional", [12, 4]), ("temperature", [10, 6]),
                                              ("uniform", [8, 8]), ("round_robin", [8, 8])])
def test_epoch_batches_follow_the_shares_and_depend_only_on_seed_and_epoch(sampling, counts):
    data = toy_tasks((96, 32), sampling)  # 128 examples, batches of 8: 16 per epoch
    epoch0 = data.epoch_batches(8, seed=0, epoch=0)
    assert len(epoch0) == 16 and all(len(b) == 8 for b in epoch0)
    tasks = [task_of_batch(data, b) for b in epoch0]
    assert [tasks.count(0), tasks.count(1)] == counts
    assert data.epoch_batches(8, seed=0, epoch=0) == epoch0  # deterministic: the resume position is (epoch, batch)
    assert data.epoch_batches(8, seed=0, epoch=1) != epoch0
    assert data.epoch_batches(8, seed=1, epoch=0) != epoch0
    if sampling == "round_robin":
        assert tasks == [0, 1] * 8
    else:
        assert tasks != sorted(tasks)  # the quotas come in a shuffled order


def test_proportional_epochs_visit_every_example_once():
    data = toy_tasks((96, 32))
    for epoch in range(3):
        seen = Counter(i for b in data.epoch_batches(8, seed=0, epoch=epoch) for i in b)
        assert sorted(seen) == list(range(128)) and set(seen.values()) == {1}


def test_uniform_sampling_repeats_the_small_task_and_continues_the_large_one():
    data = toy_tasks((96, 32), "uniform")
    epochs = [data.epoch_batches(8, seed=0, epoch=e) for e in range(3)]
    small = Counter(i for b in epochs[0] for i in b if i >= 96)
    assert set(small.values()) == {2} and len(small) == 32  # 64 draws from 32 examples: every one twice
    large = Counter(i for batches in epochs for b in batches for i in b if i < 96)
    assert set(large.values()) == {2} and len(large) == 96  # 3 epochs x 64 draws = exactly two passes


def test_round_robin_continues_across_epochs_and_streams_across_passes():
    data = MultiTaskData([TaskSpec(n, "classification", "accuracy") for n in "abc"],
                         [classification(n) for n in (40, 32, 24)], sampling="round_robin")
    epochs = [data.epoch_batches(10, seed=3, epoch=e) for e in range(2)]  # 96 examples: 10 batches per epoch
    assert [task_of_batch(data, b) for b in epochs[0] + epochs[1]] == [i % 3 for i in range(20)]
    stream = TaskStream(24, 10, (3, 2))  # task 2 (offset 72) reads one endless seeded stream
    task2 = [[i - 72 for i in b] for batches in epochs for b in batches if b[0] >= 72]
    assert task2 == [stream.batch(k) for k in range(len(task2))]
    assert sorted(stream.batch(0) + stream.batch(1) + stream.batch(2)[:4]) == list(range(24))  # one full pass


# ---- loss weighting ------------------------------------------------------------------------------------------
def class_batch(task: int, labels=(0, 1, 1, 0)) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels), "task": torch.tensor(task)}


def test_fixed_weights_scale_each_tasks_mean_loss():
    objective = MultiTask(specs(weights=(2.0, 0.5)))
    logits = torch.randn(4, 2)
    for task, weight in ((0, 2.0), (1, 0.5)):
        batch = class_batch(task)
        assert objective.units(batch) == 1  # a batch is one unit: accumulated steps average their batches
        torch.testing.assert_close(objective.loss_sum(logits, batch), weight * F.cross_entropy(logits, batch["labels"]))


def test_uncertainty_loss_is_kendalls():
    specs = [TaskSpec("c", "classification", "accuracy"), TaskSpec("r", "regression", "loss")]
    log_vars = torch.tensor([0.3, -0.2])
    objective = MultiTask(specs, log_vars)
    logits, preds = torch.randn(4, 2), torch.randn(4, 1)
    ce = F.cross_entropy(logits, class_batch(0)["labels"])
    targets = torch.tensor([0.5, -1.0, 2.0, 0.0])
    mse = F.mse_loss(preds.squeeze(-1), targets)
    # 1/sigma^2 * CE + log sigma (classification), 1/(2 sigma^2) * MSE + log sigma (regression), s = log sigma^2
    torch.testing.assert_close(objective.loss_sum(logits, class_batch(0)), math.exp(-0.3) * ce + 0.15)
    torch.testing.assert_close(objective.loss_sum(preds, {"labels": targets, "task": torch.tensor(1)}),
                               0.5 * math.exp(0.2) * mse - 0.1)


def test_uncertainty_log_vars_learn_the_inverse_loss_weight():
    """Trained alone on fixed task losses, s_t settles where the weight balances: s_t = log(2 c_t L_t)."""
    specs = [TaskSpec("c", "classification", "accuracy"), TaskSpec("r", "regression", "loss")]
    log_vars = torch.nn.Parameter(torch.zeros(2))
    objective = MultiTask(specs, log_vars)
    logits, labels = torch.tensor([[2.0, -1.0], [0.0, 0.5]]), torch.tensor([1, 0])
    preds, targets = torch.tensor([[0.0], [1.0]]), torch.tensor([3.0, -2.0])
    optimizer = torch.optim.SGD([log_vars], lr=1.0)  # the curvature at the optimum is 1/2: SGD halves the error
    for _ in range(60):
        optimizer.zero_grad()
        loss = objective.loss_sum(logits, {"labels": labels, "task": torch.tensor(0)}) + objective.loss_sum(
            preds, {"labels": targets, "task": torch.tensor(1)})
        loss.backward()
        optimizer.step()
    ce, mse = float(F.cross_entropy(logits, labels)), float(F.mse_loss(preds.squeeze(-1), targets))
    assert log_vars.tolist() == pytest.approx([math.log(2 * ce), math.log(mse)], abs=1e-6)


# ---- training: per-task metrics, learned log-variances --------------------------------------------------------
@pytest.fixture(scope="module")
def uncertainty_run(tmp_path_factory):
    """Two conflicting tasks, task heads (uncertainty weighting) + shared LoRA, through the one training loop."""
    out = tmp_path_factory.mktemp("mt")
    data = toy_tasks(weighting="uncertainty")
    model = tiny_model("bert", dropout=0.0)
    delta = deltatune.attach(model, task_deltas([LoRA(r=4, targets=["query", "value"])], data))
    cfg = TrainConfig(epochs=6, batch_size=8, log_every=4, optimizer={"lr": 2e-2})
    return out, model, delta, data, train(model, delta, data, cfg, out, collate=COLLATE)


def test_each_task_learns_its_head_and_metrics_are_per_task_with_a_macro_average(uncertainty_run):
    out, model, _, data, result = uncertainty_run
    assert result.metric == "macro/accuracy" and result.steps == 6 * 12
    test = result.test
    assert test["same/accuracy"] >= 0.8 and test["flip/accuracy"] >= 0.8  # opposite labels: only per-task heads
    assert test["macro/accuracy"] == pytest.approx((test["same/accuracy"] + test["flip/accuracy"]) / 2)
    assert test["loss"] == pytest.approx((test["same/loss"] + test["flip/loss"]) / 2)
    for name, task in (("same", 0), ("flip", 1)):  # the same numbers as a plain evaluation of that task's split
        alone = evaluate(model, data.test.task_view(task), COLLATE, "classification", 16)
        assert {k: test[f"{name}/{k}"] for k in alone} == pytest.approx(alone)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[9:] == ["same/loss", "same/accuracy", "same/macro_f1", "flip/loss", "flip/accuracy",
                          "flip/macro_f1", "macro/loss", "macro/accuracy", "macro/macro_f1", "same/log_var",
                          "flip/log_var"]
    evals = rows(out, "eval")
    assert len(evals) == 6 and result.best_validation["macro/accuracy"] == max(r["macro/accuracy"] for r in evals)


def test_log_variances_train_with_the_delta_and_are_saved_with_it(uncertainty_run):
    out, _, delta, _, result = uncertainty_run
    saved = load_tensors(out / "best" / "delta.safetensors")["classifier.log_vars"]
    assert torch.equal(saved, delta.trainable_parameters()["classifier.log_vars"].detach())
    assert saved.abs().min() > 0.05  # moved from 0
    assert [rows(out, "baseline")[0][f"{t}/log_var"] for t in ("same", "flip")] == [0.0, 0.0]
    assert result.test["same/log_var"] == pytest.approx(float(saved[0]))


def test_multitask_training_refuses_several_processes(monkeypatch):
    from deltatune.train import tasks

    monkeypatch.setattr(tasks, "rank_and_world", lambda: (0, 2))
    data = toy_tasks((8, 8))
    delta = deltatune.attach(tiny_model("bert"), task_deltas([LoRA(r=2)], data))
    with pytest.raises(ConfigError, match="multi-task training runs in one process"):
        tasks.objective(data, delta)


def test_minimised_metrics_are_recognised_behind_a_task_prefix():
    assert improved(0.4, 0.5, "same/loss") and not improved(0.6, 0.5, "macro/loss")
    assert improved(0.6, 0.5, "same/accuracy")


def test_metric_choices():
    objective = MultiTask(specs())
    assert objective.default_metric == "macro/accuracy"
    with pytest.raises(ConfigError, match=r"unknown metric 'accuracy' .*available: loss, same/loss, .*macro/accuracy"):
        objective.check_metric("accuracy")
    mixed = MultiTask([TaskSpec("c", "classification", "accuracy"), TaskSpec("r", "regression", "loss")])
    with pytest.raises(ConfigError, match=r"different metrics \(c: accuracy, r: loss\).*train\.metric, e\.g\. "
                                          r"c/accuracy"):
        _ = mixed.default_metric
    assert "macro/loss" in mixed.choices and "macro/accuracy" not in mixed.choices


# ---- task heads ----------------------------------------------------------------------------------------------
def padded(batch: dict[str, torch.Tensor], left: bool) -> dict[str, torch.Tensor]:
    """tiny_batch has row 0 padded on the right; move its padding to the left for `left`."""
    if not left:
        return batch
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    ids[0], mask[0] = ids[0].roll(3), mask[0].roll(3)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("left", [False, True])
def test_task_heads_on_a_causal_lm_route_by_task_and_read_the_last_real_token(left):
    model, batch = tiny_model("gpt2", head="lm"), padded(tiny_batch(), left)
    with torch.no_grad():
        base = model(**batch).logits
        hidden = model.transformer(**batch).last_hidden_state
    heads = TaskHeads(tasks=[{"name": "lm", "kind": "text"}, {"name": "cls", "labels": ["a", "b", "c"]},
                             {"name": "reg", "kind": "regression"}])
    delta = deltatune.attach(model, heads)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, task="lm").logits, base)  # the LM head; its task bias starts at 0
        last = hidden[torch.arange(4), torch.tensor([9 if left else 6, 9, 9, 9])]  # row 0: 7 real tokens, 3 pads
        torch.testing.assert_close(model(**batch, task=1).logits, delta.switch.heads["cls"](last))
        assert model(**batch, task=torch.tensor(2)).logits.shape == (4, 1)
        assert model(**batch).logits.shape == (4, 1)  # a call without a task keeps the last one
        set_task(model, "lm")
        assert model(**batch).logits.shape == (4, 10, VOCAB)
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; the model's tasks are: 0=lm, 1=cls, 2=reg"):
        model(**batch, task="nope")
    with pytest.raises(ConfigError, match=r"one forward call computes one task, got task ids \[0, 1\]"):
        model(**batch, task=torch.tensor([0, 1, 1, 0]))
    assert set(delta.trainable_parameters()) == {"lm_head.lm_bias.lm", "lm_head.heads.cls.weight",
                                                 "lm_head.heads.cls.bias", "lm_head.heads.reg.weight",
                                                 "lm_head.heads.reg.bias"}


def test_text_tasks_need_a_causal_lm():
    with pytest.raises(TargetError, match=r"text tasks \(gen\) need a causal LM, but 'classifier'"):
        deltatune.attach(tiny_model("bert"), TaskHeads(tasks=[{"name": "gen", "kind": "text"}]))


# ---- per-task deltas -----------------------------------------------------------------------------------------
HEADS = TaskHeads(tasks=[{"name": "a", "labels": NO_YES}, {"name": "b", "labels": NO_YES}])


def per_task_model(seed: int = 0):
    model = tiny_model("bert", dropout=0.0)
    delta = deltatune.attach(model, [HEADS, PerTask(delta=LoRA(r=2, targets=["query", "value"]))])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.normal_(std=0.3)
    return model, delta


def test_per_task_lora_computes_each_task_with_its_own_adapter():
    model, delta = per_task_model()
    batch = tiny_batch()
    names = delta.trainable_parameters()
    assert "bert.encoder.layer.0.attention.self.query.lora_A.b.weight" in names
    assert len(names) == 4 + 2 * 8  # heads; 2 tasks x 2 layers x (query, value) x (A, B)
    in_model = dict(model.named_parameters(remove_duplicate=False))  # every copy lives in the module tree
    assert all(in_model[n] is p for n, p in names.items())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in names.values()}
    for task in ("a", "b"):  # reference: one plain LoRA holding this task's bank, and this task's head
        plain = tiny_model("bert", dropout=0.0)
        ref = deltatune.attach(plain, [HEADS, LoRA(r=2, targets=["query", "value"])])
        bank = {n: p for n, p in names.items() if f".{task}." in n}
        ref.load_state_dict({n.replace(f".{task}.", ".", 1) if "lora" in n else n: p for n, p in
                             {**bank, **{n: p for n, p in names.items() if n.startswith("classifier")}}.items()})
        with torch.no_grad():
            torch.testing.assert_close(model(**batch, task=task).logits, plain(**batch, task=task).logits)


def test_only_the_active_tasks_copy_gets_gradients_and_updates():
    model, delta = per_task_model()
    params = delta.trainable_parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=0.1)
    F.cross_entropy(model(**tiny_batch(), task="a").logits, torch.tensor([0, 1, 1, 0])).backward()
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == {n for n in params if ".a." in n}  # task a's LoRA copy and head only
    optimizer.step()
    assert all(torch.equal(params[n], before[n]) == (n not in with_grad) for n in params)


def test_per_task_delta_saves_every_copy_and_reloads(tmp_path):
    model, delta = per_task_model()
    batch = tiny_batch()
    with torch.no_grad():
        expected = {t: model(**batch, task=t).logits for t in ("b", "a")}
    delta.save(tmp_path)
    fresh = tiny_model("bert", dropout=0.0)
    deltatune.load(fresh, tmp_path)
    with torch.no_grad():
        for task in ("a", "b"):
            torch.testing.assert_close(fresh(**batch, task=task).logits, expected[task], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="per_task cannot be merged"):
        delta.parts()[1].merge()


@pytest.mark.parametrize("method", sorted(name for name, m in methods().items() if m.delta_class.per_task))
def test_per_task_copies_of_any_method_are_independent(method):
    """Changing task b's copy changes task b's outputs and leaves task a's exactly as they were."""
    model, batch = tiny_model("bert", dropout=0.0), tiny_batch()
    delta = deltatune.attach(model, PerTask(tasks=["a", "b"], delta=make_config(method, "bert")))
    with torch.no_grad():
        before = model(**batch, task="a").logits
        for name, p in delta.trainable_parameters().items():
            if ".b." in name:
                p.add_(0.5 * torch.randn_like(p))
        assert not torch.allclose(model(**batch, task="b").logits, before)
        assert torch.equal(model(**batch, task="a").logits, before)


def test_per_task_tasks_must_match_the_task_heads():
    with pytest.raises(ConfigError, match=r"tasks \['b', 'a'\] differ from the tasks already attached .*\['a', 'b'\]"):
        deltatune.attach(tiny_model("bert"), [HEADS, PerTask(tasks=["b", "a"], delta=LoRA(r=2))])
    with pytest.raises(ConfigError, match="no task list: attach task_heads"):
        deltatune.attach(tiny_model("bert"), PerTask(delta=LoRA(r=2)))
    with pytest.raises(ConfigError, match="per_task cannot copy 'head'"):
        PerTask(delta={"method": "head"})


def test_full_fine_tuning_trains_the_shared_body_under_the_task_heads(tmp_path):
    data = toy_tasks((16, 16))
    model = tiny_model("bert", dropout=0.0)
    delta = deltatune.attach(model, task_deltas([deltatune.Full()], data))  # task heads first, then everything else
    heads, full = delta.parts()
    assert heads.method == "task_heads" and all(n.startswith("classifier.") for n in heads.trainable_parameters())
    assert {id(p) for p in delta.trainable_parameters().values()} == {id(p) for p in model.parameters()}
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    train(model, delta, data, TrainConfig(epochs=1, batch_size=8, eval_baseline=False), tmp_path, collate=COLLATE)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, before)


def test_train_rows_log_the_loss_of_the_task_each_step_drew(tmp_path):
    """A step's `loss` is whichever task was drawn (a sawtooth when plotted); `<task>/loss` separates them."""
    data = toy_tasks((32, 16))
    model = tiny_model("bert", dropout=0.0)
    delta = deltatune.attach(model, task_deltas([LoRA(r=2, targets=["query"])], data))
    train(model, delta, data, TrainConfig(epochs=1, batch_size=8, eval_baseline=False), tmp_path, collate=COLLATE)
    drawn = [task_of_batch(data, batch) for batch in data.epoch_batches(8, 0, 0)]
    logged = rows(tmp_path, "train")
    assert [[k for k in r if k.endswith("/loss")] for r in logged] == [[f"{('same', 'flip')[t]}/loss"] for t in drawn]
    assert all(r[k] == pytest.approx(r["loss"]) for r in logged for k in r if k.endswith("/loss"))
    assert set(drawn) == {0, 1}


# ---- exact resume --------------------------------------------------------------------------------------------
def resumable_run(out, at: int | None = None, resume: bool = False):
    data = toy_tasks((40, 24), "temperature", "uncertainty")
    model = tiny_model("bert", dropout=0.1)  # dropout: the RNG state matters too
    delta = deltatune.attach(model, task_deltas([PerTask(delta=LoRA(r=2, targets=["query"]))], data))
    cfg = TrainConfig(epochs=2, batch_size=8, checkpoint_every=3, eval_every=4, log_every=1, grad_accum=2,
                      length_grouping=True, optimizer={"lr": 1e-2})
    if at:
        with pytest.raises(Interrupt):
            train(model, delta, data, cfg, out, collate=COLLATE, on_event=interrupt_at(at))
        return None
    train(model, delta, data, cfg, out, collate=COLLATE, resume=resume)
    return load_tensors(checkpoint_dirs(out / "checkpoints")[-1] / "delta.safetensors")


def test_multitask_resume_is_exact(tmp_path):
    whole = resumable_run(tmp_path / "a")
    resumable_run(tmp_path / "b", at=5)  # checkpoint at step 3; steps 4-5 are redone
    resumed = resumable_run(tmp_path / "b", resume=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    strip = ("elapsed", "tokens_per_s")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in rows(tmp_path / "b")]
            == [{k: v for k, v in r.items() if k not in strip} for r in rows(tmp_path / "a")])


# ---- configs -------------------------------------------------------------------------------------------------
def raw_config(**changes) -> dict:
    config = {"model": {"path": "minilm"},
              "tasks": [{"name": "sentiment", "data": {"train": "rotten_tomatoes"}},
                        {"name": "topic", "data": {"train": "chatterbot_topics"}}],
              "delta": [{"method": "lora", "r": 4}]}
    return {**config, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"tasks": [{"name": "a", "data": {"train": "rotten_tomatoes"}}] * 2}, r"task names must be distinct; repeated: a"),
    ({"multitask": {"sampling": "random"}}, r"multitask\.sampling: Input should be 'proportional', 'temperature', "
                                            r"'uniform' or 'round_robin'"),
    ({"multitask": {"temprature": 3}}, r"multitask\.temprature: unknown key \(did you mean 'temperature'\?\)"),
    ({"data": {"train": "rotten_tomatoes"}}, r"give either `data:` \(one task\) or `tasks:`"),
    ({"tasks": None}, r"give either `data:` \(one task\) or `tasks:`"),
    ({"delta": [{"method": "lora"}, {"method": "head"}]}, r"remove `head`: with `tasks:` every task gets its own head"),
    ({"multitask": {"weighting": "uncertainty"}, "tasks": [{"name": "a", "data": {"train": "rotten_tomatoes"},
                                                           "weight": 2}]}, r"tasks a set a weight, but weighting: "
                                                                           r"uncertainty learns the weights"),
    ({"tasks": [{"name": "a", "data": {"train": "rotten_tomatoes"}, "metric": "mse"}]},
     r"tasks\.0: unknown metric 'mse' for a classification task; available: loss, accuracy, macro_f1"),
    ({"tasks": [{"name": "a", "data": {"train": "chatterbot", "format": "messages", "packing": True}}]},
     r"data\.packing is not supported in multi-task runs"),
    ({"tasks": [{"name": "a/b", "data": {"train": "rotten_tomatoes"}}]}, r"tasks\.0\.name: task name 'a/b' must use"),
    ({"tasks": [{"name": "a", "dta": {}}]},
     r"tasks\.0\.dta: unknown key \(did you mean 'data'\?\); allowed keys: name, data, metric, weight"),
    ({"tasks": [{"name": "a", "data": {"train": "nope.jsonl"}}]},
     r"tasks\.0\.data\.train: file 'nope\.jsonl' not found"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(raw_config(**changes))


def test_multitask_without_tasks_is_refused():
    with pytest.raises(ConfigError, match=r"`multitask:` goes with `tasks:`"):
        validate_config({**raw_config(tasks=None), "data": {"train": "rotten_tomatoes"}, "multitask": {}})


def test_example_config_validates_and_round_trips():
    path = Path(__file__).parent.parent / "examples" / "multitask.yaml"
    config = validate_config(yaml.safe_load(path.read_text()))
    assert [t.name for t in config.tasks] == ["sentiment", "topic"] and config.task == "classification"
    assert validate_config(config.to_dict()).to_dict() == config.to_dict()


# ---- command line --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def topics(tmp_path_factory) -> Path:
    """A learnable toy topic file: the label is the topic word in the line."""
    words = {"food": "pizza", "sports": "football", "money": "bank"}
    path = tmp_path_factory.mktemp("topics") / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": f"i like {w} a lot {i}", "label": t}) + "\n"
                            for i in range(30) for t, w in words.items()))
    return path


@pytest.mark.slow
def test_cli_trains_and_evaluates_two_tasks(tmp_path, tiny_bert_dir, reviews, topics, capsys):  # noqa: F811
    from deltatune.cli import main

    path = write_config(tmp_path, tiny_bert_dir, reviews)
    config = yaml.safe_load(path.read_text())
    del config["data"]
    config["tasks"] = [{"name": "sentiment", "data": {"train": str(reviews), "max_length": 32}},
                       {"name": "topic", "data": {"train": str(topics), "max_length": 32}}]
    config["multitask"] = {"sampling": "round_robin", "weighting": "uncertainty"}
    config["train"].update(epochs=3, optimizer={"lr": 0.05})  # each task's adapter gets every other step
    config["delta"] = [{"method": "per_task", "delta": {"method": "lora", "r": 4, "targets": ["query", "value"]}}]
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "data tasks sentiment, topic" in printed and "topic/accuracy" in printed
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["metric"] == "macro/accuracy" and result["steps"] == 33
    assert result["test"]["sentiment/accuracy"] == result["test"]["topic/accuracy"] == 1.0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["tasks"][1]["name"] == "topic" and "data" not in saved
    assert main(["eval", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    for key in ("sentiment/accuracy", "topic/accuracy", "macro/accuracy", "topic/log_var"):
        assert key in table
    assert f"{result['test']['macro/accuracy']:.4f}" in table
