"""Inference latency of a merged LoRA delta vs the base model (and the unmerged delta), on the packaged SmolLM2.

`merge()` folds B·A into the base weights and puts the original modules back, so the merged model runs exactly
the base model's code; this measures it. Rounds alternate base / merged / unmerged forwards (eval, no grad,
one prompt of --length tokens) and report the median of each.

    python bench/merged_latency.py --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import deltatune
    from workloads import build_model

    model = build_model("smollm2").eval()
    base_model = copy.deepcopy(model)
    delta = deltatune.attach(model, deltatune.LoRA(r=16, alpha=32))
    with torch.no_grad():  # a trained-looking delta: B != 0
        for tensor in delta.trainable_parameters().values():
            tensor.normal_(std=0.01)
    ids = torch.randint(3, 40000, (1, args.length))
    times: dict[str, list[float]] = {"base": [], "merged LoRA": [], "unmerged LoRA": []}

    def timed(label: str, net: torch.nn.Module) -> None:
        with torch.no_grad():
            start = time.perf_counter()
            net(input_ids=ids)
            times[label].append(time.perf_counter() - start)

    for _ in range(args.rounds + 1):  # the first round warms up
        timed("base", base_model)
        delta.merge()
        timed("merged LoRA", model)
        delta.unmerge()
        timed("unmerged LoRA", model)
    base = statistics.median(times["base"][1:])
    print(f"SmolLM2-135M, 1 x {args.length} tokens, {args.threads} thread(s), median of {args.rounds} rounds")
    print("| model | median ms | vs base |\n|---|---:|---:|")
    for label, values in times.items():
        median = statistics.median(values[1:])
        print(f"| {label} | {1e3 * median:.1f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
