"""Shared test setup: everything runs offline; converted packaged assets go to a per-session temp cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temp cache per test session, so each packaged conversion runs at most once."""
    return tmp_path_factory.mktemp("deltatune-cache")


@pytest.fixture
def tmp_cache(session_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point DELTATUNE_CACHE at the session temp cache for one test (never touches ~/.cache)."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(session_cache_dir))
    return session_cache_dir


# Tiny test models run faster on one thread than on two that contend (10-100x under load); measured here.
import torch  # noqa: E402

torch.set_num_threads(1)
