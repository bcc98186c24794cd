"""Where a LoRA run's memory goes, phase by phase: RSS / RssAnon / RssFile (MB) now and their peaks (sampled every
10 ms) after imports, load_model, data, attach and each training step (then again after a malloc_trim, to tell
freed heap from live memory), plus the bytes of live CPU tensors by dtype (a gc census). Same model, data and
LoRA as ladder.py; train()'s heap settings (deltatune/train/memory.py) apply, or what --heap names: glibc (its
defaults), old (the settings before the 8B fix), mmapN (a fixed N MiB mmap threshold).

    python bench/memory_phases.py 1b int4 fp32 --length 128 --steps 2
The model is a folder under /tmp/deltatune-bench-models (or $BENCH_MODELS); quantize is none | int8 | int4.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import throughput  # noqa: E402
import torch  # noqa: E402

START = time.perf_counter()
MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/deltatune-bench-models"))
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    """This process's resident memory counters, MB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in lines) if k in FIELDS}


class Peaks:
    """The highest value of each counter seen by a background thread since the last `take()`."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not threading.Event().wait(0.01):
            for key, value in status().items():
                self.peak[key] = max(self.peak.get(key, 0), value)

    def take(self) -> dict[str, int]:
        peak, self.peak = self.peak, {}
        return peak


def live_tensors_mb() -> dict[str, int]:
    """MB of CPU tensor storages reachable by gc, by dtype (quantized tensors count their inner tensors)."""
    seen, total = set(), {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            continue
        names = getattr(obj, "tensor_data_names", None)
        for t in [getattr(obj, n) for n in names] if names else [obj]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total[str(t.dtype)] = total.get(str(t.dtype), 0) + storage.nbytes()
    return {k: v // 2**20 for k, v in total.items()}


def report(phase: str, peaks: Peaks) -> None:
    print(f"{phase:12s} {time.perf_counter() - START:5.0f}s now {status()} peak since last {peaks.take()} "
          f"live tensors {live_tensors_mb()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("quantize", choices=["none", "int8", "int4"])
    p.add_argument("dtype", choices=["fp32", "bf16"])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--heap", default="policy", help="policy | glibc | old | mmapN")
    p.add_argument("--no-trim", action="store_true", help="no malloc_trim after each step (the run as it is)")
    args = p.parse_args()
    torch.set_num_threads(1)
    peaks = Peaks()
    report("imports", peaks)
    import deltatune
    from datasets import Dataset
    from deltatune.data import Collator, TaskData
    from deltatune.models.load import load_model
    from workloads import build_data, tokenizer

    model, _ = load_model(str(MODELS / args.model), "causal_lm", dtype=args.dtype,
                          quantize=None if args.quantize == "none" else args.quantize)
    report("load", peaks)
    train, _ = build_data("fixed", args.length, args.steps)
    rows = Dataset.from_list([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in train])
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
    data = TaskData(rows, empty, empty, task="text", label_names=None, num_labels=None, source={})
    report("data", peaks)
    if args.heap == "glibc":  # opt out of train()'s heap settings, as bench/throughput.py's allocator lever does
        os.environ.update(MALLOC_MMAP_MAX_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    elif args.heap != "policy":
        throughput.use_heap(args.heap)
    delta = deltatune.attach(model, throughput.method_config({"method": "lora"}))
    report("attach", peaks)

    def on_event(kind: str, info: dict) -> None:
        if kind == "step":
            report(f"step {info.get('step', '')}", peaks)
            if not args.no_trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                report("  trimmed", peaks)

    config = deltatune.TrainConfig(epochs=1, batch_size=1, seed=0, log_every=10**6, eval_baseline=False,
                                   optimizer=deltatune.OptimizerConfig(lr=1e-4))
    deltatune.train(model, delta, data, config, tempfile.mkdtemp(prefix="deltatune-phases-"),
                    collate=Collator(tokenizer().pad_token_id), on_event=on_event)
    print("ru_maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


if __name__ == "__main__":
    main()
