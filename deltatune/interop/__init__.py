"""Interoperability: a run's delta as a Hugging Face PEFT adapter (peft.py), or merged into a standalone
transformers model (hf.py). `export` is what `deltatune export` runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.delta import DeltaBase, load, read_delta_config
from deltatune.errors import CheckpointError, ConfigError
from deltatune.io import check_new_folder

FORMATS = ("peft", "hf")


@dataclass
class Source:
    """A base model with a trained delta attached, and its tokenizer (None if the model folder has none)."""

    model: torch.nn.Module
    delta: DeltaBase
    tokenizer: Any


def open_source(path: str | Path, model_path: str | None = None, *, trust_remote_code: bool = False) -> Source:
    """A run folder (its config and best/ delta), or a saved delta folder on `model_path` (default: the folder
    the delta was trained from, as recorded in its delta.json). Code from the model folder runs only with
    `trust_remote_code` (never because a file asks for it)."""
    from deltatune.run import CONFIG_NAME, load_run

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        if model_path is not None:
            raise ConfigError("--model goes with a delta folder; a run folder names its model in config.yaml")
        session = load_run(path, trust_remote_code=trust_remote_code)
        return Source(session.model, session.delta, _with_template(session.tokenizer, path / "best", path))
    base = read_delta_config(path)["base"]
    model_path = model_path or base["name_or_path"]
    if not Path(model_path).is_dir():
        raise ConfigError(f"{path} is a delta folder whose base model {model_path!r} is not a folder here: "
                          "pass the base model folder with --model")
    model, tokenizer = _load_base(model_path, base["class"], trust_remote_code)
    return Source(model, load(model, path), _with_template(tokenizer, path))


def _with_template(tokenizer: Any, *folders: Path) -> Any:
    """The tokenizer with the chat template the run trained with (saved next to the delta), if any."""
    from deltatune.prompts import saved_template

    if tokenizer is not None:
        tokenizer.chat_template = saved_template(*folders) or tokenizer.chat_template
    return tokenizer


def _load_base(folder: str, class_name: str, trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    import transformers

    from deltatune.errors import DeltaTuneError
    from deltatune.models import load_tokenizer, load_weights, model_folder

    model_class = getattr(transformers, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise CheckpointError(f"the delta was trained on a {class_name!r}, which is not a transformers model class")
    model = load_weights(model_class, model_folder(folder, trust_remote_code), trust_remote_code).eval()
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    except DeltaTuneError:
        tokenizer = None
    return model, tokenizer


def export(source: str | Path, out: str | Path, format: str, *, model_path: str | None = None,
           trust_remote_code: bool = False) -> Path:
    """Write the delta of `source` (run or delta folder) to `out` as a PEFT adapter ("peft") or merged model ("hf");
    `trust_remote_code` as in `open_source`."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    check_new_folder(Path(out))  # before the slow part
    src = open_source(source, model_path, trust_remote_code=trust_remote_code)
    if format == "peft":
        from deltatune.interop.peft import export_peft

        return export_peft(src.delta, out)
    from deltatune.interop.hf import export_merged

    return export_merged(src.delta, src.tokenizer, out)
