"""AdapterFusion on two toy tasks, measured (not a test): does fusing two single-task adapters beat each of them on
a validation set that mixes both tasks?

A tiny random Llama (frozen) reads token sequences that start with a task marker:
  task A (marker 1): label 1 if token 7 occurs in the sequence          (presence)
  task B (marker 2): label 1 if the low tokens (< 35) outnumber the high ones (counting)
Stage 1 trains one Pfeiffer adapter + head per task. Stage 2 compares, on mixed (A+B) data, with the same
number of steps and a new head each time:
  * each adapter with its own stage-1 head (no stage-2 training),
  * each adapter frozen, a new head trained on mixed data,
  * fusion of both adapters + a new head trained on mixed data (only Q, K, V and the head train),
and prints the mean fusion weight on adapter A for task-A vs task-B examples (every layer, last token).

    python examples/fusion_toy.py [--steps 300] [--seed 0]      # ~1-2 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as T

import deltatune
from deltatune.methods.adapter import Adapter
from deltatune.methods.fusion import Fusion

VOCAB, LENGTH, MARK_A, MARK_B, NEEDLE = 64, 12, 1, 2, 7


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=2)
    return T.AutoModelForSequenceClassification.from_config(cfg).eval()


def batch(task: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of `task` ("A", "B" or "mixed"), balanced labels."""
    if task == "mixed":
        (xa, ya), (xb, yb) = batch("A", n // 2, g), batch("B", n - n // 2, g)
        return torch.cat([xa, xb]), torch.cat([ya, yb])
    body = torch.randint(8, VOCAB, (n, LENGTH - 1), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    if task == "A":
        at = torch.randint(0, LENGTH - 1, (n,), generator=g)
        body[labels == 1, at[labels == 1]] = NEEDLE
    else:  # resample until the majority matches the label (ties count as 0)
        for i in range(n):
            while int(((body[i] < 35).sum() > (body[i] >= 35).sum()).item()) != labels[i]:
                body[i] = torch.randint(8, VOCAB, (LENGTH - 1,), generator=g)
    marker = torch.full((n, 1), MARK_A if task == "A" else MARK_B)
    return torch.cat([marker, body], dim=1), labels


def train(model, delta, task: str, steps: int, seed: int, lr: float = 3e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=lr)
    model.train()
    for _ in range(steps):
        x, y = batch(task, 32, g)
        loss = F.cross_entropy(model(input_ids=x).logits, y)
        if (extra := delta.extra_loss()) is not None:
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per stage (batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusion-lr", type=float, default=3e-3, help="LR of stage 2 with fusion (others: 3e-3)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and shares the machine politely
    g = torch.Generator().manual_seed(1000 + args.seed)
    val = {task: batch(task, 1000, g) for task in ("A", "B")}
    val["mixed"] = (torch.cat([val["A"][0], val["B"][0]]), torch.cat([val["A"][1], val["B"][1]]))
    adapter = Adapter(placement="pfeiffer", reduction_factor=4, layer_norm=True)
    rows: list[tuple[str, dict[str, float]]] = []

    def measure(name: str, model) -> None:
        rows.append((name, {task: accuracy(model, data) for task, data in val.items()}))

    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for i, task in enumerate(("A", "B")):  # stage 1: one adapter (+ head) per task
            model = base_model()
            torch.manual_seed(args.seed + i)
            delta = deltatune.attach(model, [adapter, deltatune.Head()])
            train(model, delta, task, args.steps, seed=args.seed + 10 + i)
            measure(f"adapter {task}, its stage-1 head", model)
            folders[task] = delta.parts()[0].save(Path(tmp) / task)  # the adapter alone
        for task in ("A", "B"):  # stage 2 baselines: the single adapter frozen, a new head on mixed data
            model = base_model()
            torch.manual_seed(args.seed)
            deltatune.load(model, folders[task])
            head_only = deltatune.attach(model, deltatune.Head())  # train() steps only the head's tensors
            train(model, head_only, "mixed", args.steps, seed=args.seed + 20)
            measure(f"adapter {task} frozen, new head on mixed", model)
        both = Fusion(adapters=[str(folders["A"]), str(folders["B"])])
        model = base_model()  # the fusion kept at its start (the mean of both adapters), a new head on mixed data
        torch.manual_seed(args.seed)
        deltatune.attach(model, both)
        train(model, deltatune.attach(model, deltatune.Head()), "mixed", args.steps, seed=args.seed + 20)
        measure("mean of A and B (fusion untrained), new head", model)
        model = base_model()  # stage 2: fusion of both + a new head on mixed data
        torch.manual_seed(args.seed)
        fused = deltatune.attach(model, [both, deltatune.Head()])
        train(model, fused, "mixed", args.steps, seed=args.seed + 20, lr=args.fusion_lr)
        measure("fusion(A, B) + new head on mixed", model)
        fusion, share = fused.parts()[0], {}
        for task in ("A", "B"):
            accuracy(model, val[task])  # a forward pass on one task's inputs: fusion_weights() are its weights
            share[task] = {site: w[:, -1, 0].mean().item() for site, w in fusion.fusion_weights().items()}

    print(f"{'':46s} {'task A':>7s} {'task B':>7s} {'mixed':>7s}")
    for name, acc in rows:
        print(f"{name:46s} {acc['A']:7.3f} {acc['B']:7.3f} {acc['mixed']:7.3f}")
    print("mean fusion weight on adapter A (last token) for task-A vs task-B inputs:")
    for site in share["A"]:
        print(f"  {site:40s} {share['A'][site]:.3f} vs {share['B'][site]:.3f}")


if __name__ == "__main__":
    main()
