"""The lm-eval bridge: DeltaLM's numbers equal our own multiple-choice scorer's and lm-eval's HFLM's; local task
YAML checks (offline builders, data files relative to the YAML, no Python code without permission)."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import ConfigError, DataError
from deltatune.generation.sampling import Sampling, generate
from deltatune.generation.choices import read_choices, score_choices
from deltatune.interop.lm_eval import DeltaLM, evaluate_tasks, task_configs
from tests.test_choices import TASK_YAML, TOLERANCE, task, tiny  # noqa: F401 (fixtures)
from tests.test_generation_cli import held_out, lm_dir, run  # noqa: F401 (fixtures: a short LoRA SFT run)

GEN_YAML = TASK_YAML.replace("tiny_mc", "tiny_gen").split("output_type")[0] + """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""


def flat(lists):
    return [x for values in lists for x in values]


def instance(request_type, args, i=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type, {}, args, i)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_bridge_equals_our_scorer(tiny, task, chat):
    model, tok = tiny
    template = tok.chat_template if chat else None
    out = evaluate_tasks(DeltaLM(model, tok, template, batch_size=5), task_configs(task / "mc.yaml"), chat=chat)
    ours = score_choices(model, tok, read_choices(task / "mc.jsonl"), template=template)
    rows = sorted(out["samples"]["tiny_mc"], key=lambda r: r["doc_id"])
    assert len(rows) == len(ours.loglikelihoods) == 4
    for row, lls in zip(rows, ours.loglikelihoods):  # the same code, batched otherwise (lm-eval orders requests)
        assert [ll for ll, _ in row["responses"]] == pytest.approx(lls, abs=TOLERANCE)
    assert out["results"]["tiny_mc"]["acc"] == ours.metrics["acc"]
    assert out["results"]["tiny_mc"]["acc_norm"] == ours.metrics["acc_norm"]
    assert out["results"]["tiny_mc"]["acc_stderr"] > 0


@pytest.mark.slow
def test_skip_and_limit_select_the_same_documents(tiny, task):
    model, tok = tiny
    out = evaluate_tasks(DeltaLM(model, tok), task_configs(task / "mc.yaml"), skip=1, limit=2)
    ours = score_choices(model, tok, read_choices(task / "mc.jsonl", skip=1, limit=2))
    rows = sorted(out["samples"]["tiny_mc"], key=lambda r: r["doc_id"])
    assert flat([ll for ll, _ in r["responses"]] for r in rows) == pytest.approx(flat(ours.loglikelihoods),
                                                                                 abs=TOLERANCE)
    with pytest.raises(ConfigError, match="task tiny_mc: skipping 4 documents leaves none of its 4"):
        evaluate_tasks(DeltaLM(model, tok), task_configs(task / "mc.yaml"), skip=4)


@pytest.mark.slow
def test_generate_until_task(tiny, task):
    model, tok = tiny
    (task / "gen.yaml").write_text(GEN_YAML, encoding="utf-8")
    out = evaluate_tasks(DeltaLM(model, tok, batch_size=3), task_configs(task / "gen.yaml"), limit=3)
    rows = sorted(out["samples"]["tiny_gen"], key=lambda r: r["doc_id"])
    questions = [r.question for r in read_choices(task / "mc.jsonl", limit=3)]
    expected = generate(model, tok, questions, Sampling(max_new_tokens=6, stop=["\n"]))
    assert [r["responses"][0] for r in rows] == expected
    assert out["results"]["tiny_gen"]["exact_match"] == 0.0  # a random model says none of the answers


def test_loglikelihood_rolling_equals_hflm(tiny):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    texts = ["hello world, how are you today?", " ".join(["the quick brown fox jumps over the lazy dog."] * 30)]
    assert len(tok(texts[1])["input_ids"]) > model.config.max_position_embeddings  # several windows
    requests = [instance("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)]
    ours = DeltaLM(model, tok, batch_size=2).loglikelihood_rolling(requests)
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu").loglikelihood_rolling(requests)
    assert ours == pytest.approx(theirs, abs=1e-3)
    ids = tok(texts[0])["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([[tok.bos_token_id] + ids])).logits[0], -1)
    assert ours[0] == pytest.approx(sum(logprobs[i, t].item() for i, t in enumerate(ids)), abs=1e-4)


def test_chat_template_renders_as_the_tokenizer(tiny):
    model, tok = tiny
    history = [{"role": "user", "content": "hi"}]
    assert DeltaLM(model, tok, tok.chat_template).apply_chat_template(history) == \
        tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ConfigError, match="lm-eval asked for the chat template, but there is none"):
        DeltaLM(model, tok).apply_chat_template(history)


def test_example_task_names_a_packaged_data_set(tmp_cache):
    from deltatune.models.assets import resolve_data_path

    (config,) = task_configs("examples/lm_eval")
    assert config["task"] == "chatterbot_mc" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"] == {"test": str(resolve_data_path("chatterbot_mc"))}


def test_task_yaml_checks(task):
    configs = task_configs(task)  # a folder: every .yaml in it
    assert [c["task"] for c in configs] == ["tiny_mc"]
    assert configs[0]["dataset_kwargs"]["data_files"] == {"test": str((task / "mc.jsonl").resolve())}

    def check(text, error, message):
        (task / "bad.yaml").write_text(text, encoding="utf-8")
        with pytest.raises(error, match=message):
            task_configs(task / "bad.yaml")

    check(TASK_YAML.replace("dataset_path: json", "dataset_path: cais/mmlu"), ConfigError,
          "dataset_path 'cais/mmlu' would be fetched from a hub; use a local builder")
    check(TASK_YAML.replace("mc.jsonl", "missing.jsonl"), DataError,
          r"missing.jsonl' does not exist \(data_files are relative to the task YAML\)")
    check(TASK_YAML.replace("data_files: {test: mc.jsonl}", "name: x"), ConfigError,
          "dataset_kwargs.data_files is missing")
    check(TASK_YAML.replace("task: tiny_mc", "tag: x"), ConfigError, "a task YAML needs a `task:` name")
    check(TASK_YAML + "process_docs: !function utils.process\n", ConfigError,
          "`!function` runs Python code from the task folder; pass --trust-remote-code")
    (task / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no task .yaml files in this folder"):
        task_configs(task / "empty")
    with pytest.raises(ConfigError, match="no such task YAML file or folder"):
        task_configs(task / "nothing.yaml")


@pytest.mark.slow
def test_cli_choices_and_lm_eval_agree(run, task, tmp_path, capsys, monkeypatch):
    """`eval RUN --choices FILE` and `eval RUN --lm-eval TASK.yaml` on an SFT run (chat template on by default):
    the same accuracies, base and fine-tuned, equal to the library's scorer."""
    from deltatune.generation.generator import open_generator

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "choices.jsonl"
    assert main(["eval", str(run), "--choices", str(task / "mc.jsonl"), "--compare-base", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 4 + ["fine-tuned"] * 4
    generator = open_generator(run=run)
    records = read_choices(task / "mc.jsonl")
    tuned = score_choices(generator.model, generator.tokenizer, records, template=generator.chat_template())
    assert flat(r["loglikelihoods"] for r in rows[4:]) == pytest.approx(flat(tuned.loglikelihoods), abs=TOLERANCE)
    assert rows[4]["where"] == f"{task / 'mc.jsonl'}:1" and "chat template" in printed
    generator.detach_delta()
    base = score_choices(generator.model, generator.tokenizer, records, template=generator.chat_template())
    assert flat(r["loglikelihoods"] for r in rows[:4]) == pytest.approx(flat(base.loglikelihoods), abs=TOLERANCE)
    assert flat(base.loglikelihoods) != pytest.approx(flat(tuned.loglikelihoods), abs=1e-3)  # the delta counts

    def table(text):
        return {cells[0]: cells[1:3] for line in text.splitlines()
                if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) >= 3}

    ours = table(printed)
    assert ours["acc"] == [f"{base.metrics['acc']:.4f}", f"{tuned.metrics['acc']:.4f}"]
    assert main(["eval", str(run), "--lm-eval", str(task / "mc.yaml"), "--compare-base"]) == 0
    bridged = table(capsys.readouterr().out)
    assert bridged["tiny_mc/acc"] == ours["acc"] and bridged["tiny_mc/acc_norm"] == ours["acc_norm"]


@pytest.mark.parametrize("args, message", [
    (["--choices", "mc.jsonl", "--lm-eval", "mc.yaml"], "--choices and --lm-eval go alone"),
    (["--lm-eval", "nothing.yaml"], "nothing.yaml: no such task YAML file or folder"),
    (["--choices", "nothing.jsonl"], "data path 'nothing.jsonl' does not exist and is not a packaged data set"),
])
def test_cli_errors_before_loading_a_model(task, capsys, monkeypatch, args, message):
    monkeypatch.chdir(task)
    assert main(["eval", "no-run-needed", *args]) == 1
    assert message in capsys.readouterr().err
