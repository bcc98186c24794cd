"""The `deltatune` command line. The library never prints; this module does, with rich."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from deltatune.errors import DeltaTuneError

console = Console(stderr=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # our own progress bar is the only one
    if argv is None:  # a real `deltatune` process (console script or python -m), not a call from Python code
        from deltatune.train.speed import tune_allocator

        tune_allocator()  # before any training memory is allocated
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the weight-loading report is noise next to our own summary
    hf_logging.disable_progress_bar()
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except DeltaTuneError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the last checkpoint is kept; continue with --resume")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pretrained models with small deltas.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a YAML config says")
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on a split")
    p.add_argument("run", type=Path, help="run folder written by `deltatune train`")
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. --set data.test=other.jsonl")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge a run's delta into the base and save a standalone model")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="generate text with a trained run, or a model and an optional delta")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run folder written by `deltatune train` (a causal-LM run)")
    source.add_argument("--model", help="model folder or packaged alias (e.g. smollm2-135m)")
    p.add_argument("--delta", type=Path, help="saved delta folder to attach to --model (e.g. RUN/best)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="cut each output at this string (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("methods", help="list the registered fine-tuning methods")
    p.set_defaults(func=cmd_methods)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.config import load_config
    from deltatune.run import run_training

    config = load_config(args.config, args.overrides)
    console.print(f"[bold]deltatune train[/] {args.config} → {config.output_dir}")
    methods = " + ".join(d.method for d in config.delta)
    console.print(f"model [cyan]{config.model.path}[/]  data [cyan]{config.data.train}[/]  method [cyan]{methods}[/]")
    with _TrainProgress() as progress:
        session, result = run_training(config, resume=args.resume, on_event=progress.on_event)
    _print_results(result, config.task)
    if skipped := sum(part.get("skipped", 0) for part in session.data.source.values()):
        first = next(part["first_skipped"] for part in session.data.source.values() if part.get("skipped"))
        from rich.markup import escape

        console.print(f"[yellow]skipped {skipped} malformed records[/] (data.skip_bad_records), e.g. {escape(first)}")
    console.print(f"run folder: [cyan]{config.output_dir}[/] (best delta in best/, report.html)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from deltatune.run import load_run
    from deltatune.train import evaluate

    session = load_run(args.run, args.overrides)
    dataset = getattr(session.data, args.split)
    metrics = evaluate(session.model, dataset, session.collator(), session.data.task,
                       session.config.train.eval_batch_size or session.config.train.batch_size)
    table = Table(title=f"{args.run} · {args.split} ({len(dataset)} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, _fmt(value))
    console.print(table)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from deltatune.run import load_run

    session = load_run(args.run)
    session.delta.merge()
    if args.out.exists() and any(args.out.iterdir()):
        raise DeltaTuneError(f"output folder {args.out} is not empty; choose a new folder")
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    session.model.save_pretrained(tmp)
    session.tokenizer.save_pretrained(tmp)
    if args.out.exists():
        args.out.rmdir()
    tmp.rename(args.out)
    console.print(f"merged model written to [cyan]{args.out}[/] (load it with transformers' from_pretrained)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from deltatune.generate import generate

    if args.run is not None:
        if args.delta is not None:
            raise DeltaTuneError("--delta goes with --model; a --run already has its delta (best/)")
        from deltatune.run import load_run

        session = load_run(args.run)
        model, tokenizer = session.model, session.tokenizer
    else:
        import deltatune
        from deltatune.models import load_model

        model, tokenizer = load_model(args.model, "causal_lm")
        if args.delta is not None:
            deltatune.load(model, args.delta)
    outputs = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, stop=args.stop)
    for prompt, output in zip(args.prompt, outputs):
        from rich.markup import escape

        console.print(f"[bold]{escape(prompt)}[/]", end="")
        console.print(output, markup=False, highlight=False)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from deltatune.registry import methods

    table = Table(title="deltatune methods")
    table.add_column("method", style="cyan")
    table.add_column("mergeable")
    table.add_column("description")
    for name, method in methods().items():
        table.add_row(name, "yes" if method.delta_class.mergeable else "no", method.description)
    console.print(table)
    return 0


class _TrainProgress:
    """Renders the training loop's events: a progress bar, one line per evaluation."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task: Any = None
        self.epochs = 1

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def on_event(self, kind: str, info: dict) -> None:
        handler: Callable[[dict], None] | None = getattr(self, f"_on_{kind}", None)
        if handler:
            handler(info)

    def _on_start(self, info: dict) -> None:
        trainable, total = info["trainable"], info["total"]
        self.epochs = info["epochs"]
        console.print(f"trainable parameters: [bold]{trainable:,}[/] of {total:,} ({100 * trainable / total:.3f}%)")
        self.task = self.progress.add_task("train", total=info["total_steps"], epoch=1, loss="-",
                                           completed=info.get("resumed_from_step") or 0)

    def _on_step(self, info: dict) -> None:
        epoch = min(int(info["epoch"]) + 1, self.epochs)
        self.progress.update(self.task, completed=info["step"], epoch=epoch, loss=f"{info['loss']:.4f}")

    def _on_eval(self, info: dict) -> None:
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in info["metrics"].items())
        when = "before training" if info.get("baseline") else f"epoch {info['epoch']:.1f} step {info['step']}"
        self.progress.console.print(f"  {info['split']:<10} {when}: {shown}")

    def _on_early_stop(self, info: dict) -> None:
        self.progress.console.print(f"[yellow]early stop[/]: no improvement in {info.get('patience')} evaluations")


def _print_results(result: Any, task: str) -> None:
    split, scores = ("test", result.test) if result.test else ("validation", result.best_validation)  # best delta
    table = Table(title=f"{split} set: base model vs fine-tuned")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    base = (result.baseline or {}).get(split, {})
    for name, value in (scores or {}).items():
        table.add_row(name, _fmt(base.get(name)), _fmt(value))
    console.print(table)
    trainable, total = result.trainable_params, result.total_params
    console.print(f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.3f}%) · "
                  f"{result.steps} steps · wall {result.wall_time_s:.1f}s · {result.train_tokens_per_s:,.0f} tokens/s · "
                  f"peak memory {result.peak_rss_mb:,.0f} MB")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
