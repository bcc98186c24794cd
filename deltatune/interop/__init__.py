"""Interoperability: a run's delta as a Hugging Face PEFT adapter (peft.py), merged into a standalone
transformers model (hf.py), or as llama.cpp GGUF files: the merged model or a GGUF LoRA adapter (llamacpp.py).
`export` is what `deltatune export` runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.delta import DeltaBase, load, read_delta_config
from deltatune.errors import CheckpointError, ConfigError
from deltatune.storage import check_new_folder

FORMATS = ("peft", "hf", "gguf", "gguf-lora")
MERGED = ("hf", "gguf")  # formats that merge the delta into the base weights
DTYPES = ("fp32", "bf16", "fp16", "q8_0")


@dataclass
class Source:
    """A base model with a trained delta attached, its tokenizer (None if the model folder has none), and the
    base's portable name (a hub id or the folder's name, see assets.portable_model_name)."""

    model: torch.nn.Module
    delta: DeltaBase
    tokenizer: Any
    name: str


def open_source(path: str | Path, model_path: str | None = None, *, trust_remote_code: bool = False,
                merge: bool = False) -> Source:
    """A run folder (its config and best/ delta), or a saved delta folder on `model_path` (default: the folder
    the delta was trained from, as recorded in its delta.json). Code from the model folder runs only with
    `trust_remote_code` (never because a file asks for it). `merge`: the delta is going to be merged, so a run
    that quantized its base (model.quantize) gets the checkpoint's own weights instead of the int8/int4 copy."""
    from deltatune.generation.prompts import saved_template
    from deltatune.models.assets import portable_model_name
    from deltatune.runs.folder import CONFIG_NAME
    from deltatune.runs.run import Run
    from deltatune.runs.session import run_session

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        if model_path is not None:
            raise ConfigError("--model goes with a delta folder; a run folder names its model in config.yaml")
        run = Run.open(path, trust_remote_code=trust_remote_code)
        session = run_session(run, dense=merge)
        return Source(session.model, session.delta, _with_template(session.tokenizer, run.template),
                      portable_model_name(run.config.model.path))
    base = read_delta_config(path)["base"]
    model_path = model_path or base["name_or_path"]
    if not Path(model_path).is_dir():
        raise ConfigError(f"{path} is a delta folder whose base model {model_path!r} is not a folder here: "
                          "pass the base model folder with --model")
    model, tokenizer = _load_base(model_path, base["class"], trust_remote_code)
    return Source(model, load(model, path), _with_template(tokenizer, saved_template(path)),
                  portable_model_name(model_path))


def _with_template(tokenizer: Any, template: str | None) -> Any:
    """The tokenizer with the chat template the run trained with (saved next to the delta), if any."""
    if tokenizer is not None:
        tokenizer.chat_template = template or tokenizer.chat_template
    return tokenizer


def _load_base(folder: str, class_name: str, trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    import transformers

    from deltatune.errors import DeltaTuneError
    from deltatune.models.load import Pretrained, load_weights

    model_class = getattr(transformers, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise CheckpointError(f"the delta was trained on a {class_name!r}, which is not a transformers model class")
    base = Pretrained.open(folder, trust_remote_code=trust_remote_code)
    model = load_weights(model_class, base.folder, trust_remote_code).eval()
    try:
        tokenizer = base.tokenizer()
    except DeltaTuneError:
        tokenizer = None
    return model, tokenizer


def export(source: str | Path, out: str | Path, format: str, *, model_path: str | None = None,
           dtype: str | None = None, base_name: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write the delta of `source` (run or delta folder) to `out`: a PEFT adapter folder ("peft"), a merged model
    folder ("hf"), a merged llama.cpp model file ("gguf") or a llama.cpp LoRA adapter file ("gguf-lora").

    `dtype` (fp32, bf16, fp16; q8_0 for GGUF files) is the weights' type; default: the base's dtype (hf), fp16 or
    bf16 (gguf), fp32 (gguf-lora). `base_name` is the base model's name written into adapters (default: its
    portable name). `trust_remote_code` as in `open_source`."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    _check_dtype(format, dtype)
    if format.startswith("gguf"):  # before the slow part
        from deltatune.interop.llamacpp import check_new_file

        check_new_file(out)
    else:
        check_new_folder(Path(out))
    src = open_source(source, model_path, trust_remote_code=trust_remote_code, merge=format in MERGED)
    name = base_name or src.name
    if format == "peft":
        from deltatune.interop.peft import export_peft

        return export_peft(src.delta, out, base_name=name, tokenizer=src.tokenizer)
    if format == "hf":
        from deltatune.interop.hf import export_merged

        return export_merged(src.delta, src.tokenizer, out, dtype=dtype)
    from deltatune.interop import llamacpp

    if format == "gguf":
        return llamacpp.export_gguf(src.delta, src.tokenizer, out, dtype=dtype, name=name)
    return llamacpp.export_gguf_lora(src.delta, out, dtype=dtype or "fp32", name=name)


def _check_dtype(format: str, dtype: str | None) -> None:
    if dtype is None:
        return
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if format == "peft":
        raise ConfigError("--dtype does not apply to --format peft (the adapter keeps the trained tensors)")
    if dtype == "q8_0" and format == "hf":
        raise ConfigError("--dtype q8_0 is a GGUF quantization: use it with --format gguf (or gguf-lora); "
                          "--format hf takes fp32, bf16 or fp16")
