"""Generation metrics: exact match and ROUGE-L against hand-computed values; evaluation of a model on a file."""

from __future__ import annotations

import copy
import json

import pytest
import sacrebleu

from deltatune.config import validate_config
from deltatune.errors import ConfigError, DataError
from deltatune.generation.evaluate import (corpus_bleu, evaluate_generation, exact_match, lcs_length,
                                          reference_records, rouge_l, score)
from deltatune.generation.generator import Generator
from deltatune.generation.sampling import Sampling, generate
from tests.tiny_lm import tiny_llama, tiny_tokenizer


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["a", "b"]) == 2


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5 of 6 and 6 tokens
    ("A B C D", "b d e", 4 / 7),  # LCS "b d": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    ("police killed the gunman", "the gunman kill police", 0.5),  # LCS "the gunman": P = R = 1/2
    ("Hello   World\n", "hello world", 1.0),  # lower-cased whitespace tokens
    ("", "", 1.0),
    ("", "something", 0.0),
    ("x y", "z", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_exact_match_and_mean_scores():
    assert exact_match(" Paris\n", "paris") == 1.0
    assert exact_match("Paris.", "paris") == 0.0
    scores = score(["paris", "the cat sat on the mat"], ["Paris", "the cat is on the mat"])
    assert {k: scores[k] for k in ("exact_match", "rougeL")} == pytest.approx({"exact_match": 0.5,
                                                                               "rougeL": (1 + 5 / 6) / 2})


def test_corpus_bleu_hand_computed_and_as_sacrebleu():
    # one sentence, 4 of 5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams match, same length (no brevity
    # penalty): BLEU = 100 * (4/5 * 3/4 * 2/3 * 1/2) ** (1/4)
    assert corpus_bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25)
    assert corpus_bleu(["the same words here"], ["the same words here"]) == pytest.approx(100.0)
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    predictions = ["The cat sat on the mat.", "It is raining today!", "hello"]
    references = ["The cat is on the mat.", "Today it is raining.", "hello world"]
    expected = sacrebleu.BLEU().corpus_score(predictions, [references]).score  # sacrebleu's own, defaults
    assert score(predictions, references)["bleu"] == pytest.approx(expected) and 0 < expected < 100
    # corpus BLEU pools the n-gram counts: not the mean of sentence BLEUs
    sentences = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    assert expected != pytest.approx(sum(sentences) / len(sentences))


def test_reference_records_need_a_reference(tmp_path):
    path = tmp_path / "eval.jsonl"
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    rows = [{"messages": [user, answer]}, {"prompt": "2+2=", "reference": "4"},
            {"messages": [user, answer, {"role": "user", "content": "and then?"}]}, {"prompt": "no answer"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:4: no reference answer; give a 'reference' next to the 'prompt'"):
        reference_records(path)
    records = reference_records(path, limit=3)
    assert [r.reference for r in records] == ["hello", "4", "hello"]
    assert records[2].messages == (user,)  # cut before its last assistant turn
    assert [r.where for r in reference_records(path, limit=2, skip=1)] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(DataError, match="no records left after skipping 4"):
        reference_records(path, skip=4)
    for skip, limit in ((-1, None), (0, 0), (0, -2)):  # as `deltatune eval --skip/--limit` may pass them
        with pytest.raises(ConfigError, match=rf"skip must be 0 or more and limit 1 or more \(got skip={skip}, "):
            reference_records(path, skip=skip, limit=limit)


def test_evaluation_scores_the_greedy_outputs(tmp_path):
    tokenizer = tiny_tokenizer()
    generator = Generator(tiny_llama(tokenizer), tokenizer)
    sampling = Sampling(max_new_tokens=8)
    prompts = ["hello world", "the quick brown fox", "I am"]
    outputs = generate(generator.model, tokenizer, prompts, sampling)
    rows = [{"prompt": prompts[0], "reference": outputs[0]},  # the model's own answer: a perfect score
            {"prompt": prompts[1], "reference": outputs[1] + " and more words"},
            {"prompt": prompts[2], "reference": "unrelated"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    metrics, got = evaluate_generation(generator, reference_records(path), sampling, batch_size=2)
    assert got == outputs
    assert metrics == pytest.approx(score(outputs, [r["reference"] for r in rows]))
    assert metrics["exact_match"] == pytest.approx(1 / 3) and 1 / 3 < metrics["rougeL"] < 1


def test_the_config_switch_is_checked_before_training(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a b c"}\n')
    raw = {"model": {"path": str(tmp_path)}, "data": {"train": str(train), "format": "text"},
           "delta": [{"method": "lora", "targets": ["q_proj"]}], "eval_generation": {"file": "nope.jsonl"}}
    with pytest.raises(ConfigError, match="eval_generation.file: file 'nope.jsonl' not found"):
        validate_config(copy.deepcopy(raw))
    raw["eval_generation"] = {"file": str(train), "max_new_token": 8}
    with pytest.raises(ConfigError, match="eval_generation.max_new_token: unknown key \\(did you mean "
                                          "'max_new_tokens'\\?\\); allowed keys: file, skip, limit"):
        validate_config(copy.deepcopy(raw))
    raw["eval_generation"] = {"file": str(train)}
    assert validate_config(copy.deepcopy(raw)).to_dict()["eval_generation"]["file"] == str(train)
    raw["data"]["format"] = "classification"
    with pytest.raises(ConfigError, match="eval_generation: generating answers needs a causal-LM run, not "
                                          "classification"):
        validate_config(raw)
