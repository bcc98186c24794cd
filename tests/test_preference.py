"""Preference tuning: `format: preference` data, DPO / SimPO losses and gradients against TRL, the reference model
as the delta switched off, metrics, config validation and a CLI run."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import peft
import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

import deltatune
from deltatune.data import Collator, DataConfig, prepare_data
from deltatune.data.conversations import RecordError
from deltatune.data.preference import PairReader
from deltatune.errors import ConfigError, DataError
from deltatune.interop.peft import export_peft
from deltatune.train import TrainConfig, train
from deltatune.train.preference import Preference, PreferenceConfig, dpo_loss, sequence_logps
from tests.tiny_lm import tiny_llama, tiny_tokenizer

trl = pytest.importorskip("trl")  # a test extra (pyproject), as peft is

PAIRS = [("hello world, how", " are you today?", " the lazy dog."),
         ("What is your name?", " I am fine, thanks!", " a question and an answer."),
         ("the quick brown fox", " jumps over the lazy dog.", " hello world"),
         ("user assistant system:", " a question.", " an answer, how are you?")]
CHAT = [{"prompt": [{"role": "user", "content": p.strip()}], "chosen": [{"role": "assistant", "content": c.strip()}],
         "rejected": [{"role": "assistant", "content": r.strip()}]} for p, c, r in PAIRS]
PLAIN = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "dropout": 0.0}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pairs_data(tmp_path: Path, tok, records: list[dict], **options):
    data = prepare_data(DataConfig(train=str(write_jsonl(tmp_path / "pairs.jsonl", records)), format="auto",
                                   split=(1, 0, 0), **options), tok)
    assert data.task == "preference" and data.format == "preference"
    return data


def lora_model(tok, seed: int = 1):
    """A tiny Llama with a LoRA whose B is random, so the policy differs from the reference."""
    model = tiny_llama(tok)
    delta = deltatune.attach(model, deltatune.LoRA(**LORA))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in delta.trainable_parameters().items():
            p.normal_(0, 0.3)
    return model, delta


def trl_trainer(model, delta, tok, records, tmp_path, **args):
    """TRL's DPOTrainer training a new PEFT LoRA (so its reference is the base model) that is then given the same
    weights as `delta` (deltatune's PEFT export)."""
    folder = export_peft(delta, tmp_path / "adapter")
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                           per_device_train_batch_size=len(records), logging_steps=1, save_strategy="no",
                           max_length=None, gradient_checkpointing=False, **args)
    logging.getLogger("trl").setLevel(logging.ERROR)
    lora = peft.LoraConfig.from_pretrained(folder)
    lora.inference_mode = False  # an exported adapter is saved for inference (frozen)
    trainer = trl.DPOTrainer(model=tiny_llama(tok), args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tok, peft_config=lora)
    result = peft.set_peft_model_state_dict(trainer.model, load_file(folder / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    return trainer


def lora_grads(named_params) -> dict[str, torch.Tensor]:
    """LoRA gradients by `<module>.lora_A|lora_B` (deltatune and PEFT name them differently)."""
    out = {}
    for name, p in named_params:
        if p.grad is not None:
            name = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".weight", "")
            out[name] = p.grad.clone()
    return out


# ---- data ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("records", [PLAIN, CHAT], ids=["plain", "chat"])
def test_pairs_tokenize_as_trl_does(records, tok, tmp_path):
    data = pairs_data(tmp_path, tok, records)
    ours = Collator(tok.pad_token_id)([data.train[i] for i in range(len(records))])
    trainer = trl_trainer(*lora_model(tok), tok, records, tmp_path)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    labels = theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, -100)
    assert torch.equal(ours["labels"], labels)
    assert data.chat_template == (tok.chat_template if records is CHAT else None)


def test_implicit_prompt_is_the_shared_beginning_as_trl_extracts_it(tok, tmp_path):
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT]
    implicit += [{"chosen": "Say hi: hello there", "rejected": "Say hi: go away"}]
    reader = PairReader.of(DataConfig(train="x.jsonl", format="preference"))
    for record in implicit:
        theirs = trl.data_utils.extract_prompt(dict(record))
        pair = reader(record)
        assert (pair.prompt, pair.chosen, pair.rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    explicit = Collator(tok.pad_token_id)(list(pairs_data(tmp_path, tok, CHAT).train))
    (tmp_path / "implicit").mkdir()
    derived = Collator(tok.pad_token_id)(list(pairs_data(tmp_path / "implicit", tok, implicit[:-1]).train))
    assert torch.equal(explicit["input_ids"], derived["input_ids"]) and torch.equal(explicit["labels"],
                                                                                     derived["labels"])
    with pytest.raises(RecordError, match="no 'prompt' column, and 'chosen' and 'rejected' do not begin with a"):
        reader({"chosen": "yes", "rejected": "no"})


def test_pair_rows_chosen_first_and_prompt_masked(tok, tmp_path):
    data = pairs_data(tmp_path, tok, PLAIN[:2])
    batch = Collator(tok.pad_token_id)([data.train[0], data.train[1]])
    assert batch["input_ids"].shape[0] == 4
    prompt = len(tok(PAIRS[0][0])["input_ids"])
    assert (batch["labels"][0, :prompt] == -100).all() and (batch["labels"][2, :prompt] == -100).all()
    chosen = [t for t in batch["labels"][0].tolist() if t != -100]
    rejected = [t for t in batch["labels"][2].tolist() if t != -100]
    assert tok.decode(chosen) == PAIRS[0][1] + tok.eos_token
    assert tok.decode(rejected) == PAIRS[0][2] + tok.eos_token


def test_strings_with_a_chat_template_render_as_turns(tok, tmp_path):
    data = pairs_data(tmp_path, tok, PLAIN[:1], chat_template="chatml")
    text = tok.decode(data.train[0]["input_ids"])
    assert text == f"<|im_start|>user\n{PAIRS[0][0]}<|im_end|>\n<|im_start|>assistant\n{PAIRS[0][1]}<|im_end|>\n"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi", "chosen": "a"}, r"pairs.jsonl:2: record has no 'rejected' \(columns: prompt, chosen\)"),
    ({"prompt": "hi", "chosen": "a", "rejected": "a"}, r"pairs.jsonl:2: 'chosen' and 'rejected' are the same answer"),
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     r"pairs.jsonl:2: column 'chosen' holds \[\{'role'.* but earlier records hold str values"),
])
def test_bad_pairs_name_file_and_line(record, message, tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PLAIN[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(train=str(path), format="preference", split=(1, 0, 0)), tok)


@pytest.mark.parametrize("record, message", [
    ({**CHAT[0], "rejected": [{"role": "user", "content": "x"}]},
     r"pairs.jsonl:1: 'rejected' must end with an assistant turn, not 'user'"),
    ({**PLAIN[0], "chosen": [{"role": "assistant", "content": "a"}]},
     r"pairs.jsonl:1: 'chosen' is a list of chat turns but 'prompt' is a string"),
    ({**CHAT[0], "chosen": [{"role": "assistant"}]}, r"pairs.jsonl:1: chosen\[0\] has no 'content'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"pairs.jsonl:1: 'prompt' must be a string or a list of chat"),
])
def test_bad_pair_types_name_file_and_line(record, message, tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(train=str(path), format="preference", split=(1, 0, 0)), tok)


def test_pairs_cut_to_max_length_keep_the_start_and_drop_answerless_pairs(tok, tmp_path):
    long_prompt = {"prompt": "the quick brown fox " * 8, "chosen": " yes", "rejected": " no"}
    with pytest.warns(UserWarning, match="longer than 12 tokens"):
        data = pairs_data(tmp_path, tok, [PLAIN[0], long_prompt], max_length=12)
    assert len(data.train) == 1 and len(data.train[0]["input_ids"]) <= 12
    assert len(data.train[0]["rejected_input_ids"]) <= 12


@pytest.mark.parametrize("options, message", [
    ({"packing": True}, "packing do not apply to format preference"),
    ({"train_on_prompt": True}, "train_on_prompt do not apply to format preference"),
])
def test_preference_data_options_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(train="x.jsonl", format="preference", **options)


# ---- losses and gradients against TRL ----------------------------------------------------------------------------
@pytest.mark.parametrize("records", [PLAIN, CHAT], ids=["plain", "chat"])
def test_dpo_loss_gradients_and_metrics_equal_trl(records, tok, tmp_path):
    model, delta = lora_model(tok)
    trainer = trl_trainer(model, delta, tok, records, tmp_path)
    data = pairs_data(tmp_path, tok, records)
    objective = Preference(PreferenceConfig(beta=0.1), delta)
    batch = Collator(tok.pad_token_id)([data.train[i] for i in range(len(records))])
    model.train()
    ours = objective.forward_loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, batch)
    ours = ours / objective.units(batch)
    ours.backward()
    stats = objective.step_losses([batch], [float(ours.detach())])

    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    mine, reference = lora_grads(model.named_parameters()), lora_grads(trainer.model.named_parameters())
    assert mine.keys() == reference.keys() and len(mine) == 8
    for name in mine:
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-4 for g in mine.values())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert stats[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert abs(stats["rewards/margins"]) > 1e-3  # the random LoRA moved the policy away from the reference


def test_one_dpo_step_updates_lora_as_trl(tok, tmp_path):
    model, delta = lora_model(tok)
    trainer = trl_trainer(model, delta, tok, PLAIN, tmp_path, max_steps=1, learning_rate=0.5, optim="sgd",
                          lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    data = pairs_data(tmp_path, tok, PLAIN)
    data.preference = PreferenceConfig(beta=0.1)
    cfg = TrainConfig(epochs=1, batch_size=len(PLAIN), max_grad_norm=None, eval_baseline=False,
                      optimizer={"name": "sgd", "lr": 0.5, "schedule": "constant"})
    before = {k: v.clone() for k, v in delta.state_dict().items()}
    train(model, delta, data, cfg, tmp_path / "run", collate=Collator(tok.pad_token_id))
    trainer.train()
    ours = {k: v for k, v in lora_grads((n, SimpleNamespace(grad=p)) for n, p in delta.state_dict().items()).items()}
    theirs = lora_grads((n, SimpleNamespace(grad=p.detach())) for n, p in trainer.model.named_parameters()
                        if "lora_" in n)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
        assert not torch.equal(ours[name], before[next(k for k in before if k.startswith(name))])


def test_label_smoothing_is_conservative_dpo_as_trl_computes_it():
    """TRL 1.16 applies label_smoothing to DPO in its `aot` form, which for one pair is conservative DPO."""
    g = torch.Generator().manual_seed(0)
    logps = [torch.randn(1, generator=g) * 5 for _ in range(4)]
    fake = SimpleNamespace(beta=0.3, label_smoothing=0.2)
    ours = dpo_loss(*logps, beta=fake.beta, label_smoothing=fake.label_smoothing)[0]
    z = (logps[0] - logps[1]) - (logps[2] - logps[3])
    expected = -torch.nn.functional.logsigmoid(0.3 * z) * 0.8 - torch.nn.functional.logsigmoid(-0.3 * z) * 0.2
    torch.testing.assert_close(ours, expected)


def test_simpo_loss_and_gradients_equal_trl_cpo(tok, tmp_path):
    from trl.experimental.cpo import CPOTrainer

    model, delta = lora_model(tok)
    data = pairs_data(tmp_path, tok, PLAIN)
    cfg = PreferenceConfig(loss="simpo", beta=2.0, gamma=1.0, label_smoothing=0.1)
    objective = Preference(cfg, delta)
    batch = Collator(tok.pad_token_id)([data.train[i] for i in range(len(PLAIN))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses, stats = objective.pair_losses(model, inputs, batch["labels"])
    losses.mean().backward()
    mine = lora_grads(model.named_parameters())

    model.zero_grad()
    logits = model(**inputs).logits
    average = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    chosen, rejected = average.chunk(2)
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=1.0, beta=2.0, label_smoothing=0.1,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen, rejected)
    theirs.mean().backward()
    torch.testing.assert_close(losses, theirs)
    torch.testing.assert_close(stats["rewards/chosen"], chosen_rewards)
    torch.testing.assert_close(stats["rewards/rejected"], rejected_rewards)
    for name, grad in lora_grads(model.named_parameters()).items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-7)


def test_sequence_logps_through_the_head_only_at_answer_tokens(tok, tmp_path):
    model, _ = lora_model(tok)
    data = pairs_data(tmp_path, tok, PLAIN)
    batch = Collator(tok.pad_token_id)([data.train[i] for i in range(len(PLAIN))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sums, counts = sequence_logps(model, inputs, batch["labels"])
    logps = model(**inputs).logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    expected = (logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)).sum(1)
    torch.testing.assert_close(sums, expected)
    assert counts.tolist() == (targets != -100).sum(1).tolist()


# ---- the reference: the delta switched off, for any method -------------------------------------------------------
REFERENCE_METHODS = {"lora": deltatune.LoRA(**LORA), "pissa": deltatune.LoRA(**LORA, init="pissa"),
                     "olora": deltatune.LoRA(**LORA, init="olora"), "ia3": {"method": "ia3"}, "prompt": {"method": "prompt"},
                     "adapter": {"method": "adapter"}, "full": {"method": "full"},
                     "bitfit": {"method": "bitfit", "add_missing": True}, "prefix": {"method": "prefix"}}


@pytest.mark.parametrize("method", REFERENCE_METHODS)
def test_dpo_reference_is_the_base_model_for_every_method(method, tok, tmp_path):
    from deltatune.registry import parse_delta_config

    data = pairs_data(tmp_path, tok, PLAIN)
    batch = Collator(tok.pad_token_id)([data.train[i] for i in range(len(PLAIN))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = tiny_llama(tok)
    base = copy.deepcopy(model)
    config = REFERENCE_METHODS[method]
    delta = deltatune.attach(model, config if isinstance(config, deltatune.LoRA) else parse_delta_config(config))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.2 * torch.randn_like(p))
    model.train()
    objective = Preference(PreferenceConfig(beta=0.5), delta)
    losses, stats = objective.pair_losses(model, inputs, batch["labels"])
    losses.sum().backward()
    with torch.no_grad():
        expected_ref = sequence_logps(base, inputs, batch["labels"])[0]
    policy = torch.cat([stats["logps/chosen"], stats["logps/rejected"]])
    ref = policy - torch.cat([stats["rewards/chosen"], stats["rewards/rejected"]]) / 0.5
    torch.testing.assert_close(ref, expected_ref, rtol=1e-5, atol=1e-4)
    assert (policy - expected_ref).abs().max() > 1e-3  # the delta changed the policy
    grads = [p.grad for p in delta.trainable_parameters().values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    assert model.training  # the reference forward ran in eval mode and restored the mode


def test_switching_off_a_merged_delta_is_refused(tok):
    model = tiny_llama(tok)
    delta = deltatune.attach(model, deltatune.LoRA(**LORA))
    delta.merge()
    with pytest.raises(ConfigError, match=r"cannot switch off a merged delta \(lora\).*unmerge\(\) it first"):
        with delta.disabled():
            pass


def test_per_task_over_an_in_place_method_refuses_to_switch_off(tok):
    from deltatune.registry import parse_delta_config

    model = tiny_llama(tok)
    delta = deltatune.attach(model, parse_delta_config({"method": "per_task", "tasks": ["a", "b"],
                                                        "delta": {"method": "bitfit", "add_missing": True}}))
    with pytest.raises(ConfigError, match="per_task over bitfit cannot be switched off: it trains the base tensors"):
        with delta.disabled():
            pass


# ---- config ------------------------------------------------------------------------------------------------------
def run_config(**extra) -> dict:
    return {"model": {"path": "smollm2-135m"}, "data": {"train": "chatterbot_preference", "format": "preference"},
            "delta": [{"method": "lora"}], **extra}


@pytest.mark.parametrize("extra, message", [
    ({"preference": {"loss": "orpo"}}, r"preference.loss: .*'dpo' or 'simpo'"),
    ({"preference": {"beta": 0}}, r"preference.beta: .*greater than 0"),
    ({"preference": {"label_smoothing": 0.5}}, r"preference.label_smoothing: .*less than 0.5"),
    ({"preference": {"gamma": 1.0}}, r"gamma is the target margin of loss: simpo"),
    ({"preference": {"betta": 0.1}}, r"preference.betta"),
    ({"data": {"train": "rotten_tomatoes"}, "preference": {}}, r"it needs data.format: preference \(or auto\), not "
                                                              "classification"),
])
def test_preference_config_is_validated(extra, message):
    from deltatune.config import validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(run_config(**extra))


def test_preference_defaults_and_metric_choices(tok):
    from deltatune.config import validate_config

    config = validate_config(run_config())
    assert config.preference == PreferenceConfig(loss="dpo", beta=0.1, label_smoothing=0.0)
    assert config.to_dict()["preference"]["beta"] == 0.1
    assert PreferenceConfig(loss="simpo").margin == 0.5
    objective = Preference(config.preference, None)
    objective.check_metric("rewards/accuracies")
    with pytest.raises(ConfigError, match="unknown metric 'accuracy' for preference data; available: loss, "
                                          "rewards/accuracies, rewards/margins"):
        objective.check_metric("accuracy")


def test_preference_tasks_are_refused():
    from deltatune.config import validate_config

    raw = run_config(tasks=[{"name": "p", "data": {"train": "x.jsonl", "format": "preference"}, "metric": "loss"}])
    del raw["data"]
    with pytest.raises(ConfigError, match="preference data trains a single task"):
        validate_config(raw)


# ---- a whole run -------------------------------------------------------------------------------------------------
def test_cli_dpo_run_logs_rewards_and_evaluates(tmp_path, capsys):
    from deltatune.cli import main
    from tests.tiny_lm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "model")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", CHAT * 6)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)}, "data": {"train": str(pairs), "split": [0.75, 0.25, 0], "format": "auto"},
        "delta": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}],
        "preference": {"beta": 0.5}, "output_dir": str(tmp_path / "run"),
        "train": {"epochs": 3, "batch_size": 6, "metric": "rewards/accuracies", "optimizer": {"lr": 0.01}}}))
    assert main(["train", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] in ("baseline", "eval")]
    assert len(train_rows) == 9 and all("rewards/margins" in r for r in train_rows)
    assert evals[0]["rewards/accuracies"] == 0.0 and evals[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert evals[-1]["rewards/accuracies"] == 1.0 and evals[-1]["rewards/margins"] > 0
    assert evals[-1]["loss"] < evals[0]["loss"]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["metric"] == "rewards/accuracies" and result["best_validation"]["rewards/accuracies"] == 1.0
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "rewards/accuracies" in header and "logps/chosen" in header
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "validation"]) == 0
    assert "rewards/accuracies" in capsys.readouterr().out
