"""Prompt files (.txt / .jsonl with prompt or messages), their errors, and chat-template rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.errors import ConfigError, DataError
from deltatune.generation.generator import Generator
from deltatune.generation.prompts import PromptRecord, chat_messages, read_prompts, render_chat, saved_template
from tests.tiny_lm import CHATML, tiny_tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  \nsecond [bold] prompt\n", encoding="utf-8")
    records = read_prompts(path)
    assert [(r.where, r.text) for r in records] == [(f"{path}:1", "first prompt"),
                                                     (f"{path}:4", "second [bold] prompt")]
    assert read_prompts(path, limit=1) == records[:1]


def test_jsonl_prompts_messages_and_references(tmp_path):
    user = {"role": "user", "content": "hi"}
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "complete this"},
        {"prompt": "2+2=", "reference": "4"},
        {"messages": [{"role": "system", "content": "be brief"}, user]},
        {"messages": [user, {"role": "assistant", "content": "hello!"}]},
    ])
    records = read_prompts(path)
    assert records[0] == PromptRecord(f"{path}:1", text="complete this")
    assert records[1].reference == "4"
    assert records[2].messages == ({"role": "system", "content": "be brief"}, user) and records[2].reference is None
    assert records[3].messages == (user,) and records[3].reference == "hello!"
    assert records[3].to_dict() == {"messages": [user], "reference": "hello!"}
    assert records[1].to_dict() == {"prompt": "2+2=", "reference": "4"}


def test_training_formats_sharegpt_and_alpaca_are_read_as_conversations(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "brief"},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
    ])
    sharegpt, alpaca = read_prompts(path)
    assert sharegpt.messages == ({"role": "system", "content": "brief"}, {"role": "user", "content": "hi"})
    assert sharegpt.reference == "hello"
    assert alpaca.messages == ({"role": "user", "content": "Add\n\n2 and 2"},) and alpaca.reference == "4"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "", "output": "4"}])
    with pytest.raises(DataError, match=f"{bad}:1: record has no 'instruction'"):
        read_prompts(bad)


def test_training_format_prompts_need_no_answer(tmp_path):
    """A prompt file in a training format may end with the user's turn: that is what the model answers."""
    turns = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": turns}, {"instruction": "Add", "input": "2 and 2"}])
    sharegpt, alpaca = read_prompts(path)
    assert [m["content"] for m in sharegpt.messages] == ["q1", "a1", "q2"] and sharegpt.reference is None
    assert alpaca.messages == ({"role": "user", "content": "Add\n\n2 and 2"},) and alpaca.reference is None


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "ok"}, {"text": "no prompt"}], ":2: record needs a non-empty 'prompt' text or a 'messages' list "
                                                "(has: text)"),
    ([{"prompt": "   "}], ":1: record needs a non-empty 'prompt'"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], ":1: message 0 must have a role (system, user, assistant)"),
    ([{"messages": [{"role": "assistant", "content": "x"}]}], ":1: 'messages' holds only the assistant's answer"),
    ([{"prompt": "a", "reference": 4}], ":1: 'reference' must be text, got 4"),
])
def test_bad_records_name_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_prompts(path)
    assert f"{path}{message}" in str(err.value)


def test_empty_prompt_files(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{blank}: no prompts; write one prompt per line"):
        read_prompts(blank)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=f"{empty}: no records"):
        read_prompts(empty)
    with pytest.raises(DataError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_chat_rendering_with_system_prompt():
    tokenizer = tiny_tokenizer()
    record = PromptRecord("x", text="hi there")
    assert render_chat(tokenizer, chat_messages(record, system="be brief"), CHATML) == \
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    own = PromptRecord("x", messages=({"role": "system", "content": "mine"}, {"role": "user", "content": "q"}))
    assert chat_messages(own, system="ignored")[0]["content"] == "mine"


def test_saved_template_wins_over_the_tokenizer_and_a_missing_one_is_an_error(tmp_path):
    tokenizer = tiny_tokenizer()
    (tmp_path / "run" / "best").mkdir(parents=True)
    assert saved_template(tmp_path / "run" / "best", tmp_path / "run") is None
    (tmp_path / "run" / "chat_template.jinja").write_text("{{ messages[-1]['content'] }} =>", encoding="utf-8")
    saved = saved_template(tmp_path / "run" / "best", tmp_path / "run")
    record = PromptRecord("x", text="2+2")
    assert Generator(None, tokenizer, template=saved).prompt_text(record, chat=True) == "2+2 =>"
    assert Generator(None, tokenizer).prompt_text(record, chat=True).startswith("<|im_start|>user\n2+2")
    assert Generator(None, tokenizer).prompt_text(record, chat=False) == "2+2"

    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has no chat template and none was saved with the run"):
        Generator(None, tokenizer).prompt_text(record, chat=True)


def test_chat_mode_defaults(tmp_path):
    plain, chat = PromptRecord("f:1", text="x"), PromptRecord("f:2", messages=({"role": "user", "content": "x"},))
    base, sft = Generator(None, tiny_tokenizer()), Generator(None, tiny_tokenizer(), template=CHATML)
    assert base.use_chat(None, [plain]) is False and sft.use_chat(None, [plain]) is True
    assert base.use_chat(None, [plain, chat]) is True and sft.use_chat(False, [plain]) is False
    with pytest.raises(ConfigError, match="f:2: 'messages' records need the chat template; drop --no-chat"):
        base.use_chat(False, [plain, chat])
