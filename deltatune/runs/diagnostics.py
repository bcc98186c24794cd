"""Per-example predictions of a classification or regression run, and what the report shows of a classifier:
the confusion matrix, per-class precision / recall / F1, the majority-class baseline and the misclassified
examples.

`predict` gives one row per example: `index`, `text` (the decoded input), `label`, `predicted`, and for
classification `probability` (of the predicted class) and `probabilities` (class name -> probability). A run writes
the rows of its test split (else validation) to `predictions.jsonl`; `deltatune eval RUN --output FILE` writes
those of any split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.train.metrics import logits_of

PREDICTIONS_FILE = "predictions.jsonl"
PREDICTED_TASKS = ("classification", "regression")


@torch.no_grad()
def predict(model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Callable, tokenizer: Any, task: str,
            label_names: list[str] | None, batch_size: int) -> list[dict[str, Any]]:
    """One row per example of `dataset` (eval mode, no gradients; the previous mode is restored)."""
    if task not in PREDICTED_TASKS:
        raise ConfigError(f"per-example predictions are for classification and regression runs, not {task!r}; "
                          "for a text run score generated answers: deltatune eval RUN --generate FILE --output OUT")
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(examples).items()}
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
            logits = logits_of(model(**inputs)).float()
            for i, (example, out) in enumerate(zip(examples, logits)):
                row = {"index": start + i, "text": tokenizer.decode(example["input_ids"], skip_special_tokens=True)}
                rows.append(row | _prediction(out, example["labels"], task, label_names))
    finally:
        model.train(was_training)
    return rows


def _prediction(logits: torch.Tensor, label: Any, task: str, names: list[str] | None) -> dict[str, Any]:
    if task == "regression":
        return {"label": float(label), "predicted": float(logits.flatten()[0])}
    probs = logits.softmax(-1).tolist()
    names = class_names(names, len(probs))
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": names[int(label)], "predicted": names[best], "probability": probs[best],
            "probabilities": dict(zip(names, probs))}


def class_names(names: list[str] | None, count: int) -> list[str]:
    """The class names of a classifier: the data's, else the label values as text."""
    return list(names) if names else [str(i) for i in range(count)]


def classification_summary(rows: list[dict[str, Any]], label_names: list[str]) -> dict[str, Any]:
    """Confusion matrix (rows: true class, columns: predicted), per-class precision/recall/F1/support, and the
    majority-class baseline (always predicting the most frequent true class) of prediction rows."""
    index = {name: i for i, name in enumerate(label_names)}
    confusion = [[0] * len(label_names) for _ in label_names]
    for r in rows:
        confusion[index[r["label"]]][index[r["predicted"]]] += 1
    per_class = []
    for c, name in enumerate(label_names):
        tp, support = confusion[c][c], sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append({"label": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    majority, count = Counter(r["label"] for r in rows).most_common(1)[0] if rows else (None, 0)
    return {"n": len(rows), "labels": label_names, "confusion": confusion, "per_class": per_class,
            "majority_label": majority, "majority_accuracy": _ratio(count, len(rows))}


def misclassified(rows: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    """The wrong predictions, most confident first (those are the most telling: label noise or a real blind spot)."""
    wrong = [r for r in rows if r["label"] != r["predicted"]]
    return sorted(wrong, key=lambda r: -r["probability"])[:limit]


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
