"""Optimizer-state bytes, peak process memory and loss of AdamW vs GaLore-AdamW (32-bit, 8-bit, per-layer).

    python bench/galore_memory.py --size gpt2 --steps 3            # memory on GPT-2 124M (random weights)
    python bench/galore_memory.py --size small --steps 200         # loss after 200 steps on a smaller GPT-2

Each optimizer runs in its own process (peak RSS is a per-process high-water mark), from the same seed, on the same
batches: the packaged rotten-tomatoes reviews as language-model data (tokenized with the packaged MiniLM WordPiece
tokenizer, concatenated, cut into blocks; the last 16 blocks are held out). The model is `full` fine-tuning of a
randomly initialised GPT-2 with dropout off, no gradient clipping (per-layer mode cannot clip), constant LR after a
10% warmup. Prints a markdown table with ratios to AdamW ("peak above model": peak RSS minus the RSS once model,
data and optimizer are built, i.e. what training adds); `--json` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {  # GPT-2 124M is GPT2Config()'s default; "small" keeps its shape at a size 2 shared CPU cores can train
    "gpt2": {},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 30522, "n_positions": 256},
}
RUNS = {  # name -> (optimizer name, galore settings beyond --rank/--gap/--scale)
    "adamw": ("adamw", None),
    "galore": ("galore_adamw", {}),
    "galore_8bit": ("galore_adamw8bit", {}),
    "galore_8bit_per_layer": ("galore_adamw8bit", {"per_layer": True}),
    "galore_emb": ("galore_adamw", {"targets": ["all-linear", "wte", "wpe"]}),
}
HELD_OUT = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # internal: run one optimizer, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    results = []
    for name in args.runs.split(","):
        argv = [f"--{k}={getattr(args, k)}" for k in ("size", "steps", "batch", "seq", "lr", "rank", "gap", "scale",
                                                        "threads")]
        out = subprocess.run([sys.executable, __file__, *argv, f"--one={name}"], check=True, capture_output=True,
                             text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


def blocks(seq: int):
    """The review texts as one token stream (reviews separated by [SEP]), cut into rows of `seq` tokens."""
    import torch
    from transformers import AutoTokenizer

    from deltatune.models.assets import resolve_data_path, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    rows = [json.loads(line)["text"] for line in resolve_data_path("rotten_tomatoes").read_text().splitlines()]
    ids = [t for ids in tokenizer(rows, add_special_tokens=False)["input_ids"] for t in [*ids, tokenizer.sep_token_id]]
    count = len(ids) // seq
    return torch.tensor(ids[:count * seq]).view(count, seq)


def measure(name: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers as T

    import deltatune
    from deltatune.methods.full import Full
    from deltatune.optim import OptimizerConfig, build_optimizer, build_scheduler
    from deltatune.train.memory import rss_mb

    torch.set_num_threads(args.threads)
    data = blocks(args.seq)
    train, held_out = data[:-HELD_OUT], data[-HELD_OUT:]
    torch.manual_seed(0)
    config = T.GPT2Config(**SIZES[args.size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(config).train()
    delta = deltatune.attach(model, Full())
    kind, extra = RUNS[name]
    galore = None if extra is None else {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale, **extra}
    cfg = OptimizerConfig(name=kind, lr=args.lr, schedule="constant", warmup_steps=args.steps // 10, galore=galore)
    optimizer = build_optimizer(model, delta, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=args.steps)
    rss_start = rss_mb()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        idx = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        batch = train[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        eval_loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in held_out) / len(held_out)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    tail = losses[-max(1, args.steps // 10):]
    return {"run": name, "params": sum(p.numel() for p in model.parameters()), "state_bytes": state,
            "rss_start_mb": rss_start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_loss": losses[0], "train_loss": sum(tail) / len(tail), "eval_loss": eval_loss,
            "s_per_step": seconds / args.steps}


def table(results: list[dict], args: argparse.Namespace) -> str:
    base = next((r for r in results if r["run"] == "adamw"), results[0])
    title = (f"GPT-2 `{args.size}` ({base['params'] / 1e6:.1f}M parameters), {args.steps} steps of batch "
             f"{args.batch} x {args.seq} tokens, lr {args.lr}, rank {args.rank}, update_proj_gap {args.gap}, "
             f"scale {args.scale}, {args.threads} thread(s)")
    header = ("| optimizer | state MiB | vs AdamW | peak RSS MiB | vs AdamW | peak above model MiB | vs AdamW "
              "| train loss (last 10%) | held-out loss | vs AdamW | s/step |")
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        above, base_above = r["peak_rss_mb"] - r["rss_start_mb"], base["peak_rss_mb"] - base["rss_start_mb"]
        lines.append(f"| {r['run']} | {r['state_bytes'] / 2**20:.1f} | {r['state_bytes'] / base['state_bytes']:.1%} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.1%} "
                     f"| {above:.0f} | {above / base_above:.1%} "
                     f"| {r['train_loss']:.3f} | {r['eval_loss']:.3f} | {r['eval_loss'] / base['eval_loss']:.3f} "
                     f"| {r['s_per_step']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
