"""Helpers for tests that run `deltatune train` in separate processes (crash safety, torchrun)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from deltatune.storage import load_tensors

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("elapsed", "tokens_per_s")  # the only logged values that may differ between identical runs
WORDS = ["the", "a", "movie", "plot", "actors", "film", "story", "music", "good", "bad", "was", "very", "long", "short"]


def env() -> dict[str, str]:
    """Environment of a child process: this checkout's deltatune, offline, one thread, no progress bars."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "COLUMNS": "200"}


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (and "dir" for each folder), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli_run(*args: str) -> tuple[int, str]:
    """Run the CLI in this process: its exit code and everything it printed, unwrapped (one line per message)."""
    from rich.console import Console

    from deltatune import cli

    buffer = io.StringIO()
    saved = cli.console, cli.errors
    cli.console = cli.errors = Console(file=buffer, width=100_000, highlight=False)  # stdout and stderr in order
    try:
        return cli.main(list(args)), buffer.getvalue()
    finally:
        cli.console, cli.errors = saved


def torchrun(*args: str) -> list[str]:
    """Command line of `torchrun --standalone --nproc_per_node 2 ARGS` (a free port, so parallel runs coexist)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Short random sentences (3-11 words: one example each at max_length 32)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))} for _ in range(n)]


def review_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """A learnable toy sentiment task: the label follows the word "good" / "bad"."""
    words = ["movie", "plot", "actors", "film", "story", "music"]
    return [{"text": f"the {words[(i + offset) % 6]} was {'good' if i % 2 else 'bad'} {words[(i * 7) % 6]}",
             "label": "positive" if i % 2 else "negative"} for i in range(n)]


def write_config(path: Path, **config: Any) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metrics(run: Path, file: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The logged rows without their timings."""
    rows = [json.loads(line) for line in (run / file).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def best_delta(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "best" / "delta.safetensors")


def assert_close_runs(a: Path, b: Path, tol: float) -> None:
    """Same logged steps and kinds, losses within `tol` (relative), best deltas within `tol` (absolute)."""
    rows_a, rows_b = metrics(a), metrics(b)
    assert [(r["kind"], r["step"]) for r in rows_a] == [(r["kind"], r["step"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=tol), (ra, rb)
    delta_a, delta_b = best_delta(a), best_delta(b)
    assert delta_a.keys() == delta_b.keys()
    for name in delta_a:
        torch.testing.assert_close(delta_b[name], delta_a[name], atol=tol, rtol=0)
