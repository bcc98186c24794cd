"""Stage 1 for examples/fusion.yaml: train two Pfeiffer adapters on the packaged MiniLM, one per task, offline.

  sentiment  the packaged rotten-tomatoes reviews (positive / negative)         -> runs/fusion/sentiment/best
  topic      chatterbot-corpus utterances labelled by topic file (ai, coding,    -> runs/fusion/topic/best
             emotion, trivia; at most 200 each), written to runs/fusion/topic.jsonl at run time

Each run uses examples/adapter_pfeiffer.yaml (adapter + head); a stage whose best/ already exists is skipped.
Then `deltatune train examples/fusion.yaml` fuses both adapters for sentiment. Extra arguments are passed on
as overrides of both stage-1 runs, e.g. a quick check:

    python examples/fusion_prep.py data.limit=600 train.epochs=1
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

from deltatune.models.assets import package_dir
from deltatune.config import load_config
from deltatune.runs.session import run_training

ROOT = Path("runs/fusion")
TOPICS = ("ai", "coding", "emotion", "trivia")
PER_TOPIC = 200


def write_topic_data(path: Path) -> None:
    """One row per utterance: {"text": ..., "label": <topic file name>}, balanced, shuffled with a fixed seed."""
    rows = []
    for topic in TOPICS:
        doc = yaml.safe_load((package_dir("chatterbot_corpus") / "data" / "english" / f"{topic}.yml").read_text())
        texts = sorted({str(s).strip() for conv in doc["conversations"] if isinstance(conv, list) for s in conv})
        random.Random(0).shuffle(texts)
        rows += [{"text": t, "label": topic} for t in texts[:PER_TOPIC] if t]
    random.Random(1).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(overrides: list[str]) -> None:
    topic_data = ROOT / "topic.jsonl"
    if not topic_data.is_file():
        write_topic_data(topic_data)
    for name, data in (("sentiment", "rotten_tomatoes"), ("topic", str(topic_data))):
        out = ROOT / name
        if (out / "best" / "delta.json").is_file():
            print(f"{name}: {out / 'best'} exists, skipped")
            continue
        config = load_config("examples/adapter_pfeiffer.yaml",
                             [f"data.train={data}", f"output_dir={out}", *overrides])
        _, result = run_training(config)
        print(f"{name}: adapter in {out / 'best'}; test {result.test}")


if __name__ == "__main__":
    main(sys.argv[1:])
