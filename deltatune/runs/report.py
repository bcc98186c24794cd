"""`report.html` of a run (config, results base vs fine-tuned, training curves, environment) and `compare.html`
of a comparison (table, metric vs trainable % chart, every method's curves and config). Self-contained (plots are
embedded PNGs), so they open offline in any browser."""

from __future__ import annotations

import base64
import html
import io as bytes_io
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import CheckpointError
from deltatune.storage import write_text

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right;"
         "vertical-align:top}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         "table.text td,table.text th{text-align:left}table.text td{white-space:pre-wrap;max-width:34em;"
         "overflow-wrap:anywhere}table.code td{font-family:ui-monospace,monospace;font-size:85%}"
         "table.wide{font-size:85%}table.wide td,table.wide th{white-space:nowrap;padding:4px 6px}"
         ".scroll{overflow-x:auto}pre{background:#f7f7f7;padding:1em}.note{color:#555}"
         ".warn{color:#a40000;font-weight:bold}")


def write_report(out_dir: str | Path, config: Any, result: Any) -> Path:
    """Write `out_dir/report.html` from the run's config, its TrainResult, `metrics.jsonl` and (classification)
    `predictions.jsonl`."""
    out_dir = Path(out_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    res = asdict(result)
    sections = [
        f"<h1>deltatune run: {html.escape(str(out_dir))}</h1>",
        *_results_section(res),
        _summary_table(res),
        _diagnostics_section(res, out_dir, config),
        _generation_section(res, out_dir),
        "<h2>Training curves</h2>", _curves_img(rows, res["metric"]),
        "<h2>Config</h2>", _config_pre(config),
        "<h2>Environment</h2>", _table(["item", "value"], _environment()),
    ]
    path = out_dir / "report.html"
    write_text(path, _page("deltatune report", sections))
    return path


def write_compare_report(out_dir: str | Path, rows: list[Any], configs: dict[str, Any], *, isolated: bool) -> Path:
    """Write `out_dir/compare.html`: the table, metric vs trainable % chart, every method's curves, configs."""
    out_dir = Path(out_dir)
    seeds = rows[0].seeds
    table = [[r.method, r.deltas, fmt_spread(r.test, r.test_std), ", ".join(map(_fmt, r.tests)), _fmt(r.base),
              _fmt(r.test_n), f"{r.trainable_params:,}", f"{r.trainable_pct:.3f}%", _size(r.delta_bytes),
              f"{r.wall_time_s:.1f} s", f"{r.tokens_per_s:,.0f}", f"{r.peak_rss_mb:,.0f} MB"] for r in rows]
    header = ["method", "deltas", f"test {rows[0].metric}" + (" ± sd" if len(seeds) > 1 else ""),
              "per seed", "base", "test n", "trainable", "trainable %", "delta file", "wall time", "tokens/s",
              "peak memory"]
    memory = "each method in its own process" if isolated else "all methods in one process: the peak so far"
    curves = {name: read_metrics(Path(config.output_dir) / "metrics.jsonl") for name, config in configs.items()}
    sections = [
        f"<h1>deltatune compare: {html.escape(str(out_dir))}</h1>",
        "<h2>Results (test set)</h2>", f"<div class='scroll'>{_table(header, table, css='wide')}</div>",
        f"<p class='note'>{html.escape(compare_note(rows))} Peak memory: {memory}.</p>",
        _img(compare_chart(rows), f"test {rows[0].metric} vs trainable parameters"),
        f"<h2>Training curves{f' (seed {seeds[0]})' if len(seeds) > 1 else ''}</h2>",
        _img(_curves_png(curves, rows[0].metric), "training curves of every method"),
        "<h2>Configs</h2>", *[f"<h3>{html.escape(name)}</h3>{_config_pre(c)}" for name, c in configs.items()],
        "<h2>Environment</h2>", _table(["item", "value"], _environment()),
    ]
    path = out_dir / "compare.html"
    write_text(path, _page("deltatune compare", sections))
    return path


def compare_note(rows: list[Any]) -> str:
    """How far apart two methods must be to mean anything: one test example's worth, and the seeds' spread."""
    r = rows[0]
    parts = [f"Seeds: {', '.join(map(str, r.seeds))}"
             + ("; ± is the standard deviation over the seeds." if len(r.seeds) > 1 else
                " (one seed: run with --seeds 0,1,2 to see the spread).")]
    if r.test_n:
        points = f"{100 / r.test_n:.2g} point{'' if r.test_n == 100 else 's'}"
        parts.append(f"{r.test_n} test examples: one example is {points} of accuracy, so differences of a few "
                     "examples are noise.")
    if r.majority is not None:
        parts.append(f"Always predicting the majority class scores {r.majority:.4f}.")
        if r.metric == "accuracy" and (below := [x.method for x in rows if x.test is not None and
                                                 x.test <= r.majority]):
            parts.append(f"Not above it: {', '.join(below)}.")
    return " ".join(parts)


def compare_chart(rows: list[Any]) -> bytes:
    """PNG of `compare_figure`."""
    return _png(compare_figure(rows))


def compare_figure(rows: list[Any]) -> Any:
    """Matplotlib figure: test metric (mean and spread over seeds) against the trainable share of parameters (log
    scale), one labelled point per method, with the base model and the majority class as horizontal lines. The
    y axis starts at 0, so small differences look small."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in (r for r in rows if r.test is not None):
        ax.errorbar(r.trainable_pct, r.test, yerr=r.test_std or 0, fmt="o", capsize=4, ms=6)
        ax.annotate(r.method, (r.trainable_pct, r.test), textcoords="offset points", xytext=(6, 6))
    bases = sorted({round(r.base, 6) for r in rows if r.base is not None})
    for value, label, style in ((rows[0].majority, "majority class", ":"),
                                (bases[0] if len(bases) == 1 else None, "base model (before training)", "--")):
        if value is not None:
            ax.axhline(value, color="gray", ls=style, lw=1.2, label=f"{label}: {value:.3f}")
    if len(bases) > 1:  # e.g. an untrained prefix already changes the outputs: one base point per method
        ax.scatter([r.trainable_pct for r in rows], [r.base for r in rows], marker="x", color="gray",
                   label="base model (before training)")
    values = [v for r in rows for v in (*r.tests, r.base, r.majority) if v is not None]
    ax.set_ylim(0, max(1.0, max(values, default=0) * 1.1) if rows[0].metric in BOUNDED else
                max(values, default=1) * 1.15)
    ax.set_xscale("log")
    ax.margins(x=0.25)  # room for the labels
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    seeds = len(rows[0].seeds)
    ax.set_ylabel(f"test {rows[0].metric}" + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize="small", loc="lower right")
    return fig


BOUNDED = ("accuracy", "macro_f1", "exact_match", "rougeL")  # metrics in [0, 1]


def _curves_png(curves: dict[str, list[dict[str, Any]]], metric: str) -> bytes:
    return _png(curves_figure(curves, metric))


def curves_figure(curves: dict[str, list[dict[str, Any]]], metric: str) -> Any:
    """Matplotlib figure: train loss and the validation metric against step, per run. For one run also the
    validation loss, the learning rate and the gradient norm; a multi-task run gets one line per task."""
    single = len(curves) == 1
    fig, axes = _pyplot().subplots(2 if single else 1, 2, figsize=(10, 7.2 if single else 3.6), squeeze=False)
    ax_loss, ax_metric = axes[0]
    for name, rows in curves.items():
        rows = [r for r in rows if _is_number(r.get("step"))]  # a damaged line is left out, not plotted
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") in ("baseline", "eval") and r.get("split") == "validation"]
        tasks = sorted({k.rpartition("/")[0] for r in rows for k in r if "/" in k} - {"macro"})
        colors = {task: f"C{i}" for i, task in enumerate(tasks)}  # a multi-task run: one colour per task
        _plot_series(ax_loss, train, _task_keys(train, "loss"), f"{name} train".strip(), "-", colors)
        if single:
            _plot_series(ax_loss, evals, _task_keys(evals, "loss"), "validation", "o--", colors)
            per_task = _task_keys(evals, metric.rpartition("/")[2]) if metric.startswith("macro/") else []
            _plot_series(ax_metric, evals, [*per_task, metric] if per_task else [metric], "", "o-", colors)
        else:
            _plot_series(ax_metric, evals, [metric], name, "o-")
    titles = [(ax_loss, "loss"), (ax_metric, f"validation {metric}")]
    if single:
        train = [r for r in next(iter(curves.values())) if r.get("kind") == "train"]
        _plot_series(axes[1][0], train, ["lr"], "", "-")
        _plot_series(axes[1][1], train, ["grad_norm"], "", "-")
        titles += [(axes[1][0], "learning rate"), (axes[1][1], "gradient norm (before clipping)")]
    for ax, title in titles:
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    return fig


def _task_keys(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """`<task>/<metric>` of every task when the rows have them (a multi-task run), else just `metric`."""
    tasks = sorted({k for r in rows for k in r if k.endswith(f"/{metric}") and not k.startswith("macro/")})
    return tasks or [metric]


def _plot_series(ax: Any, rows: list[dict[str, Any]], keys: list[str], label: str, style: str,
                 colors: dict[str, str] | None = None) -> None:
    """One line per key over the rows that have it, labelled `label` and (several keys) the key's task; a task
    keeps its colour across panels and series (macro: black)."""
    for key in keys:
        points = [r for r in rows if _is_number(r.get(key))]
        task = key.rpartition("/")[0]
        name = " ".join(filter(None, [label, task])) if len(keys) > 1 else label
        color = "black" if task == "macro" else (colors or {}).get(task)
        if points:
            ax.plot([r["step"] for r in points], [r[key] for r in points], style, lw=1, ms=4, label=name or None,
                    color=color)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl log (metrics, generations); a line that is not a JSON object is a CheckpointError
    naming file:line."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}:{n}: not a JSON row ({exc}); the log is damaged") from None
        if not isinstance(row, dict):
            raise CheckpointError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}; the log is damaged")
        rows += [row] if row else []
    return rows


def _results_section(res: dict[str, Any]) -> list[str]:
    """Base vs fine-tuned metrics on the test split; without one, on validation (the best evaluation)."""
    sizes = res.get("examples") or {}
    if res.get("test"):
        split, tuned, note = "test", res["test"], ""
    elif res.get("best_validation"):
        split, tuned = "validation", res["best_validation"]
        note = (f"<p class='note'>No test split: these are the validation scores of the best delta (step "
                f"{res.get('best_step')}), the same data that chose it, so they are optimistic.</p>")
    else:
        return ["<h2>Results</h2>", "<p class='note'>No validation or test split: nothing was evaluated.</p>"]
    base = (res.get("baseline") or {}).get(split, {})
    n = f", {sizes[split]:,} examples" if sizes.get(split) else ""
    table = _table(["metric", "base", "fine-tuned"], [[k, _fmt(base.get(k)), _fmt(v)] for k, v in tuned.items()])
    return [f"<h2>Results ({split} set{n})</h2>", table, note]


def _summary_table(res: dict[str, Any]) -> str:
    trainable, total = res["trainable_params"], res["total_params"]
    items = [("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"),
             ("steps / epochs", f"{res['steps']} / {res['epochs']:.2f}"),
             ("best step", res.get("best_step")), ("stopped early", res.get("stopped_early")),
             ("wall time", f"{res['wall_time_s']:.1f} s"), ("train tokens/s", f"{res['train_tokens_per_s']:,.0f}"),
             ("peak memory", f"{res['peak_rss_mb']:,.0f} MB")]
    return "<h2>Run</h2>" + _table(None, [[k, _fmt(v)] for k, v in items])


def _diagnostics_section(res: dict[str, Any], out_dir: Path, config: Any, shown: int = 20) -> str:
    """Classification: confusion matrix, per-class precision/recall/F1 and the most confident mistakes, from
    predictions.jsonl (the best delta on the test split, else validation)."""
    from deltatune.runs.diagnostics import classification_summary, misclassified

    info = res.get("predictions")
    if not info or config.task != "classification" or not (out_dir / info["file"]).is_file():
        return ""
    rows = read_metrics(out_dir / info["file"])
    labels = list(dict.fromkeys([*rows[0]["probabilities"], *(r["label"] for r in rows)])) if rows else []
    summary = classification_summary(rows, labels)
    confusion = _table(["true \\ predicted", *labels], [[name, *counts] for name, counts in
                                                        zip(labels, summary["confusion"])])
    per_class = _table(["class", "precision", "recall", "F1", "support"],
                       [[c["label"], _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), c["support"]]
                        for c in summary["per_class"]])
    wrong = misclassified(rows, shown)
    mistakes = _table(["#", "text", "true", "predicted", "probability"],
                      [[r["index"], r["text"], r["label"], r["predicted"], f"{r['probability']:.3f}"] for r in wrong],
                      css="text")
    total_wrong = sum(r["label"] != r["predicted"] for r in rows)
    accuracy = 1 - total_wrong / max(len(rows), 1)
    warning = (f"<p class='warn'>The fine-tuned model ({accuracy:.4f}) does not beat always predicting the majority "
               "class.</p>" if rows and accuracy <= summary["majority_accuracy"] else "")
    return (f"<h2>Classification diagnostics ({info['split']} set, {summary['n']:,} examples)</h2>"
            f"<p class='note'>Always predicting the majority class ({html.escape(str(summary['majority_label']))}) "
            f"scores {summary['majority_accuracy']:.4f}. Every prediction: {html.escape(info['file'])}.</p>{warning}"
            f"<h3>Confusion matrix</h3>{confusion}<h3>Per class</h3>{per_class}"
            f"<h3>Misclassified ({len(wrong)} of {total_wrong}, most confident first)</h3>{mistakes}")


def _generation_section(res: dict[str, Any], out_dir: Path, samples: int = 5) -> str:
    """eval_generation: scores of base and fine-tuned answers, and the first few answers side by side."""
    gen = res.get("generation")
    if not gen:
        return ""
    base, tuned = gen.get("base") or {}, gen["fine_tuned"]
    scores = _table(["metric", "base", "fine-tuned"], [[k, _fmt(base.get(k)), _fmt(v)] for k, v in tuned.items()])
    rows = read_metrics(out_dir / "generations.jsonl")[:samples]
    answers = [[r.get("prompt") or r["messages"][-1]["content"], r.get("reference"), r.get("base", "-"), r["output"]]
               for r in rows]
    return (f"<h2>Generation ({html.escape(str(gen['file']))}, {gen['examples']} examples, greedy)</h2>{scores}"
            f"<h3>Sample answers</h3>{_table(['prompt', 'reference', 'base', 'fine-tuned'], answers, css='text code')}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _curves_img(rows: list[dict[str, Any]], metric: str) -> str:
    if not any(r.get("kind") == "train" for r in rows):
        return "<p>no training steps logged</p>"
    return _img(_curves_png({"": rows}, metric), "training curves")


def _config_pre(config: Any) -> str:
    return f"<pre>{html.escape(yaml.safe_dump(config.to_dict(), sort_keys=False))}</pre>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def _environment() -> list[list[str]]:
    import torch
    import transformers

    from deltatune import __version__

    return [["deltatune", __version__], ["python", platform.python_version()], ["torch", torch.__version__],
            ["transformers", transformers.__version__], ["platform", platform.platform()], ["cpu", _cpu_model()],
            ["cpu cores", str(os.cpu_count())], ["torch threads", str(torch.get_num_threads())],
            ["cuda", str(torch.version.cuda)]]


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _table(header: list[str] | None, rows: list[list[Any]], css: str = "") -> str:
    """An HTML table of escaped cells; `header` None: no header row."""
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={css!r}' if css else ''}>{head}{body}</table>"


def fmt_spread(mean: float | None, sd: float | None) -> str:
    return _fmt(mean) if sd is None or mean is None else f"{mean:.4f} ± {sd:.4f}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
