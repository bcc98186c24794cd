"""Models and data shared by the benchmarks: every case is built the same way for deltatune and the reference.

Data sets are lists of tokenized examples {"input_ids", "labels"} (labels -100 where no loss is taken):
  chat      the packaged chatterbot Q&A corpus in deltatune's `messages` format (SmolLM2's chat template; loss on
            the assistant turns only): the same tokens for both sides
  longtail  spans of the packaged rotten-tomatoes reviews (one token stream) with long-tailed lengths
            (log-normal, median 48 tokens, clipped to [8, max_length]); loss on every token
  fixed     the same stream cut into rows of exactly max_length tokens
Models: the packaged SmolLM2-135M, and Llama configs with random weights (seeded) and SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
import os
import random
from functools import cache
from pathlib import Path
from typing import Any

import torch

Example = dict[str, list[int]]
LLAMA_SIZES = {  # name: (hidden, layers, intermediate, heads)
    "llama-xs": (256, 4, 768, 4),
    "llama-small": (512, 8, 1536, 8),
    "llama-medium": (768, 12, 2048, 12),
}
MODELS = ("smollm2", *LLAMA_SIZES)
DATASETS = ("chat", "longtail", "fixed")


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder; workers get it from the orchestrator ($BENCH_SMOLLM2_DIR), so that the
    reference side never imports deltatune."""
    if folder := os.environ.get("BENCH_SMOLLM2_DIR"):
        return Path(folder)
    from deltatune.models.assets import resolve_model_path

    return resolve_model_path("smollm2-135m")


@cache
def tokenizer() -> Any:
    """SmolLM2's tokenizer (its pad token is <|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def build_model(name: str) -> torch.nn.Module:
    """A causal LM in fp32: the packaged SmolLM2-135M or a seeded random Llama of LLAMA_SIZES."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    hidden, layers, inter, heads = LLAMA_SIZES[name]
    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(1234)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_data(name: str, max_length: int, n_train: int, n_heldout: int = 64,
               seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of data set `name`; chat: held-out conversations are not trained on, and
    training conversations repeat if `n_train` exceeds the ~1,960 left."""
    rng = random.Random(seed)
    if name == "chat":
        rows = chat_examples(max_length)
        order = rng.sample(range(len(rows)), len(rows))
        rest = order[n_heldout:]
        return [rows[rest[i % len(rest)]] for i in range(n_train)], [rows[i] for i in order[:n_heldout]]
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    spans = [_span(name, max_length, rng) for _ in range(n_train + n_heldout)]
    return spans[:n_train], spans[n_train:]


def _span(name: str, max_length: int, rng: random.Random) -> Example:
    """A random span of the review stream: max_length tokens ("fixed") or a long-tailed length ("longtail")."""
    stream = text_stream()
    length = max_length if name == "fixed" else min(max_length, max(8, round(rng.lognormvariate(3.87, 0.9))))
    start = rng.randrange(len(stream) - length)
    ids = stream[start:start + length]
    return {"input_ids": ids, "labels": list(ids)}


@cache
def text_stream() -> list[int]:
    """The packaged rotten-tomatoes reviews as one token stream (reviews joined by newlines)."""
    from deltatune.models.assets import resolve_data_path

    path = resolve_data_path("rotten_tomatoes")
    texts = [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return tokenizer()("\n".join(texts), verbose=False)["input_ids"]


@cache
def chat_examples(max_length: int) -> list[Example]:
    """Chatterbot conversations through deltatune's `messages` format: the tokenizer's chat template, labels only
    on the assistant turns (examples without a target token within max_length are dropped by deltatune)."""
    from deltatune.data import DataConfig, prepare_data

    cfg = DataConfig(train="chatterbot", format="messages", max_length=max_length, split=(1.0, 0.0, 0.0))
    train = prepare_data(cfg, tokenizer()).train
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(train["input_ids"], train["labels"])]


# ---- the size ladder: seeded random Llama configs written to disk like a hub checkpoint (bf16 safetensors) ------
LADDER = {  # name: (hidden, layers, intermediate, heads, kv heads, vocab); shapes of public models, random weights
    "0.5b": (1536, 16, 4096, 12, 4, 49152),
    "1b": (2048, 18, 5632, 16, 4, 49152),  # TinyLlama-like widths, SmolLM2's vocabulary
    "3b": (3072, 28, 8192, 24, 8, 49152),  # Llama-3.2-3B widths
    "8b": (4096, 32, 14336, 32, 8, 128256),  # Llama-3-8B shapes
}
SHARD_BYTES = 1 << 30


def ladder_config(name: str, dtype: str = "bfloat16") -> Any:
    from transformers import LlamaConfig

    hidden, layers, inter, heads, kv, vocab = LADDER[name]
    tok = tokenizer()
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, dtype=dtype)


def write_random_llama(name: str, folder: Path, seed: int = 1234, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a seeded random Llama of LADDER (normal(0, 0.02) weights, unit norms) in `dtype` (bf16 | fp32)
    safetensors shards plus SmolLM2's tokenizer, one tensor at a time: writing it never holds the whole model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = ladder_config(name, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weight_map, current, size, last = {}, {}, 0, list(shapes)[-1]
    for key, shape in shapes.items():
        tensor = (torch.ones(shape) if key.endswith("norm.weight") else
                  torch.randn(shape, generator=generator) * 0.02).to(dtype)
        current[key], size = tensor, size + tensor.nbytes
        if size >= SHARD_BYTES or key == last:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(current, folder / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(current, file)
            current, size = {}, 0
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
