"""Load a pretrained base model and its tokenizer from a local folder or a packaged alias."""

from __future__ import annotations

from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from deltatune.assets import resolve_model_path
from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.precision import DTYPES, compute_in
from deltatune.quantize import Quantize, quantize_base

TASKS = {"classification": AutoModelForSequenceClassification, "regression": AutoModelForSequenceClassification,
         "causal_lm": AutoModelForCausalLM, "base": AutoModel}
# Without any of these, AutoTokenizer quietly builds an empty tokenizer that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
UNLIMITED = 1_000_000  # tokenizers without a known maximum report a huge model_max_length


def load_model(path: str, task: str, num_labels: int | None = None, *, dtype: str = "float32",
               quantize: Quantize | None = None, trust_remote_code: bool = False,
               id2label: dict[int, str] | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` for `task`; the tokenizer always gets a pad token when it has eos or unk.

    The weights are read from the memory-mapped safetensors files straight into `dtype` (no full fp32 copy); a
    reduced-precision model computes under autocast (precision.compute_in); `quantize` makes its Linear layers
    (the output head excepted) weight-only int8 / int4 (quantize.py).
    `model.deltatune_new_weights` lists the parameters that were freshly initialised (e.g. a new task head).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    folder = resolve_model_path(path)
    if not (folder / "config.json").is_file():
        raise DeltaTuneError(f"cannot load model from {str(folder)!r}: expected a folder with config.json "
                             "(a Hugging Face save_pretrained folder) or a packaged alias")

    # quantized: read the weights as stored (memory-mapped, no copy), quantize / convert them layer by layer
    kwargs: dict[str, Any] = {"dtype": "auto" if quantize else DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if task == "classification":
        if id2label is not None:
            if num_labels is not None and num_labels != len(id2label):
                raise ConfigError(f"num_labels={num_labels} but id2label has {len(id2label)} labels")
            num_labels = len(id2label)
            kwargs |= {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
        if num_labels is None:
            raise ConfigError("task 'classification' needs num_labels or id2label")
        kwargs["num_labels"] = num_labels
    elif task == "regression":
        kwargs |= {"num_labels": num_labels or 1, "problem_type": "regression"}

    try:
        model, info = TASKS[task].from_pretrained(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise DeltaTuneError(f"cannot load model from {str(folder)!r} for task {task!r}: {e}") from e
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model.deltatune_new_weights = sorted(set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]})
    if quantize:
        quantize_base(model, quantize, DTYPES[dtype])
    compute_in(model, DTYPES[dtype])
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def saved_num_labels(path: str, *, trust_remote_code: bool = False) -> int:
    """The size of the classification head saved with a model (its config's num_labels; 2 when it has none)."""
    return AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code).num_labels


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model folder (or packaged alias), given a pad token if it has none."""
    folder = resolve_model_path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DeltaTuneError(f"no tokenizer in {str(folder)!r} (none of {', '.join(TOKENIZER_FILES)}); save it next "
                             "to the model with tokenizer.save_pretrained(folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DeltaTuneError(f"cannot load a tokenizer from {str(folder)!r}: {e}") from e
    if tokenizer.pad_token is None:  # padded positions are masked out, so any special token can pad
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    if tokenizer.pad_token is None:
        raise DeltaTuneError(f"the tokenizer in {str(folder)!r} has no pad, eos, unk or bos token to pad batches "
                             "with; add one (tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it")
    return tokenizer


def model_max_length(path: str, tokenizer: PreTrainedTokenizerBase, *, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model takes: its position embeddings or the tokenizer's limit (the smaller)."""
    config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    known = [n for n in limits if isinstance(n, int) and 0 < n < UNLIMITED]
    return min(known) if known else None


def _ensure_pad_token(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tell the model the tokenizer's pad id: sequence classification on Llama/GPT-2 needs it."""
    if tokenizer.pad_token_id is None:
        return
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
