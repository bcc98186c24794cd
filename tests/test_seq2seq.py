"""Encoder-decoder models (T5, BART) for SFT: prompt -> encoder, response -> decoder with the labels, via the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from deltatune.cli import main
from deltatune.data import Collator
from deltatune.generation.sampling import Sampling
from deltatune.generation.generator import Conversation, open_generator
from deltatune.generation.prompts import PromptRecord
from tests.tiny import VOCAB, tiny_chat_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIGS = {
    "t5": T.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, pad_token_id=1,
                     eos_token_id=3, decoder_start_token_id=1),
    "bart": T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                         max_position_embeddings=128, pad_token_id=1, bos_token_id=3, eos_token_id=3,
                         decoder_start_token_id=3, forced_eos_token_id=None),
}


def test_collator_puts_the_prompt_in_the_encoder_and_the_response_in_the_decoder():
    examples = [{"input_ids": [10, 11, 12, 20, 21], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 20, 21]},
                {"input_ids": [13, 22, 23, 24], "attention_mask": [1] * 4, "labels": [-100, 22, 23, 24]}]
    batch = Collator(0, decoder_start=5)(examples)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["decoder_input_ids"].tolist() == [[5, 20, 21, 0], [5, 22, 23, 24]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # the loop scores logits[:, :-1] against labels[:, 1:]: position j predicts the response's token j
    assert batch["labels"].tolist() == [[-100, 20, 21, -100], [-100, 22, 23, 24]]


def write_run_inputs(folder: Path, arch: str, **data) -> Path:
    """A tiny `arch` model folder with a character tokenizer, 8 alpaca records, and a config to learn them by heart."""
    tiny_chat_tokenizer(CHATML).save_pretrained(folder / "model")
    torch.manual_seed(0)
    T.AutoModelForSeq2SeqLM.from_config(CONFIGS[arch]).save_pretrained(folder / "model")
    records = [{"instruction": f"add {i} and {i + 1}", "input": "", "output": f"it is {2 * i + 1}"} for i in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"model": {"path": str(folder / "model")},
              "data": {"train": str(folder / "data.jsonl"), "validation": str(folder / "data.jsonl"),
                       "format": "alpaca", "max_length": 64, "split": [1.0, 0.0, 0.0], **data},
              "delta": [{"method": "full"}],
              "train": {"epochs": 30, "batch_size": 4, "log_every": 50, "optimizer": {"lr": 1.0e-2}},
              "output_dir": str(folder / "run")}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_train_and_generate_with_an_encoder_decoder_through_the_cli(arch, tmp_path):
    assert main(["train", str(write_run_inputs(tmp_path, arch))]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best_validation"]["loss"] < 0.5 * results["baseline"]["validation"]["loss"]
    generator = open_generator(run=tmp_path / "run")
    assert generator.model.config.is_encoder_decoder
    prompts = [PromptRecord(where="test", text=f"add {i} and {i + 1}") for i in (3, 6)]
    answers = generator.complete(prompts, Sampling(max_new_tokens=12))
    assert all(re.fullmatch(r"it is \d+", answer) for answer in answers), answers  # the responses' form, learnt
    chat = Conversation(generator, Sampling(max_new_tokens=12))
    replies = [chat.reply("add 3 and 4"), chat.reply("add 6 and 7")]  # the second turn sees the first
    assert all(re.fullmatch(r"it is \d+", reply) for reply in replies), replies


@pytest.mark.parametrize("data, message", [
    ({"format": "text", "text_column": "output"}, "data.format: text has no prompt/response split"),
    ({"packing": True}, "data.packing: packed rows are for decoder-only models"),
    ({"train_on_prompt": True}, "data.train_on_prompt: an encoder-decoder reads the prompt with its encoder"),
])
def test_encoder_decoder_refuses_data_without_a_prompt_or_packed(data, message, tmp_path, capsys):
    assert main(["train", str(write_run_inputs(tmp_path, "t5", **data))]) == 1
    assert message in " ".join(capsys.readouterr().err.split())
