"""What report.html shows (results, summary, diagnostics, sample answers, curves), checked on hand-made run
folders without a browser (tests/test_report.py renders real ones in Chromium)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from deltatune.runs.report import curves_figure, write_report
from deltatune.train import TrainResult


class FakeConfig:
    def __init__(self, task: str):
        self.task = task

    def to_dict(self) -> dict:
        return {"task": self.task}


def result(**changes) -> TrainResult:
    fields = dict(metric="loss", baseline={"validation": {"loss": 2.5, "perplexity": 12.18}},
                  best_validation={"loss": 1.25, "perplexity": 3.49}, best_step=4, test=None, steps=6, epochs=3.0,
                  stopped_early=False, wall_time_s=1.0, train_tokens_per_s=100.0, peak_rss_mb=500.0,
                  trainable_params=10, total_params=1000, examples={"train": 40, "validation": 8, "test": 0})
    return TrainResult(**(fields | changes))


def write_metrics(folder: Path, rows: list[dict]) -> None:
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_rows(steps: int, **extra) -> list[dict]:
    return [{"kind": "train", "step": s, "loss": 3 - s / 10, "lr": 1e-3 * s / steps, "grad_norm": 1 + s,
             **{k: v(s) for k, v in extra.items()}} for s in range(1, steps + 1)]


def test_without_a_test_split_the_report_shows_the_validation_results(tmp_path):
    write_metrics(tmp_path, train_rows(6))
    page = write_report(tmp_path, FakeConfig("text"), result()).read_text()
    assert "Results (test set" not in page
    assert "<h2>Results (validation set, 8 examples)</h2>" in page and "best delta (step 4)" in page
    assert "<tr><td>loss</td><td>2.5000</td><td>1.2500</td></tr>" in page
    assert "<tr><td>perplexity</td><td>12.1800</td><td>3.4900</td></tr>" in page
    summary = page.split("<h2>Run</h2>")[1].split("</table>")[0]
    assert "<th>" not in summary and summary.startswith("<table><tr><td>trainable parameters</td>")  # no blank header


def test_sample_answers_keep_their_lines_escaped_and_left_aligned(tmp_path):
    code = "def f(x):\n    return x < 1 and '<b>'"
    (tmp_path / "generations.jsonl").write_text(json.dumps(
        {"prompt": "write f", "reference": code, "base": "no", "output": code}) + "\n")
    write_metrics(tmp_path, train_rows(2))
    res = result(generation={"file": "eval.jsonl", "examples": 1, "base": {"rougeL": 0.0},
                             "fine_tuned": {"rougeL": 1.0}})
    page = write_report(tmp_path, FakeConfig("text"), res).read_text()
    answers = page.split("<h3>Sample answers</h3>")[1].split("</table>")[0]
    assert answers.startswith("<table class='text code'>")
    assert html.escape(code) in answers and "\n    return" in answers  # newlines and indentation kept, escaped
    assert "table.text td,table.text th{text-align:left}table.text td{white-space:pre-wrap;" in page
    assert "table.code td{font-family:ui-monospace" in page


def test_curves_show_learning_rate_grad_norm_and_one_loss_line_per_task(tmp_path):
    single = curves_figure({"": train_rows(4) + [{"kind": "eval", "split": "validation", "step": 4, "loss": 2.0}]},
                           "loss")
    titles = [ax.get_title() for ax in single.axes]
    assert titles == ["loss", "validation loss", "learning rate", "gradient norm (before clipping)"]
    lr_line, = single.axes[2].get_lines()
    assert list(lr_line.get_ydata()) == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert list(single.axes[3].get_lines()[0].get_ydata()) == [2, 3, 4, 5]

    # multi-task: each step logs the loss of the task(s) it drew; one line per task, not the mixed sawtooth
    rows = train_rows(6, **{"sst/loss": lambda s: 0.5 if s % 2 else None, "nli/loss": lambda s: None if s % 2 else 2})
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    rows.append({"kind": "eval", "split": "validation", "step": 6, "loss": 1.0, "sst/loss": 0.4, "nli/loss": 1.6,
                 "sst/accuracy": 0.9, "nli/accuracy": 0.5, "macro/accuracy": 0.7})
    fig = curves_figure({"": rows}, "macro/accuracy")
    loss_lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert loss_lines == {"train nli": [2, 2, 2], "train sst": [0.5, 0.5, 0.5], "validation nli": [1.6],
                          "validation sst": [0.4]}
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert colours["train nli"] == colours["validation nli"] != colours["train sst"] == colours["validation sst"]
    assert sorted(line.get_label() for line in fig.axes[1].get_lines()) == ["macro", "nli", "sst"]


def test_classification_diagnostics_section(tmp_path):
    rows = [{"index": i, "text": f"review <{i}>", "label": t, "predicted": p, "probability": q,
             "probabilities": {"neg": 1 - q if p == "pos" else q, "pos": q if p == "pos" else 1 - q}}
            for i, (t, p, q) in enumerate([("neg", "neg", 0.9), ("pos", "neg", 0.8), ("pos", "pos", 0.7),
                                           ("neg", "pos", 0.6), ("pos", "pos", 0.95)])]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_metrics(tmp_path, train_rows(2))
    res = result(metric="accuracy", test={"accuracy": 0.6}, baseline={"test": {"accuracy": 0.4}},
                 examples={"train": 20, "validation": 0, "test": 5},
                 predictions={"split": "test", "examples": 5, "file": "predictions.jsonl"})
    page = write_report(tmp_path, FakeConfig("classification"), res).read_text()
    assert "<h2>Results (test set, 5 examples)</h2>" in page
    assert "<h2>Classification diagnostics (test set, 5 examples)</h2>" in page
    assert "majority class (pos) scores 0.6000" in page
    assert "does not beat always predicting the majority class" in page  # 3 of 5 right = always "pos"
    assert ("<tr><th>true \\ predicted</th><th>neg</th><th>pos</th></tr><tr><td>neg</td><td>1</td><td>1</td></tr>"
            "<tr><td>pos</td><td>1</td><td>2</td></tr>") in page
    assert "<tr><td>pos</td><td>0.6667</td><td>0.6667</td><td>0.6667</td><td>3</td></tr>" in page
    mistakes = page.split("most confident first)</h3>")[1].split("</table>")[0]
    assert "Misclassified (2 of 2" in page
    assert mistakes.index("review &lt;1&gt;") < mistakes.index("review &lt;3&gt;")  # 0.8 before 0.6
    assert "<td>review &lt;1&gt;</td><td>pos</td><td>neg</td><td>0.800</td>" in mistakes
