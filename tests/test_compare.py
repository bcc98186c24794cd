"""`deltatune compare`: method -> delta list resolution, one run per method, skip-finished, --force, the table."""

from __future__ import annotations

import csv
import statistics
import json

import pytest
import yaml

from deltatune.cli import main
from deltatune.runs.compare import CompareConfig, method_config, run_compare
from deltatune.config import read_config
from deltatune.errors import ConfigError
from tests.test_cli import reviews, tiny_bert_dir, wide_terminal, write_config  # noqa: F401  (fixtures)

SETTINGS = {"methods": ["lora", "ia3"],
            "settings": {"lora": {"delta": {"r": 2, "targets": ["query"]}, "train": {"optimizer": {"lr": 0.02}}},
                         "lora-r4": {"delta": {"method": "lora", "r": 4, "targets": ["query", "value"]}},
                         "bitfit": {"head": False}}}


@pytest.fixture
def config_file(tmp_path, tiny_bert_dir, reviews):  # noqa: F811
    path = write_config(tmp_path, tiny_bert_dir, reviews, compare=SETTINGS)
    raw = yaml.safe_load(path.read_text())
    raw["train"] |= {"epochs": 1, "eval_baseline": False}
    path.write_text(yaml.safe_dump(raw))
    return path


def resolve(path, name):
    raw = read_config(path)
    compare = CompareConfig(**raw.pop("compare"))
    return method_config(raw, name, compare.settings.get(name), where=str(path))


def test_a_method_name_becomes_a_delta_list_with_its_settings(config_file, tmp_path):
    lora = resolve(config_file, "lora")
    assert [d.method for d in lora.delta] == ["head", "lora"]  # classification: a fresh head first
    assert lora.delta[1].r == 2 and lora.delta[1].targets == ["query"] and lora.train.optimizer.lr == 0.02
    assert lora.output_dir == str(tmp_path / "run" / "lora")
    variant = resolve(config_file, "lora-r4")
    assert [d.method for d in variant.delta] == ["head", "lora"] and variant.delta[1].r == 4
    assert variant.train.optimizer.lr == 0.01  # the shared train section
    assert [d.method for d in resolve(config_file, "bitfit").delta] == ["bitfit"]  # head: false
    assert [d.method for d in resolve(config_file, "head").delta] == ["head"]
    full = resolve(config_file, "full")
    assert [d.method for d in full.delta] == ["head", "full"]  # registry defaults


@pytest.mark.parametrize("methods, message", [
    (["lorra"], "unknown method 'lorra'. Did you mean 'lora'?"),
    (["lora", "lora"], "methods to compare are listed twice"),
])
def test_bad_method_lists(config_file, methods, message):
    with pytest.raises(ConfigError, match=message):
        run_compare(config_file, methods, isolate=False)


def test_bad_settings_name_the_key(config_file):
    raw = yaml.safe_load(config_file.read_text())
    raw["compare"]["settings"]["lora"]["deltas"] = {}
    config_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="compare.settings.lora.deltas: unknown key"):
        run_compare(config_file, isolate=False)


@pytest.mark.slow  # trains three tiny runs
def test_compare_trains_each_method_once_and_writes_the_table(config_file, tmp_path, capsys):
    events, progress = [], []

    def on_event(kind, info):
        if kind == "progress":  # in-process: the training loop's own events, per method
            progress.append((info["method"], info["kind"]))
        else:
            events.append((kind, info["method"]))

    out, rows = run_compare(config_file, isolate=False, on_event=on_event)
    assert events == [("train", "lora"), ("train", "ia3")]
    for method in ("lora", "ia3"):
        assert [k for m, k in progress if m == method].count("step") == 6 and (method, "end") in progress
    assert out == tmp_path / "run"
    assert [r.method for r in rows] == ["lora", "ia3"] and [r.deltas for r in rows] == ["head + lora", "head + ia3"]
    for row in rows:
        results = json.loads((out / row.method / "results.json").read_text())
        assert row.test == results["test"]["accuracy"] and row.metric == "accuracy"
        assert row.trainable_params == results["trainable_params"] and row.steps == results["steps"] == 6
        assert row.trainable_pct == pytest.approx(100 * results["trainable_params"] / results["total_params"])
        assert row.delta_bytes == (out / row.method / "best" / "delta.safetensors").stat().st_size
        assert row.wall_time_s > 0 and row.tokens_per_s > 0 and row.peak_rss_mb > 0
    head = 2 * 32 + 2
    assert [r.trainable_params for r in rows] == [2 * (2 * 32 + 32 * 2) + head, 2 * (32 + 32 + 32 + 64) + head]
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["lora", "ia3"] and saved["isolated_processes"] is False
    with open(out / "compare.csv", newline="") as f:
        assert [(r["method"], float(r["test"])) for r in csv.DictReader(f)] == [(r.method, r.test) for r in rows]
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "compare.html").read_text()
    assert page.count("<img") == 2 and "head + ia3" in page and "trainable %" in page

    stamp = (out / "lora" / "results.json").stat().st_mtime_ns
    assert main(["compare", str(config_file), "--in-process"]) == 0  # finished runs are kept
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("finished earlier, kept") == 2 and "head + lora" in printed and "compare.html" in printed
    assert (out / "lora" / "results.json").stat().st_mtime_ns == stamp

    with pytest.raises(ConfigError, match=r"holds a finished run with a different config \(changed: delta.1.r\)"):
        run_compare(config_file, overrides=["compare.settings.lora.delta.r=3"], isolate=False)
    events.clear()
    run_compare(config_file, ["lora"], ["compare.settings.lora.delta.r=3"], force=True, isolate=False,
                on_event=on_event)
    assert events == [("train", "lora")]
    assert (out / "lora" / "results.json").stat().st_mtime_ns != stamp
    assert yaml.safe_load((out / "lora" / "config.yaml").read_text())["delta"][1]["r"] == 3


@pytest.mark.slow  # a fresh python process per method
def test_isolated_methods_train_in_their_own_process(config_file, tmp_path):
    lines = []
    out, (row,) = run_compare(config_file, ["bitfit"], on_event=lambda kind, info: lines.append(info.get("line")))
    assert (out / "bitfit" / "train.log").is_file() and (out / "bitfit" / "report.html").is_file()
    # the method's process is not on a terminal: it prints plain progress lines, and they reach the caller live
    assert (out / "bitfit" / "train.log").read_text().splitlines() == lines[1:]
    assert [line.split()[1] for line in lines if line and line.startswith("step ")][-1] == "6/6"
    assert any(line and "ETA" in line and "tokens/s" in line for line in lines)
    assert row.deltas == "bitfit" and row.steps == 6
    assert json.loads((out / "compare.json").read_text())["isolated_processes"] is True


@pytest.mark.slow  # four tiny runs
def test_seeds_give_mean_and_spread_and_the_table_is_whole_off_a_terminal(config_file, tmp_path, capsys):
    assert main(["compare", str(config_file), "--methods", "bitfit,lora", "--seeds", "0,1", "--in-process"]) == 0
    out = tmp_path / "run"
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for method, row in rows.items():
        results = [json.loads((out / method / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        assert [yaml.safe_load((out / method / f"seed-{s}" / "config.yaml").read_text())["train"]["seed"]
                for s in (0, 1)] == [0, 1]
        tests = [r["test"]["accuracy"] for r in results]
        assert row["tests"] == tests and row["seeds"] == [0, 1]
        assert row["test"] == pytest.approx(statistics.fmean(tests))
        assert row["test_std"] == pytest.approx(statistics.stdev(tests))
        assert row["test_n"] == results[0]["examples"]["test"] == 12
        configs = [yaml.safe_load((out / method / f"seed-{s}" / "config.yaml").read_text()) for s in (0, 1)]
        assert [c["data"]["split_seed"] for c in configs] == [0, 0]  # the same test set for every seed
        labels, other = ([json.loads(line)["label"] for line in (out / method / f"seed-{s}" / "predictions.jsonl")
                          .open()] for s in (0, 1))
        assert labels == other
        assert row["majority"] == max(map(labels.count, set(labels))) / 12
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "peak memory" in line)
    assert "test accuracy (mean ± sd)" in header and "test n" in header and "…" not in printed  # not cut to 80
    assert "one example is 8.3 points" in printed and "Seeds: 0, 1" in printed
    below = [m for m, r in rows.items() if r["test"] <= r["majority"]]
    assert (f"Not above it: {', '.join(below)}." in printed) == bool(below)
    assert "step 6/6" in printed  # progress inside each method
    page = (out / "compare.html").read_text()
    assert "<th>per seed</th>" in page and "<th>test n</th>" in page and "± is the standard deviation" in page
    assert "<h2>Training curves (seed 0)</h2>" in page


def test_compare_chart_starts_at_zero_and_draws_the_baselines():
    from deltatune.runs.compare import Row
    from deltatune.runs.report import compare_figure, compare_note

    def row(method, tests, base):
        return Row(method=method, deltas=method, metric="accuracy", test=statistics.fmean(tests),
                   test_std=statistics.stdev(tests), tests=tests, seeds=[0, 1, 2], test_n=100, majority=0.63,
                   base=base, trainable_params=10, total_params=1000, trainable_pct=1.0, delta_bytes=100,
                   wall_time_s=1.0, tokens_per_s=1.0, peak_rss_mb=1.0, steps=1)

    fig = compare_figure([row("lora", [0.78, 0.79, 0.80], 0.38), row("ia3", [0.77, 0.79, 0.81], 0.38)])
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_legend_handles_labels()[1] == ["majority class: 0.630", "base model (before training): 0.380"]
    assert len(ax.containers) == 2  # one error bar (mean ± sd over the seeds) per method
    note = compare_note([row("lora", [0.78, 0.79, 0.80], 0.38), row("prefix", [0.63, 0.63, 0.62], 0.38)])
    assert note == ("Seeds: 0, 1, 2; ± is the standard deviation over the seeds. 100 test examples: one example is 1 "
                    "point of accuracy, so differences of a few examples are noise. Always predicting the majority "
                    "class scores 0.6300. Not above it: prefix.")


@pytest.mark.parametrize("seeds, message", [("0,x", "--seeds takes comma-separated whole numbers"),
                                            ("1,1", "seeds must be distinct")])
def test_bad_seeds(config_file, capsys, seeds, message):
    assert main(["compare", str(config_file), "--seeds", seeds, "--in-process"]) == 1
    assert message in " ".join(capsys.readouterr().err.split())
