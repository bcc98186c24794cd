"""Classification diagnostics (confusion matrix, per-class scores, misclassified examples), per-example predictions
(`deltatune eval RUN --output`), test-set hygiene and plain progress lines when the output is not a terminal."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from deltatune.runs.diagnostics import classification_summary, misclassified
from deltatune.runs.progress import GenerationLines, TrainLines, duration
from tests.test_cli import reviews, tiny_bert_dir, wide_terminal, write_config  # noqa: F401  (fixtures)


def rows_of(pairs):
    return [{"index": i, "text": f"t{i}", "label": t, "predicted": p, "probability": 0.5 + i / 100}
            for i, (t, p) in enumerate(pairs)]


def test_confusion_matrix_and_per_class_scores_hand_computed():
    # true a: 3 (2 right, 1 -> b); true b: 2 (1 right, 1 -> a); true c: 1 (-> a); nothing predicted c
    rows = rows_of([("a", "a"), ("a", "a"), ("a", "b"), ("b", "b"), ("b", "a"), ("c", "a")])
    summary = classification_summary(rows, ["a", "b", "c"])
    assert summary["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    a, b, c = summary["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert (summary["n"], summary["majority_label"], summary["majority_accuracy"]) == (6, "a", 0.5)
    assert [r["index"] for r in misclassified(rows)] == [5, 4, 2]  # most confident mistake first
    assert [r["index"] for r in misclassified(rows, limit=1)] == [5]


@pytest.mark.slow  # a tiny training run
def test_a_run_writes_its_predictions_and_eval_output_writes_any_split(tmp_path, tiny_bert_dir, reviews, capsys,
                                                                       monkeypatch):
    config = write_config(tmp_path, tiny_bert_dir, reviews)
    monkeypatch.delenv("COLUMNS")  # a log file: rich would wrap long lines at 80 columns
    assert main(["train", str(config), "--progress-every", "4"]) == 0
    printed = capsys.readouterr().out
    assert any(line.startswith("trainable ") and line.endswith(" MB") for line in printed.splitlines())  # one line
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").open()]
    assert len(predictions) == results["examples"]["test"] == 12 and results["examples"]["train"] == 96
    for row in predictions:
        assert set(row["probabilities"]) == {"negative", "positive"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["probability"] == row["probabilities"][row["predicted"]]
        assert row["text"].startswith("the ") and row["label"] == ("positive" if " good " in row["text"] else
                                                                   "negative")
    accuracy = sum(r["label"] == r["predicted"] for r in predictions) / 12
    assert accuracy == pytest.approx(results["test"]["accuracy"])
    labels = [r["label"] for r in predictions]
    assert results["predictions"] == {"split": "test", "examples": 12, "file": "predictions.jsonl",
                                      "majority_label": max(set(labels), key=labels.count),
                                      "majority_accuracy": max(map(labels.count, set(labels))) / 12}
    page = (run / "report.html").read_text()
    assert "Classification diagnostics (test set, 12 examples)" in page and "Confusion matrix" in page

    # test-set hygiene: the test split is scored before training (the base model) and once at the end, never
    # while training chooses the best delta
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [(r["kind"], r["step"]) for r in metrics if r.get("split") == "test"] == [("baseline", 0), ("final", 12)]
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [6, 12]  # validation, every epoch

    # plain progress off a terminal: every 4 steps and the last, with tokens/s and ETA
    steps = [line.split()[1] for line in printed.splitlines() if line.startswith("step ")]
    assert steps == ["4/12", "8/12", "12/12"]
    assert all("tokens/s" in line and "ETA" in line for line in printed.splitlines() if line.startswith("step "))

    out = tmp_path / "validation.jsonl"
    assert main(["eval", str(run), "--split", "validation", "--output", str(out)]) == 0
    assert f"wrote 12 predictions to {out}" in " ".join(capsys.readouterr().out.split())
    rows = [json.loads(line) for line in out.open()]
    assert len(rows) == 12 and not list(tmp_path.glob(".validation.jsonl*"))  # written whole, no temporary left
    assert sum(r["label"] == r["predicted"] for r in rows) / 12 == pytest.approx(
        next(r for r in metrics if r["kind"] == "eval" and r["step"] == results["best_step"])["accuracy"])


def test_train_lines_every_n_steps_with_eta():
    lines = []
    progress = TrainLines(lines.append, every=2)
    progress.on_event("start", {"total_steps": 5, "trainable": 10, "total": 1000})
    for step in range(1, 6):
        progress.on_event("step", {"step": step, "epoch": step / 5, "loss": 1 / step, "lr": 1e-3, "tokens": 100,
                                   "seconds": 0.5})
    progress.on_event("eval", {"split": "validation", "step": 5, "epoch": 1.0, "metrics": {"loss": 0.25}})
    assert lines[0] == "trainable parameters: 10 of 1,000 (1.000%)"
    assert [line.split("  ")[0] for line in lines[1:4]] == ["step 2/5 (40%)", "step 4/5 (80%)", "step 5/5 (100%)"]
    assert "loss 0.5000  lr 1.00e-03  200 tokens/s" in lines[1] and "ETA" in lines[1]
    assert lines[3].endswith("ETA 0s") and lines[4] == "  validation epoch 1.0 step 5: loss 0.2500"
    default = TrainLines(lines.append)
    default.on_event("start", {"total_steps": 1000, "trainable": 1, "total": 1})
    assert default.every == 50  # about 20 lines a run


def test_generation_lines_and_durations():
    lines = []
    GenerationLines(lines.append, "fine-tuned")(8, 24)
    assert lines[0].startswith("generating (fine-tuned): 8/24 prompts  elapsed 0s  ETA ")
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1:05", "1:02:05"]


def test_on_a_terminal_the_progress_is_a_bar_with_evaluations_and_generation(monkeypatch, capsys):
    from deltatune import cli

    monkeypatch.setattr(cli.console, "_force_terminal", True)
    with cli._train_progress(None) as progress:
        assert isinstance(progress, cli._TrainProgress)
        progress.on_event("start", {"total_steps": 2, "epochs": 1, "trainable": 10, "total": 1000})
        progress.on_event("step", {"step": 2, "epoch": 1.0, "loss": 0.25, "lr": 1e-3, "tokens": 10, "seconds": 1})
        progress.on_event("eval", {"split": "test", "step": 2, "epoch": 1.0, "metrics": {"loss": 0.5},
                                   "final": True})
        progress.on_event("generation", {"model": "base", "done": 3, "total": 3, "elapsed": 1.0})
    out = capsys.readouterr().out
    for seen in ("trainable parameters: 10 of 1,000", "epoch 1", "2/2", "loss 0.2500",
                 "test       after training (best delta): loss 0.5000", "generating (base)", "3/3 prompts"):
        assert seen in out, seen
    monkeypatch.setattr(cli.console, "_force_terminal", False)
    with cli._train_progress(7) as progress:  # a log file, CI, nohup: plain lines
        assert isinstance(progress, TrainLines) and progress.every == 7
