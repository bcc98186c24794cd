"""Multiple-choice scoring: the file format's errors, lm-eval's tokenisation rule, accuracies from log-likelihoods,
and per-example log-likelihoods equal to lm-eval's own HFLM on the same tiny model (plain, chat, with deltas)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError, DataError
from deltatune.generation.choices import ChoiceRecord, encode_pair, loglikelihoods, read_choices, score_choices
from deltatune.registry import parse_delta_config
from tests.tiny_lm import tiny_llama, tiny_tokenizer

TOLERANCE = 1e-4  # absolute, on summed fp32 log-probabilities (batches padded differently)
RECORDS = [{"question": "Question: what jumps over the dog?\nAnswer:",
            "choices": ["the quick brown fox", "hello world", "a lazy dog"], "answer": 0},
           {"question": "Question: how are you?\nAnswer:", "choices": ["I am fine, thanks!", "the fox", "an answer"],
            "answer": 0},
           {"question": "Question: what is your name?\nAnswer:", "choices": ["assistant", "user", "system", "you"],
            "answer": 1},
           {"question": "hello", "choices": [" world, how are you today?", "!"], "answer": 1}]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: mc.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def task(tmp_path):
    """A local lm-eval task: mc.yaml over mc.jsonl (RECORDS)."""
    write_jsonl(tmp_path / "mc.jsonl", RECORDS)
    (tmp_path / "mc.yaml").write_text(TASK_YAML, encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer), tokenizer


def test_read_choices_answers_by_index_or_text(task):
    records = read_choices(task / "mc.jsonl")
    assert [r.answer for r in records] == [0, 0, 1, 1]
    by_text = write_jsonl(task / "text.jsonl", [dict(r, answer=r["choices"][r["answer"]]) for r in RECORDS])
    assert [r.answer for r in read_choices(by_text)] == [0, 0, 1, 1]
    assert records[2] == ChoiceRecord(f"{task / 'mc.jsonl'}:3", RECORDS[2]["question"],
                                      ("assistant", "user", "system", "you"), 1)
    assert [r.where for r in read_choices(task / "mc.jsonl", limit=2, skip=1)] == \
        [f"{task / 'mc.jsonl'}:2", f"{task / 'mc.jsonl'}:3"]


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is not a choice index 0..1 (or a choice's text)"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is none of the choices; give the right "),
    ({"question": "q", "choices": ["a"], "answer": 0}, "'choices' must be a list of two or more non-empty strings"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "'choices' must be a list of two or more non-empty"),
    ({"question": None, "choices": ["a", "b"], "answer": 0}, "'question' must be a string"),
])
def test_bad_records_name_file_and_line(tmp_path, row, message):
    good = {"question": "ok", "choices": ["a", "b"], "answer": "a" if isinstance(row["answer"], str) else 0}
    path = write_jsonl(tmp_path / "mc.jsonl", [good, row])  # one type per column, as any table
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: {message}")):
        read_choices(path)


def test_missing_column_and_empty_selection(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match=r"no column 'choices' \(columns: question, options, answer\)"):
        read_choices(path)
    path = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match="no records left after skipping 1"):
        read_choices(path, skip=1)
    with pytest.raises(ConfigError, match=r"skip must be 0 or more and limit 1 or more \(got skip=0, limit=0\)"):
        read_choices(path, limit=0)


def test_encode_pair_splits_the_joint_encoding(tiny):
    _, tok = tiny
    # " world" is one merged token after "hello": encoded apart, "hello " + "world" would differ
    context, continuation = encode_pair(tok, "hello ", "world")
    assert context == tok("hello")["input_ids"]  # the trailing space moved to the continuation
    assert context + continuation == tok("hello world")["input_ids"]
    assert continuation == tok(" world")["input_ids"] != tok("world")["input_ids"]
    assert encode_pair(tok, "", "hello") == ([tok.bos_token_id], tok("hello")["input_ids"])


def test_accuracies_from_loglikelihoods(tiny, monkeypatch):
    model, tok = tiny
    records = [ChoiceRecord("a:1", "q", ("x", "yyyy"), 1), ChoiceRecord("a:2", "q", ("x", "yyyy"), 1)]
    fixed = iter([(-2.0, False), (-6.0, False), (-1.0, False), (-3.0, True)])  # per pair, in order
    monkeypatch.setattr("deltatune.generation.choices.loglikelihoods", lambda *a, **k: [next(fixed) for _ in a[2]])
    scores = score_choices(model, tok, records)
    # record 1: raw picks x (-2 > -6); per character x -2 < yyyy -1.5 -> yyyy. record 2: raw x (-1 > -3); norm
    # -1 < -0.75 -> yyyy
    assert scores.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert scores.rows(records)[0] == {"where": "a:1", "answer": 1, "predicted": 0, "predicted_norm": 1,
                                       "loglikelihoods": [-2.0, -6.0]}


def test_loglikelihoods_sum_token_logprobs(tiny):
    model, tok = tiny
    (ll, greedy), = loglikelihoods(model, tok, [("hello", " world")])
    ids = tok("hello world")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    n = len(tok("hello")["input_ids"])
    assert ll == pytest.approx(sum(logprobs[i - 1, ids[i]].item() for i in range(n, len(ids))), abs=1e-5)
    assert greedy == all(logprobs[i - 1].argmax().item() == ids[i] for i in range(n, len(ids)))


def hflm_loglikelihoods(model, tok, task, chat: bool = False) -> list[list[float]]:
    """Per-document choice log-likelihoods as lm-eval's own HFLM computes them on the task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")
    out = simple_evaluate(model=lm, tasks=[str(task / "mc.yaml")], task_manager=TaskManager(include_defaults=False),
                          apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [[ll for ll, _ in s["filtered_resps"]] for s in samples], out["results"]["tiny_mc"]


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_equals_lm_eval_hflm(tiny, task, monkeypatch, chat):
    monkeypatch.chdir(task)  # lm-eval reads data_files relative to the working directory
    model, tok = tiny
    expected, metrics = hflm_loglikelihoods(model, tok, task, chat)
    scores = score_choices(model, tok, read_choices(task / "mc.jsonl"), template=tok.chat_template if chat else None,
                           batch_size=2)
    assert len(scores.loglikelihoods) == len(expected) == 4
    for ours, theirs in zip(scores.loglikelihoods, expected):
        assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert scores.metrics == {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}


@pytest.mark.slow
@pytest.mark.parametrize("delta", [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
                                   {"method": "prompt", "n_tokens": 3}], ids=["lora", "prompt"])
def test_equals_lm_eval_hflm_with_a_delta(tiny, task, monkeypatch, delta):
    monkeypatch.chdir(task)
    model, tok = tiny
    plain = hflm_loglikelihoods(model, tok, task)[0]
    attached = deltatune.attach(model, parse_delta_config(delta))
    try:
        torch.manual_seed(1)
        with torch.no_grad():  # a trained-looking delta: LoRA's B is no longer zero
            for p in attached.trainable_parameters().values():
                p.add_(torch.randn_like(p) * 0.5)
        expected, _ = hflm_loglikelihoods(model, tok, task)
        scores = score_choices(model, tok, read_choices(task / "mc.jsonl"), batch_size=4)
    finally:
        attached.detach()
    for ours, theirs in zip(scores.loglikelihoods, expected):
        assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert not any(math.isclose(a, b) for a, b in zip(scores.loglikelihoods[0], plain[0]))  # the delta counts
