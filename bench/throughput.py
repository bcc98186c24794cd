"""Training throughput and memory: deltatune vs Hugging Face PEFT + transformers.Trainer, side by side.

Both sides train the same model, method and hyper-parameters on the same tokenized examples for exactly one
epoch (so they see equal tokens), each run in its own fresh process (peak RSS is per process). Sides alternate
within each repeat, so machine load hits both alike; each repeat uses another seed; medians are reported.

    python bench/throughput.py                                     # every case, 3 repeats
    python bench/throughput.py --cases lora-chat-llama --repeats 1 --steps 6      # a quick look
    python bench/throughput.py --cases lora-chat-llama --sides deltatune,dt-fp32,dt-nochunk,dt-noalloc  # levers

Reported per side: real tokens/s (padding excluded; steps after --warmup), peak RSS, time to first step (process
start to the end of optimizer step 1), held-out loss after the epoch (mean per example, fp32, same code for
both sides), and achieved model FLOP/s (the matmul FLOPs per real token every side must do, counted once with
torch's FlopCounterMode: the output head only at target positions; times tokens/s) as a fraction of a matmul peak
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

START = time.perf_counter()
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


@dataclass(frozen=True)
class Case:
    model: str
    data: str
    method: str


CASES = {
    "lora-chat-smollm2": Case("smollm2", "chat", "lora"),
    "lora-longtail-smollm2": Case("smollm2", "longtail", "lora"),
    "lora-chat-llama": Case("llama-small", "chat", "lora"),
    "lora-longtail-llama": Case("llama-small", "longtail", "lora"),
    "lora-fixed-llama": Case("llama-small", "fixed", "lora"),
    "lora-fixed-smollm2": Case("smollm2", "fixed", "lora"),
    "full-longtail-llama": Case("llama-small", "longtail", "full"),
    "prompt-chat-smollm2": Case("smollm2", "chat", "prompt"),
}
LR = {"lora": 1e-3, "full": 1e-4, "prompt": 3e-2}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
PROMPT_TOKENS = 20
# Sides: the reference, deltatune with its defaults, and deltatune with one lever changed (for the lever table).
# Reference sides: what the HF stack gives a user. "hf-best" and "trl" are what a knowledgeable user would pick on
# a CPU: bf16 where the CPU multiplies bf16 natively (as deltatune's `auto`; emulated bf16 is slower than fp32),
# length-grouped batches (Trainer) or padding-free batches (TRL SFTTrainer; prompt-masked labels = the completion
# mask). Ratios are against the fastest reference side of each case.
SIDES = {
    "peft": {},
    "peft-bf16": {"bf16": True},
    "hf-best": {"bf16": "native", "train_sampling_strategy": "group_by_length"},
    "trl": {"bf16": "native", "padding_free": True},
    "deltatune": {},
    "dt-nopack": {"packing": False},
    "dt-maskattn": {"packed_attention": False},  # packed rows through sdpa's block-diagonal mask, not per example
    "dt-fp32": {"precision": "fp32"},
    "dt-nochunk": {"chunked_loss": False},
    "dt-noalloc": {"allocator": False},
    "dt-oldheap": {"heap": "old"},
    "dt-mmap32": {"heap": "mmap32"},
    "dt-checkpointing": {"gradient_checkpointing": True},
}
REFERENCE_SIDES = ("peft", "peft-bf16", "hf-best", "trl")
# glibc heap settings a side can make train() apply instead of its own (deltatune/train/memory.py heap_settings):
# "old" is the policy before issue 18's 8B fix (no mmap at all, 1 GiB trim threshold); "mmapN" a fixed N MiB
# mmap threshold whatever the model.
OLD_HEAP = {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 1 << 30}


def use_heap(name: str) -> None:
    """Make train()'s heap policy apply the named settings instead of its own."""
    from deltatune.train import memory

    settings = OLD_HEAP if name == "old" else {**memory.heap_settings(), "MALLOC_MMAP_THRESHOLD_": int(name[4:]) << 20}
    memory.heap_settings = lambda model=None: settings


# ------------------------------------------------------------------ worker (one training run, own process)
def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from workloads import build_model

    data = json.loads(Path(spec["data_file"]).read_text())
    model = build_model(spec["model"])
    params = sum(p.numel() for p in model.parameters())
    run = run_deltatune if spec["side"] not in REFERENCE_SIDES else run_trl if spec["side"] == "trl" else run_reference
    trained, stats = run(model, data["train"], spec)
    stats["heldout_loss"] = heldout_loss(trained, data["heldout"]) if data["heldout"] else None
    return {**stats, "base_params": params}


class Recorder:
    """Real tokens of every batch collated, and the time every optimizer step ended."""

    def __init__(self, collate):
        self.collate, self.tokens, self.step_ends = collate, [], []

    def __call__(self, examples):
        batch = self.collate(examples)  # packed rows carry their real token count, padded batches a mask
        if "num_tokens" in batch:
            real = int(batch["num_tokens"])
        else:  # padding-free rows (TRL) have no mask: every token is real
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.tokens.append(real)
        return batch

    def step_done(self) -> None:
        self.step_ends.append(time.perf_counter())

    def stats(self, warmup: int, precision: str) -> dict:
        """Tokens/s over the steps after the first `warmup` (at least one step is left out, at least one kept)."""
        import resource

        n = len(self.step_ends)
        warm = max(1, min(warmup, n - 1))
        seconds = self.step_ends[n - 1] - self.step_ends[warm - 1]
        return {"steps": n, "tokens": sum(self.tokens[:n]), "tokens_per_s": sum(self.tokens[warm:n]) / seconds,
                "first_step_s": self.step_ends[0] - START, "precision": precision,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peft_model(model, spec: dict):
    """The case's method applied with PEFT (full fine-tuning: the model itself)."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if spec["method"] == "lora":
        lora = {**LORA, **spec.get("lora", {})}
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"], target_modules="all-linear"))
    elif spec["method"] == "prompt":
        model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=PROMPT_TOKENS,
                                                         prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB))
    return model


def reference_bf16(side: str) -> bool:
    """A side's bf16 setting: True, False, or "native" = where the CPU has native bf16 matmuls."""
    bf16 = SIDES[side].get("bf16", False)
    if bf16 != "native":
        return bf16
    from deltatune.train.compute import cpu_has_bf16

    return cpu_has_bf16()


def reference_args(spec: dict, **extra):
    """Trainer / SFTTrainer arguments both reference runners share (one epoch, same schedule as deltatune)."""
    common = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                  learning_rate=LR[spec["method"]], lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
                  seed=spec["seed"], logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                  disable_tqdm=True, dataloader_num_workers=0, bf16=reference_bf16(spec["side"]))
    return {**common, **extra}


def step_timer(on_step):
    """A TrainerCallback calling `on_step()` at every optimizer step's end (transformers imported in workers only)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step()

    return Timer()


def run_reference(model, train: list[dict], spec: dict):
    """PEFT + transformers.Trainer: padding to the batch maximum, no packing; the side sets bf16 and the sampler."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from workloads import tokenizer

    model = peft_model(model, spec)
    tok = tokenizer()
    plain_lm = all(e["labels"] == e["input_ids"] for e in train)
    if plain_lm:  # the usual causal-LM collator: labels = input_ids, padding masked
        collate, rows = DataCollatorForLanguageModeling(tok, mlm=False), [{"input_ids": e["input_ids"]} for e in train]
    else:  # prompt-masked SFT: labels padded with -100
        collate, rows = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), train
    recorder = Recorder(collate)
    sampler = SIDES[spec["side"]].get("train_sampling_strategy", "random")
    args = TrainingArguments(**reference_args(spec, train_sampling_strategy=sampler))
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=recorder,
            callbacks=[step_timer(recorder.step_done)]).train()
    return model, recorder.stats(spec["warmup"], "bf16" if args.bf16 else "fp32")


def run_trl(model, train: list[dict], spec: dict):
    """PEFT + TRL SFTTrainer, padding-free batches (one row per batch, position_ids restart per example; transformers
    keeps examples apart from the position_ids); prompt-masked labels (-100) act as TRL's completion mask."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from workloads import tokenizer

    model = peft_model(model, spec)
    recorder: Recorder | None = None

    class Trainer(SFTTrainer):  # the collator is TRL's own (padding-free needs it): wrap it to count tokens
        def get_train_dataloader(self):
            nonlocal recorder
            recorder = Recorder(self.data_collator)
            self.data_collator = recorder
            return super().get_train_dataloader()

    args = SFTConfig(**reference_args(spec, padding_free=True, max_length=None, completion_only_loss=False,
                                      dataset_kwargs={"skip_prepare_dataset": True}))
    rows = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train])
    Trainer(model=model, args=args, processing_class=tokenizer(), train_dataset=rows,
            callbacks=[step_timer(lambda: recorder.step_done())]).train()
    return model, recorder.stats(spec["warmup"], "bf16" if args.bf16 else "fp32")


def run_deltatune(model, train: list[dict], spec: dict):
    """deltatune's public API (attach + train) with its defaults, except the lever a side changes.

    Variable-length data is packed (data.packing): each step's examples (the same batches as without packing) go
    into rows of at most max_length tokens. Prompt tuning rewrites the inputs and cannot be packed: it is padded."""
    lever = SIDES[spec["side"]]
    if not lever.get("allocator", True):  # opt out of train()'s heap settings: glibc's defaults, set by hand
        os.environ.update(MALLOC_MMAP_MAX_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    if "heap" in lever:
        use_heap(lever["heap"])
    from datasets import Dataset

    import deltatune
    from deltatune.data import Collator, TaskData
    from deltatune.train.compute import resolve_precision
    from workloads import tokenizer

    delta = deltatune.attach(model, method_config(spec))
    rows = Dataset.from_list([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in train])
    packing = (lever.get("packing", True) and spec["method"] != "prompt"
               and len({len(e["input_ids"]) for e in train}) > 1)
    if packing:
        from deltatune.data.packing import prepare_model

        prepare_model(model)
        if not lever.get("packed_attention", True):
            model.config._attn_implementation = "sdpa"
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
    data = TaskData(rows, empty, empty, task="text", label_names=None, num_labels=None, source={})
    recorder = Recorder(Collator(tokenizer().pad_token_id, pack_to=spec["max_length"] if packing else None))
    knobs = {k: v for k, v in lever.items() if k not in ("allocator", "packing", "heap", "packed_attention")}
    cfg = deltatune.TrainConfig(epochs=1, batch_size=spec["batch"], seed=spec["seed"], log_every=10**6,
                                eval_baseline=False, optimizer=deltatune.OptimizerConfig(lr=LR[spec["method"]]),
                                **knobs)
    deltatune.train(model, delta, data, cfg, spec["out"], collate=recorder,
                    on_event=lambda kind, info: recorder.step_done() if kind == "step" else None)
    precision = "bf16" if resolve_precision(cfg.precision, model) else "fp32"
    return model, recorder.stats(spec["warmup"], precision)


def method_config(spec: dict):
    """The deltatune config of the case's method (the same settings the reference side gets)."""
    import deltatune

    if spec["method"] == "lora":
        return deltatune.LoRA(**{**LORA, **spec.get("lora", {})})
    if spec["method"] == "prompt":
        return deltatune.Prompt(n_tokens=PROMPT_TOKENS, init="vocab")
    return deltatune.Full()


def heldout_loss(model, examples: list[dict]) -> float:
    """Mean over examples of the per-example mean next-token loss (fp32, eval mode, one example at a time)."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([e["labels"]]))
            losses.append(float(out.loss))
    return sum(losses) / len(losses)


def count_flops(spec: dict) -> dict:
    """Matmul FLOPs per real token of the work every side must do: one forward + backward of the case's method on
    an unpadded row of `length` tokens, with the output head counted only at target positions (a fraction
    `targets` of the tokens). The head's share is measured as the difference between the plain loss at every
    position and the same pass without the head; `all_positions` is the plain count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import deltatune
    from deltatune.train.compute import hidden_states_out, output_head
    from deltatune.train.metrics import loss_sum
    from workloads import build_model

    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"]).train()
    deltatune.attach(model, method_config(spec))
    ids = torch.randint(3, 1000, (1, spec["length"]))

    def flops(run) -> float:
        with FlopCounterMode(display=False) as counter:
            run().backward()
        return counter.get_total_flops() / spec["length"]

    every = flops(lambda: loss_sum(model(input_ids=ids).logits, ids, "text"))
    head = output_head(model)
    if head is None:  # a head LoRA wraps (or none): counted at every position
        return {"flops_per_token": every, "all_positions": every}
    with hidden_states_out(head):
        body = flops(lambda: model(input_ids=ids).logits.sum())
    return {"flops_per_token": body + (every - body) * spec["targets"], "all_positions": every}


# ------------------------------------------------------------------ orchestration
def matmul_peak(threads: int, size: int = 512, seconds: float = 2.0) -> dict[str, float]:
    """Best FLOP/s of a size x size matmul in fp32 and bf16 (this process, `threads` threads). Each call takes a
    few ms, so on a shared machine the best calls are those that ran on a core alone."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - t))
        out[name] = best
    return out


def spawn(spec: dict, script: str = __file__) -> dict:
    """Run one spec in a fresh process of `script`'s worker; its result is the last stdout line (JSON)."""
    from workloads import smollm2_dir

    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
           "BENCH_SMOLLM2_DIR": str(smollm2_dir())}
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {spec['side']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(name: str, args: argparse.Namespace, tmp: Path, peak: dict[str, float]) -> dict:
    from workloads import build_data

    case = CASES[name]
    train, heldout = build_data(case.data, args.max_length, args.steps * args.batch)
    data_file = tmp / f"{name}.json"
    data_file.write_text(json.dumps({"train": train, "heldout": heldout}))
    base = {**asdict(case), "data_file": str(data_file), "batch": args.batch, "threads": args.threads,
            "warmup": args.warmup, "max_length": args.max_length}
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        for side in args.sides:
            spec = {**base, "side": side, "seed": repeat, "out": str(tmp / f"{name}-{side}-{repeat}")}
            runs[side].append(spawn(spec))
            print(f"  {name} {side} #{repeat + 1}: {runs[side][-1]['tokens_per_s']:.0f} tokens/s "
                  f"{json.dumps(runs[side][-1])}", file=sys.stderr, flush=True)
    mean_length = sum(len(e["input_ids"]) for e in train) / len(train)
    labels = [e["labels"] for e in train]
    targets = sum(sum(label != -100 for label in row[1:]) for row in labels) / sum(map(len, labels))
    flops = spawn({**base, "side": "flops", "length": round(mean_length), "targets": targets})["flops_per_token"]
    return summarise(name, runs, flops, peak, mean_length)


def summarise(name: str, runs: dict[str, list[dict]], flops: float, peak: dict[str, float],
              mean_length: float) -> dict:
    sides = {}
    for side, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("tokens_per_s", "peak_rss_mb", "first_step_s")}
        losses = [r["heldout_loss"] for r in results]
        sides[side] = {**med, "heldout_loss": statistics.mean(losses),
                       "heldout_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                       "steps": results[0]["steps"], "tokens": results[0]["tokens"],
                       "flops_per_s": flops * med["tokens_per_s"], "peak_kind": results[0]["precision"],
                       "runs": results}
    return {"case": name, **asdict(CASES[name]), "mean_length": mean_length, "flops_per_token": flops,
            "sides": sides}


def table(results: list[dict], peak: dict[str, float]) -> str:
    """A markdown table; ratios (tokens/s and peak RSS) are against the fastest reference side of each case
    (REFERENCE_SIDES; the first side when none ran)."""
    lines = ["| case | side | tokens/s | × | peak RSS MB | × | first step s | held-out loss | steps | "
             "GFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        refs = [s for side, s in r["sides"].items() if side in REFERENCE_SIDES] or [next(iter(r["sides"].values()))]
        ref = max(refs, key=lambda s: s["tokens_per_s"])
        for side, s in r["sides"].items():
            lines.append(
                f"| {r['case']} | {side} | {s['tokens_per_s']:.0f} | {s['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                f"{s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {s['first_step_s']:.1f} | "
                f"{s['heldout_loss']:.3f} ± {s['heldout_loss_sd']:.3f} | {s['steps']} | {s['flops_per_s'] / 1e9:.1f} | "
                f"{100 * s['flops_per_s'] / peak[s['peak_kind']]:.0f}% {s['peak_kind']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--sides", default="peft,deltatune", help=f"comma-separated, from: {', '.join(SIDES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="reference optimizer steps (= examples / batch)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write all results (every run) as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(count_flops(spec) if spec["side"] == "flops" else worker(spec)))
        return
    args.cases, args.sides = args.cases.split(","), args.sides.split(",")
    for name, known in (("case", CASES), ("side", SIDES)):
        if bad := [x for x in getattr(args, name + "s") if x not in known]:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(known)}")
    peak = matmul_peak(args.threads)
    print(f"matmul peak ({args.threads} thread(s)): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
        results = [run_case(name, args, Path(tmp), peak) for name in args.cases]
    print(table(results, peak))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"peak": peak, "args": {k: str(v) for k, v in vars(args).items()},
                                        "load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
