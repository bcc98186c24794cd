"""`report.html` of a run: config, results (base vs fine-tuned), training curves, environment. Self-contained
(plots are embedded PNGs), so it opens offline in any browser."""

from __future__ import annotations

import base64
import html
import io as bytes_io
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

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
        "<h2>Config</h2>", f"<pre>{html.escape(yaml.safe_dump(config.to_dict(), sort_keys=False))}</pre>",
        "<h2>Environment</h2>", _table(["item", "value"], _environment()),
    ]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>deltatune report</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def _curves_img(rows: list[dict[str, Any]], metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") in ("baseline", "eval") and r.get("split") == "validation"]
    if not train:
        return "<p>no training steps logged</p>"
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        ax_metric.plot([r["step"] for r in evals], [r.get(metric) for r in evals], "o-", color="C2")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    ax_metric.set_xlabel("step")
    ax_metric.set_title(f"validation {metric}")
    fig.tight_layout()
    buf = bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f"<img alt='training curves' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _environment() -> list[list[str]]:
    import torch
    import transformers

    from deltatune import __version__

    return [["deltatune", __version__], ["torch", torch.__version__], ["transformers", transformers.__version__],
            ["python", platform.python_version()], ["cpu", platform.processor() or platform.machine()],
            ["threads", str(torch.get_num_threads())], ["cuda", str(torch.version.cuda)]]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
