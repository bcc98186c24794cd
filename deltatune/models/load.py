"""Load a pretrained base model and its tokenizer from a local folder or a packaged alias."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from deltatune.arch import describe
from deltatune.models.assets import resolve_model_path
from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError
from deltatune.models.precision import DTYPES, compute_in, hold_in_bf16, resolve_base_precision, stored_fp32_bytes
from deltatune.models.quantize import CheckpointPages, Quantize, convert_loaded, give_back_free_memory, quantize_base
from deltatune.safety import check_model_folder

TASKS = {"classification": AutoModelForSequenceClassification, "regression": AutoModelForSequenceClassification,
         "causal_lm": AutoModelForCausalLM, "base": AutoModel}
# Without any of these, AutoTokenizer quietly builds an empty tokenizer that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
UNLIMITED = 1_000_000  # tokenizers without a known maximum report a huge model_max_length
# what a broken config.json or weights file makes transformers raise (besides OSError / ValueError)
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError)


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model folder (or packaged alias), resolved and checked once (`model_folder`); its config is
    read once, when first asked for. Code from the folder runs only with `trust_remote_code`."""

    folder: Path
    trust_remote_code: bool = False

    @classmethod
    def open(cls, path: str, *, trust_remote_code: bool = False) -> Pretrained:
        return cls(model_folder(path, trust_remote_code), trust_remote_code)

    @cached_property
    def config(self) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code)
        except LOAD_ERRORS as e:
            raise CheckpointError(f"cannot read the model config in {str(self.folder)!r}: {e}") from None

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model is an encoder-decoder (its config says so)."""
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def num_labels(self) -> int:
        """The size of the classification head saved with the model (its config's num_labels; 2 when it has none)."""
        return self.config.num_labels

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _load_tokenizer(self.folder, self.trust_remote_code)

    def max_length(self, tokenizer: PreTrainedTokenizerBase) -> int | None:
        """The longest sequence the model takes: its position embeddings or the tokenizer's limit (the smaller)."""
        limits = [getattr(self.config, "max_position_embeddings", None), tokenizer.model_max_length]
        known = [n for n in limits if isinstance(n, int) and 0 < n < UNLIMITED]
        return min(known) if known else None

    def load(self, task: str, num_labels: int | None = None, *, dtype: str = "float32", compute_dtype: str = "auto",
             quantize: Quantize | None = None, id2label: dict[int, str] | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """`(model, tokenizer)` as `load_model` describes; `tokenizer`: the folder's tokenizer, already loaded."""
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
        for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
            if value not in DTYPES and value != "auto":
                raise ConfigError(f"unknown {name} {value!r}; allowed: auto, {', '.join(DTYPES)}")
        storage, compute = resolve_base_precision(dtype, compute_dtype, trained_by=None,
                                                  fp32_bytes=lambda: stored_fp32_bytes(self.folder))
        # the weights as stored (memory-mapped, no copy), then quantized / converted one tensor at a time
        head = _head_kwargs(task, num_labels, id2label)
        kwargs = {"dtype": "auto", **head}
        auto = TASKS[task]
        if task == "causal_lm" and self.is_encoder_decoder:
            auto = AutoModelForSeq2SeqLM  # text generation by an encoder-decoder (T5, BART): prompt in, response out
        # a task head of another size than the saved one is re-initialised; mismatches elsewhere are errors
        model, info = load_weights(auto, self.folder, self.trust_remote_code, f" for task {task!r}",
                                   output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        tokenizer = tokenizer or self.tokenizer()
        model.deltatune_new_weights = _new_weights(model, info, self.folder)
        _check_tokenizer_fits(model, tokenizer, self.folder)
        reduced = _reduction(quantize, storage, compute)
        if quantize:  # before anything reads all weights: the pages of the checkpoint leave RSS layer by layer
            quantize_base(model, quantize, compute)
        elif reduced:
            hold_in_bf16(model)
        else:
            _convert_stored(model, storage)
        give_back_free_memory()
        if task == "causal_lm" and auto is not AutoModelForSeq2SeqLM:  # an encoder-decoder's decoder is causal
            _check_causal(model, self.folder, reduced)
            give_back_free_memory()
        compute_in(model, compute)
        if compute_dtype == "fp32":  # asked for: no bf16 anywhere, the loop's train.precision: auto included
            model.deltatune_compute_dtype = torch.float32
        _ensure_pad_token(model, tokenizer)
        return model, tokenizer


def load_model(path: str, task: str, num_labels: int | None = None, *, dtype: str = "float32",
               compute_dtype: str = "auto", quantize: Quantize | None = None, trust_remote_code: bool = False,
               id2label: dict[int, str] | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` for `task`; the tokenizer always gets a pad token when it has eos or unk.

    The weights are read from the memory-mapped safetensors files and converted to `dtype` one tensor at a time (no
    full copy in another dtype, no resident checkpoint pages beyond the tensor being converted). A bf16 model
    computes in `compute_dtype` (auto: bf16 where the CPU multiplies bf16 natively, else fp32; precision.py): bf16
    under autocast (precision.compute_in), fp32 from bf16-held Linear weights (precision.hold_in_bf16); `quantize`
    makes its linear layers (task heads excepted) weight-only int8 / int4 (quantize.py).
    `model.deltatune_new_weights` lists the parameters that were freshly initialised (e.g. a new task head).
    """
    return Pretrained.open(path, trust_remote_code=trust_remote_code).load(
        task, num_labels, dtype=dtype, compute_dtype=compute_dtype, quantize=quantize, id2label=id2label)


def _convert_stored(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The weights loaded as stored in `dtype` (convert_loaded: tensor by tensor, releasing the checkpoint's pages),
    as `from_pretrained(dtype=...)` would give them, whose conversion keeps every page of the checkpoint resident
    until the end (a bf16 1B loaded as fp32 peaked at 1.5x its fp32 weights). Modules the model class keeps in
    fp32 for 16-bit dtypes (`_keep_in_fp32_modules_strict`) stay fp32."""
    patterns = (getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype.itemsize < 4 else ()
    kept = re.compile("|".join(p.replace("*", ".*") for p in patterns) or "(?!)")  # (?!): matches nothing
    state = model.state_dict(keep_vars=True)
    convert_loaded(model, dtype, CheckpointPages(), keep=[t for name, t in state.items() if kept.search(name)])
    model.config.dtype = dtype


def _head_kwargs(task: str, num_labels: int | None, id2label: dict[int, str] | None) -> dict[str, Any]:
    """from_pretrained's config overrides for the task head of `task`."""
    if task == "regression":
        return {"num_labels": num_labels or 1, "problem_type": "regression"}
    if task != "classification":
        return {}
    kwargs: dict[str, Any] = {}
    if id2label is not None:
        if num_labels is not None and num_labels != len(id2label):
            raise ConfigError(f"num_labels={num_labels} but id2label has {len(id2label)} labels")
        num_labels = len(id2label)
        kwargs |= {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    if num_labels is None:
        raise ConfigError("task 'classification' needs num_labels or id2label")
    return kwargs | {"num_labels": num_labels}


def load_weights(model_class: Any, folder: Path, trust_remote_code: bool = False, purpose: str = "",
                 **kwargs: Any) -> Any:
    """`model_class.from_pretrained(folder)` for a folder `model_folder` checked: safetensors only (a pickle is
    never opened), remote code only if allowed, transformers' errors as one DeltaTuneError."""
    try:
        return model_class.from_pretrained(folder, use_safetensors=True, trust_remote_code=trust_remote_code,
                                           **kwargs)
    except LOAD_ERRORS as e:
        raise DeltaTuneError(f"cannot load model from {str(folder)!r}{purpose}: {e}") from e


def model_folder(path: str, trust_remote_code: bool = False, *, config: bool = True) -> Path:
    """The folder of model `path` (or packaged alias), its config.json checked: a JSON object whose model_type
    transformers knows (custom types need remote code, which the command line must allow). With `config=False`
    (a tokenizer folder) config.json may be absent. Folders that would run or fetch code (unless
    `trust_remote_code`), hold only pickled weights, or are otherwise hostile are refused (safety.py)."""
    folder = resolve_model_path(path)
    file = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"model path {str(folder)!r} is a file: give the folder that holds config.json and the "
                              "weights (a Hugging Face save_pretrained folder) or a packaged alias")
    check_model_folder(folder, trust_remote_code=trust_remote_code)
    if not config and not file.exists():
        return folder
    if not file.is_file():
        raise CheckpointError(f"cannot load model from {str(folder)!r}: expected a folder with config.json "
                              "(a Hugging Face save_pretrained folder) or a packaged alias")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a JSON {type(config).__name__}, not a model config (a JSON object with "
                              "model_type, hidden_size, ...); restore the model's config.json")
    model_type = config.get("model_type")
    if not (model_type in CONFIG_MAPPING or (trust_remote_code and "auto_map" in config)):
        raise CheckpointError(f"{file}: unknown model_type {model_type!r}: transformers {transformers.__version__} "
                              "knows no such architecture (e.g. bert, gpt2, llama, qwen2); fix model_type or "
                              "upgrade transformers")
    return folder


def _new_weights(model: torch.nn.Module, info: dict[str, Any], folder: Path) -> list[str]:
    """The parameters the folder's weights did not provide (freshly initialised, e.g. a new task head).

    A task head may be new; elsewhere a weight of another shape, or more than half the body's parameters
    missing, is a CheckpointError (the weights belong to another model); a few missing ones are a warning."""
    heads = describe(model).heads

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    if body := [m for m in info["mismatched_keys"] if not in_head(m[0])]:
        name, saved, wanted = body[0]
        raise CheckpointError(f"the weights in {str(folder)!r} do not fit its config.json: {name} is "
                              f"{list(saved)} in the files but {list(wanted)} in the model ({len(body)} such); "
                              "use the config.json saved with these weights")
    new = sorted(set(info["missing_keys"]) | {m[0] for m in info["mismatched_keys"]})
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    missing = [k for k in new if k in sizes and not in_head(k)]
    body_size = sum(n for k, n in sizes.items() if not in_head(k))
    if body_size and sum(sizes[k] for k in missing) > body_size / 2:
        unexpected = sorted(info["unexpected_keys"])
        raise CheckpointError(
            f"the weights in {str(folder)!r} do not belong to {type(model).__name__}: {len(missing)} of its "
            f"parameters are not in the files (e.g. {', '.join(missing[:2])})"
            + (f", which hold others (e.g. {', '.join(unexpected[:2])})" if unexpected else "")
            + "; the model would be mostly random. Check that config.json belongs to these weights")
    if missing:
        warnings.warn(f"{len(missing)} parameters of {type(model).__name__} are not in {str(folder)!r} and start "
                      f"random: {', '.join(missing[:5])}", stacklevel=3)
    return new


def _check_tokenizer_fits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    if len(tokenizer) > (rows := model.get_input_embeddings().num_embeddings):
        raise CheckpointError(f"the tokenizer in {str(folder)!r} has {len(tokenizer)} tokens but the model's "
                              f"embeddings only {rows}: they do not belong together (token ids past {rows - 1} "
                              "would crash the model); save the model's own tokenizer next to it")


def _check_causal(model: torch.nn.Module, folder: Path, reduced: str | None = None) -> None:
    """ConfigError unless the model predicts each token from the ones before it only: an encoder (BERT-like) with
    a language-model head sees the whole input, so next-token training would teach it to copy the future. With
    `reduced` (the setting that quantized or bf16-held its layers), also a ConfigError when the probe fails inside
    torch: the model's own code uses a layer's weight as a tensor (Mamba's mixer multiplies `dt_proj.weight`)."""
    ids = torch.tensor([[1, 2], [1, 3]]) % model.get_input_embeddings().num_embeddings
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
    except (RuntimeError, NotImplementedError) as error:
        if reduced:
            message = (str(error).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"{reduced}: {type(model).__name__} does not run with its linear layers held that way "
                              f"({type(error).__name__}: {message}); its code uses a layer's weight itself. Load "
                              "it with model.dtype: fp32 and without model.quantize") from None
        return
    except Exception:  # a model that needs other inputs: no probe possible, transformers' own checks apply
        return
    if (logits[0, 0] - logits[1, 0]).abs().max() > 1e-3 * logits[0, 0].abs().max():
        raise ConfigError(f"{str(folder)!r} holds an encoder ({model.config.model_type}): its prediction for a token "
                          f"depends on the tokens after it, so causal language-model formats (text, alpaca, sharegpt, messages) would train it to read the answer "
                          "from the future. Use a decoder model (GPT-2, Llama, SmolLM2, ...), or format "
                          "classification / regression with this encoder")


def _reduction(quantize: str | None, storage: torch.dtype, compute: torch.dtype) -> str | None:
    """The setting that replaced the model's linear layers at load (quantized, or held in bf16 for fp32 compute)."""
    if quantize:
        return f"model.quantize: {quantize}"
    if storage == torch.bfloat16 and compute == torch.float32:
        return "model.dtype: bf16 with model.compute_dtype: fp32"
    return None


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model folder (or packaged alias), given a pad token if it has none."""
    return _load_tokenizer(model_folder(path, trust_remote_code, config=False), trust_remote_code)


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DeltaTuneError(f"no tokenizer in {str(folder)!r} (none of {', '.join(TOKENIZER_FILES)}); save it next "
                             "to the model with tokenizer.save_pretrained(folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers raises plain Exception for a damaged tokenizer.json
        raise CheckpointError(f"cannot load a tokenizer from {str(folder)!r} ({type(e).__name__}: {e}); its "
                              "tokenizer files are damaged: save the tokenizer again with "
                              "tokenizer.save_pretrained(folder)") from None
    if tokenizer.pad_token is None:  # padded positions are masked out, so any special token can pad
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    if tokenizer.pad_token is None:
        raise DeltaTuneError(f"the tokenizer in {str(folder)!r} has no pad, eos, unk or bos token to pad batches "
                             "with; add one (tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it")
    return tokenizer


def _ensure_pad_token(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tell the model the tokenizer's pad id: sequence classification on Llama/GPT-2 needs it."""
    if tokenizer.pad_token_id is None:
        return
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
