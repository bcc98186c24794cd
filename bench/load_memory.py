"""Peak memory while loading a model: deltatune's load_model reads the memory-mapped safetensors shards as stored
and converts (or quantizes) them one tensor at a time, releasing the checkpoint's pages as it goes, so loading
should need little beyond the final weights (issue 18: peak RSS during the load <= 1.2x the final weights).

Each point runs in a fresh process that first reads the tokenizer and imports the architecture's code (building
the model on the meta device), so that the baseline ("before") holds everything but the weights. Then:
  load peak RSS   ru_maxrss minus the RSS before: the whole peak, checkpoint pages mapped into the process included
                  (clean page cache the kernel could drop, but RSS all the same);
  x tensors       load peak / the bytes of the loaded model's tensors (parameters and buffers; quantized layers
                  count their packed data);
  x RSS after     load peak / (RSS after the load minus the RSS before): what the loaded model really occupies,
                  heap overhead and the pages of weights still used from the mapped file included;
  peak anonymous  the highest RssAnon above the baseline (sampled every 20 ms): what the load itself allocated.

    python bench/load_memory.py --sizes 1b --checkpoints bf16,fp32 --dtypes bf16,fp32 --quantize none,int8,int4
(checkpoints: the seeded random Llama of workloads.py in bf16 or fp32 shards, written on first use.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/deltatune-bench-models"))


def worker(spec: dict) -> dict:
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    from deltatune.models.load import Pretrained
    from deltatune.models.quantize import stored_bytes
    from deltatune.train.memory import rss_mb

    pretrained = Pretrained.open(spec["path"])
    tokenizer = pretrained.tokenizer()
    with torch.device("meta"):  # imports the architecture's code (~110 MB at Llama), which is not the weights
        AutoModelForCausalLM.from_config(pretrained.config)
    before, anon_before = rss_mb(), anon_mb()
    sampler = AnonPeak()
    start = time.perf_counter()
    model, _ = pretrained.load("causal_lm", dtype=spec["dtype"], tokenizer=tokenizer,
                               quantize=None if spec["quantize"] == "none" else spec["quantize"])
    seconds = time.perf_counter() - start
    anon_peak = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    weights, after = stored_bytes(model) / 2**20, rss_mb() - before
    return {**spec, "params": sum(p.numel() for p in model.parameters()), "weights_mb": weights,
            "rss_before_mb": before, "load_peak_mb": peak, "rss_after_mb": after, "ratio": peak / weights,
            "ratio_after": peak / after, "anon_peak_mb": anon_peak - anon_before,
            "anon_ratio": (anon_peak - anon_before) / weights, "load_s": seconds}


def anon_mb() -> float:
    """This process's anonymous resident memory (RssAnon), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


class AnonPeak:
    """The highest RssAnon seen by a background thread until `stop()`."""

    def __init__(self, every_s: float = 0.02):
        import threading

        self.peak, self.every_s, self.done = anon_mb(), every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak = max(self.peak, anon_mb())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, anon_mb())


def spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"load worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | checkpoint | dtype | quantize | tensors MB | RSS after load MB | load peak RSS MB | "
             "× tensors | × RSS after | peak anonymous MB | × tensors | load s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['checkpoint']} | {r['dtype']} | {r['quantize']} | {r['weights_mb']:.0f} | "
              f"{r['rss_after_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['ratio']:.2f} | {r['ratio_after']:.2f} | "
              f"{r['anon_peak_mb']:.0f} | {r['anon_ratio']:.2f} | {r['load_s']:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5b,1b")
    p.add_argument("--checkpoints", default="bf16", help="dtypes of the checkpoint on disk: bf16,fp32")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--quantize", default="none,int8,int4")
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch
    from workloads import write_random_llama

    rows = []
    for size, stored in itertools.product(args.sizes.split(","), args.checkpoints.split(",")):
        folder = MODELS / (size if stored == "bf16" else f"{size}-{stored}")
        path = write_random_llama(size, folder, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[stored])
        for dtype, quantize in itertools.product(args.dtypes.split(","), args.quantize.split(",")):
            spec = {"size": size, "checkpoint": stored, "path": str(path), "dtype": dtype, "quantize": quantize}
            rows.append(spawn(spec))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
