"""A tiny causal LM saved like a Hugging Face model folder: random 2-layer Llama plus a small byte-level BPE
tokenizer with a ChatML chat template (trained in milliseconds with `tokenizers`), and as a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog.", "hello world, how are you today?",
          "I am fine, thanks! And you?\nWhat is your name?", "user assistant system: a question and an answer."]
HEADS, KV_HEADS = 4, 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text round-trips), eos = <|im_end|>, pad = <|endoftext|>, ChatML chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Llama and its tokenizer into `folder` (a model folder `load_model` reads)."""
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_gguf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Save a Llama and its byte-level BPE tokenizer as a float32 GGUF file, laid out as llama.cpp does."""
    from deltatune.interop.llamacpp import write_gguf as write

    return write(model, tokenizer, path, dtype="fp32", name="tiny")
