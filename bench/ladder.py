"""The size ladder: LoRA training on real model sizes, from the packaged SmolLM2-135M to seeded random Llamas of
0.5B, 1B and 3B parameters (bench/workloads.py LADDER; 8B for memory only), with each kind of frozen base.

Every point is one fresh process: the model is loaded from disk with deltatune's load_model (bf16 safetensors
checkpoint, `model.dtype` / `model.quantize` applied while loading), LoRA r=8 on all linear layers is attached, and
deltatune.train runs `--steps` steps on fixed `--length`-token rows of the packaged reviews. Reported: tokens/s
(steps after the first), peak RSS, time to first step (process start to the end of step 1), and the achieved
matmul FLOP/s as a % of the matmul peak measured in the same run (FLOPs per token counted analytically: frozen
base = forward + input gradients, 4 per linear weight, plus attention 12·layers·hidden·length).

    python bench/ladder.py                                   # the default points, table + bench/ladder.png
    python bench/ladder.py --points 0.5b:auto,1b:int4 --steps 3 --png /tmp/ladder.png
A point is size:base, base = auto | bf16 | fp32 | int8 | int4 (int8/int4 compute in the `auto` dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import throughput  # noqa: E402  (first: its import time is the process start for time-to-first-step)

MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/deltatune-bench-models"))
DEFAULT_POINTS = "smollm2:auto,0.5b:auto,0.5b:int8,0.5b:int4,1b:auto,1b:int8,1b:int4,3b:int8,3b:int4"


def worker(spec: dict) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(spec["threads"])
    from deltatune.models.load import load_model
    from workloads import build_data

    quantize = spec["base"] if spec["base"] in ("int8", "int4") else None
    dtype = "auto" if quantize else spec["base"]
    model, _ = load_model(spec["path"], "causal_lm", dtype=dtype, quantize=quantize)  # bf16: fp32 compute here
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    flops = 4 * linear + 12 * config.num_hidden_layers * config.hidden_size * spec["length"]
    train, _ = build_data("fixed", spec["length"], spec["batch"] * spec["steps"])
    run = {"side": "deltatune", "method": "lora", "batch": spec["batch"], "seed": 0, "out": spec["out"],
           "warmup": 1, "max_length": spec["length"]}
    _, stats = throughput.run_deltatune(model, train, run)
    return {**spec, **stats, "params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops}


def table(rows: list[dict], peak: dict[str, float]) -> str:
    lines = ["| model | params | base | tokens/s | peak RSS GB | first step s | GFLOP/s | % of matmul peak |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        achieved = r["flops_per_token"] * r["tokens_per_s"]
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['base']} ({r['precision']}) | "
                     f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb'] / 1024:.2f} | {r['first_step_s']:.0f} | "
                     f"{achieved / 1e9:.1f} | {100 * achieved / peak[r['precision']]:.0f}% {r['precision']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for base in dict.fromkeys(r["base"] for r in rows):
        points = sorted((r["params"] / 1e9, r["tokens_per_s"], r["peak_rss_mb"] / 1024) for r in rows
                        if r["base"] == base)
        xs = [p[0] for p in points]
        speed.plot(xs, [p[1] for p in points], "o-", label=base)
        memory.plot(xs, [p[2] for p in points], "o-", label=base)
    for ax, label in ((speed, "training tokens/s"), (memory, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(title="frozen base")
    fig.suptitle("LoRA r=8 (all linear layers) on a CPU, 1 thread, by model size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default=DEFAULT_POINTS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", type=Path, default=BENCH / "ladder.png")
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from workloads import smollm2_dir, write_random_llama

    peak = throughput.matmul_peak(args.threads)
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltatune-ladder-") as tmp:
        for point in args.points.split(","):
            size, base = point.split(":")
            path = smollm2_dir() if size == "smollm2" else write_random_llama(size, MODELS / size)
            spec = {"size": size, "base": base, "path": str(path), "steps": args.steps, "batch": args.batch,
                    "length": args.length, "threads": args.threads, "side": point, "out": tempfile.mkdtemp(dir=tmp)}
            rows.append(throughput.spawn(spec, script=__file__))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows, peak))
    plot(rows, args.png)
    if args.out:
        args.out.write_text(json.dumps({"peak": peak, "load_average": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
