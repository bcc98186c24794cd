"""Progress of long commands as plain text lines, for when the output is not a terminal (a log file, CI, nohup):
the training loop's events every N steps, like transformers' Trainer logging, and batches of generation.
On a terminal the CLI draws rich progress bars instead; the lines' wording is shared (`eval_line`)."""

from __future__ import annotations

import time
from typing import Any, Callable

LINES_PER_RUN = 20  # default interval: about this many step lines per run


def eval_line(info: dict[str, Any]) -> str:
    """One evaluation event: `  validation epoch 1.0 step 20: loss 0.6931  accuracy 0.5000`."""
    shown = "  ".join(f"{k} {_number(v)}" for k, v in info["metrics"].items())
    when = ("before training" if info.get("baseline") else "after training (best delta)" if info.get("final")
            else f"epoch {info['epoch']:.1f} step {info['step']}")
    return f"  {info['split']:<10} {when}: {shown}"


def start_line(info: dict[str, Any]) -> str:
    """The start event: `trainable parameters: 74,498 of 22,787,842 (0.327%)`."""
    trainable, total = info["trainable"], info["total"]
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def duration(seconds: float) -> str:
    """`1:02:03`, `2:03` or `5s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class TrainLines:
    """The training loop's events (`on_event`) as lines to `write`: a step line every `every` steps (default: about
    20 in a run) and at the last step, with step/total, epoch, loss, learning rate, tokens/s since the previous
    line and the ETA; one line per evaluation, early stop and generation batch."""

    def __init__(self, write: Callable[[str], None], every: int | None = None) -> None:
        self.write, self.every = write, every
        self.total, self.first_step, self.started = 0, 0, time.perf_counter()
        self.tokens, self.seconds = 0, 0.0

    def on_event(self, kind: str, info: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(info)

    def _on_start(self, info: dict[str, Any]) -> None:
        self.total, self.first_step = info["total_steps"], info.get("resumed_from_step") or 0
        self.every = self.every or max(1, self.total // LINES_PER_RUN)
        self.started = time.perf_counter()
        self.write(start_line(info))

    def _on_step(self, info: dict[str, Any]) -> None:
        self.tokens += info.get("tokens", 0)
        self.seconds += info.get("seconds", 0.0)
        step = info["step"]
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.first_step, 1) * (self.total - step)
        self.write(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)  epoch {info['epoch']:.2f}  "
                   f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  {self.tokens / max(self.seconds, 1e-9):,.0f} "
                   f"tokens/s  elapsed {duration(elapsed)}  ETA {duration(eta)}")
        self.tokens, self.seconds = 0, 0.0

    def _on_eval(self, info: dict[str, Any]) -> None:
        self.write(eval_line(info))

    def _on_early_stop(self, info: dict[str, Any]) -> None:
        self.write(f"early stop: no improvement in {info.get('patience')} evaluations")

    def _on_generation(self, info: dict[str, Any]) -> None:
        self.write(generation_line(info))


def generation_line(info: dict[str, Any]) -> str:
    """One generation event (model, done, total[, elapsed])."""
    line = f"generating ({info['model']}): {info['done']}/{info['total']} prompts"
    if info.get("elapsed") is not None and info["done"]:
        eta = info["elapsed"] / info["done"] * (info["total"] - info["done"])
        line += f"  elapsed {duration(info['elapsed'])}  ETA {duration(eta)}"
    return line


class GenerationLines:
    """`on_batch(done, total)` of `Generator.complete` as lines to `write`, with elapsed time and ETA."""

    def __init__(self, write: Callable[[str], None], model: str) -> None:
        self.write, self.model, self.started = write, model, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        self.write(generation_line({"model": self.model, "done": done, "total": total,
                                    "elapsed": time.perf_counter() - self.started}))


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
