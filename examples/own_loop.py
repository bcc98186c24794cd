"""Train a deltatune delta with your own PyTorch loop (no deltatune Trainer, no YAML): LoRA + a new classification
head on the packaged MiniLM and rotten-tomatoes reviews, then save the delta, load it into a fresh copy of the base
model, merge it, and check that every step gives the same predictions.

    python examples/own_loop.py                # 150 steps: 77.0% test accuracy (measured here)
    python examples/own_loop.py --steps 5      # a smoke test
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import deltatune
from deltatune.models.assets import resolve_data_path
from deltatune.models.load import load_model

LABELS = ["negative", "positive"]


def batches(rows: list[dict], tokenizer, batch_size: int, seed: int):
    """Shuffled, tokenized, padded batches of (text, label) rows, forever."""
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield encode(rows[i:i + batch_size], tokenizer)


def encode(rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([LABELS.index(r["label"]) for r in rows])
    return batch


@torch.no_grad()
def predict(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("runs/own_loop"), help="folder for the saved delta")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = [json.loads(line) for line in resolve_data_path("rotten_tomatoes").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    train_rows, test_rows = rows[:-200], rows[-200:]

    model, tokenizer = load_model("minilm", "classification", num_labels=2)
    delta = deltatune.attach(model, [deltatune.LoRA(r=8, alpha=16, targets=["query", "value"]), deltatune.Head()])
    trainable, total = delta.parameter_counts()
    print(f"trainable parameters: {trainable:,} of {total:,}")

    # The loop: only the delta's tensors go to the optimizer; the base model stays frozen.
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    data = batches(train_rows, tokenizer, batch_size=16, seed=0)
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(delta.trainable_parameters().values(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    test = encode(test_rows, tokenizer)
    logits = predict(model, test)
    accuracy = (logits.argmax(-1) == test["labels"]).float().mean().item()
    print(f"test accuracy: {accuracy:.3f} on {len(test_rows)} reviews")

    delta.save(args.out)  # delta.safetensors + delta.json: only the delta's tensors
    fresh, _ = load_model("minilm", "classification", num_labels=2)
    loaded = deltatune.load(fresh, args.out)  # checks that it is the same base model
    torch.testing.assert_close(predict(fresh, test), logits)
    loaded.merge()  # folded into the base weights: no extra modules, same outputs
    torch.testing.assert_close(predict(fresh, test), logits, atol=1e-4, rtol=1e-4)
    print(f"saved to {args.out}; reloaded and merged: same predictions")


if __name__ == "__main__":
    main()
