"""`deltatune generate | chat | eval --generate` and the `eval_generation` config switch, end to end on a tiny
Llama (with a real byte-level BPE tokenizer) saved to disk and a short LoRA run on it."""

from __future__ import annotations

import contextlib
import html
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from rich.control import strip_control_codes

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.generation.evaluate import score
from deltatune.generation.sampling import Sampling
from deltatune.generation.generator import Conversation, open_generator
from deltatune.generation.prompts import PromptRecord
from tests.tiny_lm import CHATML, CORPUS, save_tiny_lm

PROMPTS = ["hello world", "the quick brown fox", "I am"]
SAMPLING = Sampling(max_new_tokens=8)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "held_out.jsonl"
    rows = [{"prompt": "the quick brown", "reference": "fox jumps"},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
            {"prompt": "I am", "reference": "fine, thanks!"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path, held_out: Path) -> Path:
    """A short packed LoRA SFT run (messages) on the tiny Llama with generation-based evaluation switched on."""
    folder = tmp_path_factory.mktemp("run")
    train = folder / "train.jsonl"
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    train.write_text("".join(json.dumps(c) + "\n" for c in chats * 6), encoding="utf-8")
    config = {"model": {"path": str(lm_dir)},
              "data": {"train": str(train), "format": "messages", "max_length": 64, "packing": True},
              "delta": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}],
              "train": {"epochs": 3, "batch_size": 4, "optimizer": {"lr": 0.05}},
              "output_dir": str(folder / "run"), "eval_generation": {"file": str(held_out), "max_new_tokens": 8}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "200")
        assert main(["train", str(folder / "config.yaml")]) == 0
    (folder / "train_output.txt").write_text(printed.getvalue(), encoding="utf-8")
    return folder / "run"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate_to_file(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.jsonl"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    assert main(["generate", *args, *prompts, "--max-new-tokens", "8", "--output", str(out)]) == 0
    return read_jsonl(out)


def library_outputs(chat: bool | None = None, **source) -> list[str]:
    generator = open_generator(**source)
    return generator.complete([PromptRecord("t", text=p) for p in PROMPTS], SAMPLING, chat=chat)


def test_train_with_eval_generation_scores_base_and_fine_tuned(run, lm_dir, held_out):
    generation = json.loads((run / "results.json").read_text())["generation"]
    rows = read_jsonl(run / "generations.jsonl")
    references = [r["reference"] for r in rows]
    assert [r.get("prompt") for r in rows] == ["the quick brown", None, "I am"]
    assert references == ["fox jumps", "hello world", "fine, thanks!"]
    assert generation == {"file": str(held_out), "examples": 3, "base": score([r["base"] for r in rows], references),
                          "fine_tuned": score([r["output"] for r in rows], references)}
    printed = (run.parent / "train_output.txt").read_text()
    assert f"3 prompts of {held_out}, greedy; the answers are in generations.jsonl" in printed
    assert f"{generation['fine_tuned']['rougeL']:.4f}" in printed
    # the output is not a terminal: plain progress lines, for training and for the generation afterwards
    assert "step 15/15 (100%)" in printed and "ETA" in printed
    assert "  test       after training (best delta): loss" in printed
    assert "generating (fine-tuned): 3/3 prompts" in printed and "generating (base): 3/3 prompts" in printed
    report = (run / "report.html").read_text()
    assert "Generation (" in report and "Sample answers" in report and html.escape(rows[2]["output"]) in report

    fine_tuned = open_generator(run=run)
    base = open_generator(model=str(lm_dir))
    assert [r["output"] for r in rows] == _complete_held_out(fine_tuned, held_out)
    assert [r["base"] for r in rows] == _complete_held_out(base, held_out)
    assert [r["output"] for r in rows] != [r["base"] for r in rows]  # training changed the answers


def _complete_held_out(generator, held_out: Path) -> list[str]:
    from deltatune.generation.evaluate import reference_records

    return generator.complete(reference_records(held_out), SAMPLING)


def test_eval_generate_reproduces_the_answers_of_training_and_scores_them(run, held_out, capsys, tmp_path):
    out = tmp_path / "answers.jsonl"
    assert main(["eval", str(run), "--generate", str(held_out), "--compare-base", "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    rows = read_jsonl(run / "generations.jsonl")
    assert read_jsonl(out) == rows  # the same answers as at the end of training
    progress = capsys.readouterr().err.splitlines()  # on stderr: stdout may hold the answers
    assert [line.split("  ")[0] for line in progress] == ["generating (base): 3/3 prompts",
                                                          "generating (fine-tuned): 3/3 prompts"]

    # references built from those answers, so that base and fine-tuned get known, different scores
    scored = tmp_path / "scored.jsonl"
    references = [rows[0]["output"], rows[1]["base"] + " and more", "fine, thanks!"]
    scored.write_text(json.dumps({"prompt": rows[0]["prompt"], "reference": references[0]}) + "\n" +
                      json.dumps({"messages": rows[1]["messages"] + [{"role": "assistant", "content": references[1]}]})
                      + "\n" + json.dumps({"prompt": rows[2]["prompt"], "reference": references[2]}) + "\n")
    assert main(["eval", str(run), "--generate", str(scored), "--compare-base", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    tuned, base = score([r["output"] for r in rows], references), score([r["base"] for r in rows], references)
    assert tuned["exact_match"] == pytest.approx(1 / 3) and 0 < base["rougeL"] < 1
    for name in ("exact_match", "rougeL", "bleu"):
        line = next(line for line in printed.splitlines() if line.strip("│ ").startswith(name))
        assert [cell.strip() for cell in line.split("│")[2:4]] == [f"{base[name]:.4f}", f"{tuned[name]:.4f}"]


def test_run_model_plus_delta_and_merged_generate_the_same(run, lm_dir, tmp_path):
    from_run = generate_to_file(tmp_path, "--run", str(run))
    assert [r["output"] for r in from_run] == library_outputs(run=run)
    assert generate_to_file(tmp_path, "--model", str(lm_dir), "--delta", str(run / "best")) == from_run
    assert generate_to_file(tmp_path, "--run", str(run), "--merge") == from_run
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    assert generate_to_file(tmp_path, "--model", str(merged), "--chat") == from_run
    assert (run / "chat_template.jinja").read_text() == (run / "best" / "chat_template.jinja").read_text() == CHATML
    assert open_generator(run=run).use_chat(None, [PromptRecord("t", text="x")])  # an SFT run: chat by default
    assert [r["prompt"] for r in from_run] == PROMPTS


def test_a_run_that_saved_its_chat_template_generates_with_it_by_default(run, tmp_path):
    sft_run = tmp_path / "sft"
    shutil.copytree(run, sft_run)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    for folder in (sft_run, sft_run / "best"):
        (folder / "chat_template.jinja").write_text(template)
    generator = open_generator(run=sft_run)
    record = PromptRecord("t", text="hello world")
    assert generator.prompt_text(record, chat=generator.use_chat(None, [record])) == \
        "[user] hello world\n[assistant] "
    rows = generate_to_file(tmp_path, "--run", str(sft_run))
    assert [r["output"] for r in rows] == generator.complete([PromptRecord("t", text=p) for p in PROMPTS], SAMPLING)
    assert generate_to_file(tmp_path, "--run", str(sft_run), "--no-chat") == \
        generate_to_file(tmp_path, "--run", str(run), "--no-chat")
    assert rows != generate_to_file(tmp_path, "--run", str(sft_run), "--no-chat")

    merged = tmp_path / "merged"
    assert main(["merge", str(sft_run), str(merged)]) == 0
    assert (merged / "chat_template.jinja").read_text() == template
    assert json.loads((merged / "config.json").read_text())["use_cache"] is True  # packing did not turn it off
    assert generate_to_file(tmp_path, "--model", str(merged), "--chat") == rows


def test_a_run_loads_its_base_model_with_the_run_settings(run, tmp_path, monkeypatch):
    """dtype comes from the run's config, as in training; remote code only from the caller's explicit argument."""
    from deltatune.models import load as models

    trusted = tmp_path / "trusted"
    shutil.copytree(run, trusted)
    config = yaml.safe_load((trusted / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (trusted / "config.yaml").write_text(yaml.safe_dump(config))
    seen, original = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: seen.append(kwargs) or original(*args, **kwargs))
    with pytest.raises(ConfigError, match="a config file cannot switch on code from the model folder"):
        open_generator(run=trusted, attach=False)
    open_generator(run=trusted, attach=False, trust_remote_code=True)
    open_generator(run=run, attach=False)
    open_generator(model=config["model"]["path"], attach=False)
    run_settings = {"dtype": "fp32", "compute_dtype": "auto", "quantize": None}
    assert seen == [{**run_settings, "trust_remote_code": True}, {**run_settings, "trust_remote_code": False},
                    {"trust_remote_code": False}]


def test_batch_size_below_one_is_an_error(lm_dir):
    with pytest.raises(ConfigError, match="batch size must be 1 or more, got 0"):
        open_generator(model=str(lm_dir)).complete([PromptRecord("t", text="hi")], SAMPLING, batch_size=0)


def test_template_option_names_a_shipped_template_or_a_file(lm_dir, tmp_path):
    from deltatune.data import TEMPLATES

    alpaca = open_generator(model=str(lm_dir), template="alpaca")
    assert alpaca.template == TEMPLATES["alpaca"]
    prompt = alpaca.prompt_text(PromptRecord("t", text="hi"), chat=True)
    assert prompt.endswith("### Instruction:\nhi\n\n### Response:\n")
    chatml = open_generator(model=str(lm_dir), template="chatml")  # alpaca's preamble leaves no room in 128 tokens
    rows = generate_to_file(tmp_path, "--model", str(lm_dir), "--template", "chatml")  # chat is then on
    assert [r["output"] for r in rows] == chatml.complete([PromptRecord("t", text=p) for p in PROMPTS], SAMPLING)
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(TEMPLATES["chatml"])
    assert generate_to_file(tmp_path, "--model", str(lm_dir), "--template", str(jinja)) == rows
    with pytest.raises(ConfigError, match=r"--template: no such file '.*missing.jinja'"):
        open_generator(model=str(lm_dir), template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match=r"--template: unknown template 'chatlm'; use one of chatml, llama3"):
        open_generator(model=str(lm_dir), template="chatlm")


def test_compare_base_shows_base_and_fine_tuned_side_by_side(run, lm_dir, tmp_path, capsys):
    rows = generate_to_file(tmp_path, "--run", str(run), "--compare-base")
    assert [r["base"] for r in rows] == library_outputs(model=str(lm_dir), chat=True)
    assert [r["output"] for r in rows] == library_outputs(run=run)
    assert [r["base"] for r in rows] != [r["output"] for r in rows]
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "hello world", "--compare-base", "--max-new-tokens",
                 "8"]) == 0
    printed = capsys.readouterr().out
    assert "base model vs fine-tuned" in printed and "hello world" in printed


def test_terminal_output_and_prompt_files(lm_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(lm_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    expected = library_outputs(model=str(lm_dir))
    assert capsys.readouterr().out == strip_control_codes(PROMPTS[0] + expected[0]) + "\n"

    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(lm_dir), "--prompts-file", str(txt), "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    assert read_jsonl(out) == [{"prompt": p, "output": o} for p, o in zip(PROMPTS, expected)]

    chat = tmp_path / "chat.jsonl"
    message = {"role": "user", "content": "hello"}
    chat.write_text(json.dumps({"messages": [message]}) + "\n", encoding="utf-8")
    out = tmp_path / "chat-out.jsonl"  # --output is always a new file
    assert main(["generate", "--model", str(lm_dir), "--prompts-file", str(chat), "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    reply = Conversation(open_generator(model=str(lm_dir)), SAMPLING).reply("hello")
    assert read_jsonl(out) == [{"messages": [message], "output": reply}]


def test_seeded_sampling_from_the_command_line_is_reproducible(lm_dir, tmp_path):
    hot = ["--model", str(lm_dir), "--temperature", "1.2", "--top-k", "50", "--top-p", "0.9"]
    first = generate_to_file(tmp_path, *hot, "--seed", "3")
    assert generate_to_file(tmp_path, *hot, "--seed", "3") == first
    assert generate_to_file(tmp_path, *hot, "--seed", "4") != first


def test_chat_streams_the_same_replies_as_non_streamed_generation(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n/reset\nhello\n/nope\n/exit\nnever read\n"))
    assert main(["chat", "--run", str(run), "--system", "be brief", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out

    conversation = Conversation(open_generator(run=run), SAMPLING, system="be brief")
    first, second = conversation.reply("hello"), conversation.reply("how are you?")
    replies = [line.split("assistant> ", 1)[1] for line in printed.split("\n") if "assistant> " in line]
    assert replies == [strip_control_codes(r) for r in (first, second, first)]
    assert "history cleared" in printed and "unknown command /nope" in printed and "never read" not in printed


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "MODEL"], "nothing to generate: give --prompt TEXT or --prompts-file FILE"),
    (["generate", "--run", "RUN", "--delta", "RUN/best", "--prompt", "x"], "--delta goes with --model"),
    (["generate", "--model", "MODEL", "--merge", "--prompt", "x"], "--merge needs a delta"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--top-p", "2"], "sampling.top_p: Input should be less"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--template", "chatlm"], "unknown template 'chatlm'; use one "
                                                                                "of chatml, llama3, alpaca"),
    (["chat", "--run", "CLASSIFIER"], "is a classification run (data.format: classification); generating text "
                                      "needs a run trained on text or chat data"),
    (["generate", "--model", "MODEL", "--prompts-file", "EMPTY"], "empty.txt: no prompts; write one prompt per line"),
    (["eval", "RUN", "--output", "EMPTY"], "per-example predictions are for classification and regression runs, not "
                                           "'text'; for a text run score generated answers: deltatune eval RUN "
                                           "--generate FILE --output OUT"),
])
def test_errors_are_one_clear_line(run, lm_dir, tmp_path, capsys, args, message):
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = {"train": config["data"]["train"], "format": "classification"}
    (classifier / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "empty.txt").write_text("\n")
    names = {"MODEL": str(lm_dir), "RUN": str(run), "CLASSIFIER": str(classifier), "EMPTY": str(tmp_path / "empty.txt")}
    args = [a.replace(a.split("/")[0], names[a.split("/")[0]]) if a.split("/")[0] in names else a for a in args]
    assert main(args) == 1
    printed = capsys.readouterr().err
    assert message in " ".join(printed.split()) and "Traceback" not in printed


def test_chat_reports_a_too_long_message_and_goes_on(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 400 + "\nhello\n/exit\n"))
    assert main(["chat", "--run", str(run), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "error: the message is too long" in printed
    expected = Conversation(open_generator(run=run), SAMPLING).reply("hello")  # the long message left no trace
    replies = [line.split("assistant> ", 1)[1] for line in printed.split("\n") if "assistant> " in line]
    assert replies[-1] == strip_control_codes(expected) != ""
