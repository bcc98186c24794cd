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
from deltatune.io import write_text

STYLE = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
         "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:1em}")


def write_report(out_dir: str | Path, config: Any, result: Any) -> Path:
    """Write `out_dir/report.html` from the run's config, its TrainResult and `metrics.jsonl`."""
    out_dir = Path(out_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    res = asdict(result)
    sections = [
        f"<h1>deltatune run: {html.escape(str(out_dir))}</h1>",
        "<h2>Results (test set)</h2>", _results_table(res),
        _summary_table(res),
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
    table = [[r.method, r.deltas, _fmt(r.test), _fmt(r.base), f"{r.trainable_params:,}", f"{r.trainable_pct:.3f}%",
              _size(r.delta_bytes), f"{r.wall_time_s:.1f} s", f"{r.tokens_per_s:,.0f}", f"{r.peak_rss_mb:,.0f} MB"]
             for r in rows]
    header = ["method", "deltas", f"test {rows[0].metric}", "base", "trainable", "trainable %", "delta file",
              "wall time", "tokens/s", "peak memory"]
    memory = "each method in its own process" if isolated else "all methods in one process: the peak so far"
    curves = {name: read_metrics(Path(config.output_dir) / "metrics.jsonl") for name, config in configs.items()}
    sections = [
        f"<h1>deltatune compare: {html.escape(str(out_dir))}</h1>",
        "<h2>Results (test set)</h2>", _table(header, table), f"<p>Peak memory: {memory}.</p>",
        _img(compare_chart(rows), f"test {rows[0].metric} vs trainable parameters"),
        "<h2>Training curves</h2>", _img(_curves_png(curves, rows[0].metric), "training curves of every method"),
        "<h2>Configs</h2>", *[f"<h3>{html.escape(name)}</h3>{_config_pre(c)}" for name, c in configs.items()],
        "<h2>Environment</h2>", _table(["item", "value"], _environment()),
    ]
    path = out_dir / "compare.html"
    write_text(path, _page("deltatune compare", sections))
    return path


def compare_chart(rows: list[Any]) -> bytes:
    """PNG: test metric against the trainable share of parameters (log scale), one labelled point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in (r for r in rows if r.test is not None):
        ax.scatter(r.trainable_pct, r.test, s=40)
        ax.annotate(r.method, (r.trainable_pct, r.test), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)  # room for the labels
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(f"test {rows[0].metric}")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def _curves_png(curves: dict[str, list[dict[str, Any]]], metric: str) -> bytes:
    """PNG: train loss (and, for one run, validation loss) and the validation metric against step, per run."""
    fig, (ax_loss, ax_metric) = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    for name, rows in curves.items():
        rows = [r for r in rows if _is_number(r.get("step"))]
        train = [r for r in rows if r.get("kind") == "train" and _is_number(r.get("loss"))]
        evals = [r for r in rows if r.get("kind") in ("baseline", "eval") and r.get("split") == "validation"
                 and _is_number(r.get("loss")) and (r.get(metric) is None or _is_number(r.get(metric)))]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=f"{name} train".strip())
        if evals and len(curves) == 1:
            ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
        ax_metric.plot([r["step"] for r in evals], [r.get(metric) for r in evals], "o-", label=name or None)
    for ax, title in ((ax_loss, "loss"), (ax_metric, f"validation {metric}")):
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    return _png(fig)


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


def _results_table(res: dict[str, Any]) -> str:
    base = (res.get("baseline") or {}).get("test", {})
    tuned = res.get("test") or {}
    return _table(["metric", "base", "fine-tuned"], [[k, _fmt(base.get(k)), _fmt(v)] for k, v in tuned.items()])


def _summary_table(res: dict[str, Any]) -> str:
    trainable, total = res["trainable_params"], res["total_params"]
    items = [("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"),
             ("steps / epochs", f"{res['steps']} / {res['epochs']:.2f}"),
             ("best step", res.get("best_step")), ("stopped early", res.get("stopped_early")),
             ("wall time", f"{res['wall_time_s']:.1f} s"), ("train tokens/s", f"{res['train_tokens_per_s']:,.0f}"),
             ("peak memory", f"{res['peak_rss_mb']:,.0f} MB")]
    return _table(["", ""], [[k, _fmt(v)] for k, v in items])


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
            f"<h3>Sample answers</h3>{_table(['prompt', 'reference', 'base', 'fine-tuned'], answers)}")


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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
