"""`deltatune compare`: the same task trained with several methods (same data, seed and budget), one run folder
per method under the config's `output_dir`, then one table and chart.

A method name maps to a delta list: the registered method with its default config (the registry's config class),
updated by the YAML's `compare.settings.<name>.delta`; classification and regression tasks put a fresh task head
first (`head: false` to leave it out). `settings.<name>.train` overrides the `train` section for that method only
(learning rates differ a lot between methods). A settings entry may name a variant, `lora-r16: {delta: {method:
lora, r: 16}}`, compared like any method.

    compare:
      methods: [full, lora, ia3, prefix]             # the default of --methods
      settings:
        full: {train: {optimizer: {lr: 5.0e-5, head_lr: 1.0e-3}}}
        lora: {delta: {r: 8, targets: [query, value]}}

Finished runs (results.json) are kept unless `force`; interrupted ones resume. By default every method trains in
its own process, so its peak memory is its own; its output lines (progress, evaluations) reach `on_event` as
"line" events and its `train.log` (in-process: the loop's events, as "progress" events).

`seeds=[0, 1, 2]` trains every method once per seed (run folders `<output_dir>/<method>/seed-<s>`, `train.seed`
set; `data.split_seed` keeps the config's seed, so every run is tested on the same examples); a row then holds
the mean and standard deviation of the test metric over the seeds, and every seed's value.
"""

from __future__ import annotations

import copy
import csv
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field

from deltatune import storage
from deltatune.runs import folder as run_folder
from deltatune.config import RunConfig, read_config, validate_config
from deltatune.delta import TENSOR_FILE
from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError
from deltatune.methods.head import Head
from deltatune.registry import get_method
from deltatune.runs.folder import flatten
from deltatune.runs.run import RESULTS_FILE, Run
from deltatune.safety import REMOTE_CODE_FLAG, read_yaml_file
from deltatune.schema import Schema

HEAD_TASKS = ("classification", "regression")


class MethodSettings(Schema):
    """How one compared method runs: its delta config keys, train overrides, and whether a task head goes first."""

    section = "compare.settings"

    delta: dict[str, Any] = Field(default_factory=dict, description="the method's config keys (`method:` names the "
                                                                    "registered method of a variant)")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the train section")
    head: bool | None = Field(None, description="add a fresh task head first; default: yes for classification "
                                                "and regression tasks")


class CompareConfig(Schema):
    """The `compare:` section of a config: default method list and per-method settings."""

    section = "compare"

    methods: list[str] = Field(default_factory=list, description="methods compared by default (--methods)")
    settings: dict[str, MethodSettings] = Field(default_factory=dict, description="per method or variant name: "
                                                                                  "its delta and train settings")


@dataclass
class Row:
    """One method's line of the comparison table."""

    method: str
    deltas: str
    metric: str
    test: float | None  # mean over the seeds
    test_std: float | None  # sample standard deviation over the seeds (None: one seed)
    tests: list[float]  # one per seed
    seeds: list[int]
    test_n: int | None  # test examples
    majority: float | None  # accuracy of always predicting the test split's most frequent class
    base: float | None  # the model before training (mean over the seeds: a new head starts differently per seed)
    trainable_params: int
    total_params: int
    trainable_pct: float
    delta_bytes: int
    wall_time_s: float  # the whole run: training and evaluations (mean over the seeds)
    tokens_per_s: float
    peak_rss_mb: float  # the largest of the seeds
    steps: int


def run_compare(path: str | Path, methods: list[str] | None = None, overrides: list[str] = (), *,
                seeds: list[int] | None = None, force: bool = False, isolate: bool = True,
                on_event: Callable[[str, dict[str, Any]], None] | None = None,
                trust_remote_code: bool = False) -> tuple[Path, list[Row]]:
    """Train every method of the comparison (per seed of `seeds`; default: the config's one seed, no seed
    folders), or reuse its finished run, and write compare.json/.csv/.png/.html into the config's output_dir.
    Returns (that folder, the table rows). `trust_remote_code` allows code from the model folder (the config
    file cannot)."""
    emit = on_event or (lambda kind, info: None)
    raw = read_config(path, overrides)
    compare = CompareConfig(**(raw.pop("compare", None) or {}))
    names = methods or compare.methods
    if not names:
        raise ConfigError(f"{path}: no methods to compare: pass --methods lora,prefix,... or list them in "
                          "compare.methods")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods to compare are listed twice: {', '.join(names)}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds must be distinct and at least one, e.g. --seeds 0,1,2 (got {seeds})")
    runs = {name: [method_config(raw, name, compare.settings.get(name), where=str(path), seed=seed,
                                 trust_remote_code=trust_remote_code)
                   for seed in seeds or [None]] for name in names}
    out = compare_folder(raw, path)
    todo = [(name, config) for name, configs in runs.items() for config in configs]
    for i, (name, config) in enumerate(todo):
        run_dir = run_folder.output_folder(config.output_dir)
        info = {"method": name, "seed": config.train.seed if seeds else None, "index": i + 1, "total": len(todo),
                "run_dir": str(run_dir)}
        if (run_dir / RESULTS_FILE).is_file() and not force:
            check_same_config(run_dir, config)
            emit("skip", info)
            continue
        emit("train", info)
        # an interrupted run resumes; a finished one (with force) or one that died before its first checkpoint
        # is replaced: its files are moved aside, never deleted
        resume = (run_dir / "checkpoints").is_dir() and not force
        train_one(config, resume=resume, overwrite=not resume, isolate=isolate,
                  on_line=lambda line, info=info: emit("line", {**info, "line": line}),
                  on_event=lambda kind, event, info=info: emit("progress", {**info, "kind": kind, "event": event}))
    rows = [table_row(name, configs) for name, configs in runs.items()]
    write_outputs(out, rows, {name: configs[0] for name, configs in runs.items()}, isolated=isolate)
    return out, rows


def compare_folder(raw: dict[str, Any], path: str | Path) -> Path:
    """The comparison's own folder (compare.json, ..., one run folder per method): any folder a run could use,
    except one that holds a single run."""
    out = run_folder.output_folder(raw.get("output_dir", RunConfig.model_fields["output_dir"].default),
                                  config_path=path)
    if entries := run_folder.run_entries(out):
        raise ConfigError(f"output_dir {out} holds a single training run ({', '.join(entries)}), not a comparison: "
                          "give the comparison a folder of its own")
    return out


def method_config(raw: dict[str, Any], name: str, settings: MethodSettings | None, where: str,
                  seed: int | None = None, *, trust_remote_code: bool = False) -> RunConfig:
    """The run config of one compared method: the shared sections, its delta list, its train overrides (and
    with `seed`, that train.seed in the folder seed-<seed>)."""
    settings = settings or MethodSettings()
    delta = {"method": name, **settings.delta}
    method = get_method(str(delta["method"]))  # an unknown name is an error listing the registered methods
    run = copy.deepcopy(raw)
    run["delta"] = [delta]
    run["train"] = deep_merge(run.get("train") or {}, settings.train)
    run["output_dir"] = str(Path(run.get("output_dir", RunConfig.model_fields["output_dir"].default)) / name)
    if seed is not None:  # the seed of training; the split (the test set) stays that of the config's seed
        if isinstance(run.get("data"), dict):
            run["data"].setdefault("split_seed", run["train"].get("seed", 0))
        run["train"]["seed"] = seed
        run["output_dir"] = str(Path(run["output_dir"]) / f"seed-{seed}")
    config = validate_config(run, where=f"{where} (compare: {name})", trust_remote_code=trust_remote_code)
    is_head = method.delta_class.role == "head"
    head = settings.head if settings.head is not None else not is_head and config.task in HEAD_TASKS
    return config.model_copy(update={"delta": [Head(), *config.delta]}) if head else config


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def check_same_config(run_dir: Path, config: RunConfig) -> None:
    """A finished run is reused only if it was trained with the config asked for now."""
    saved = read_yaml_file(run_dir / "config.yaml")
    wanted = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))
    saved, wanted = flatten(saved), flatten(wanted)
    if changed := sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)):
        raise ConfigError(f"{run_dir} holds a finished run with a different config (changed: "
                          f"{', '.join(changed[:5])}); re-run it with --force, or choose another output_dir")


def train_one(config: RunConfig, *, resume: bool, overwrite: bool, isolate: bool,
              on_line: Callable[[str], None] | None = None,
              on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Train one method: in a fresh `python -m deltatune train` (its own peak memory; every output line goes to
    train.log and `on_line`), or in this process (the training loop's events go to `on_event`)."""
    run_dir = Path(config.output_dir).expanduser()
    if not isolate:
        from deltatune.runs.session import run_training

        run_training(config, resume=resume, overwrite=overwrite, on_event=on_event)
        return
    # the method's config goes next to its run folder (a new run must start in a folder without config.yaml)
    config_file = run_dir.with_name(f".{run_dir.name}.config.yaml")
    storage.write_text(config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "deltatune", "train", str(config_file),
               "--resume" if resume else "--overwrite",
               *([REMOTE_CODE_FLAG] * config.model.trust_remote_code)]
    try:
        with open(log, "w") as f, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True, env={**env, "COLUMNS": "120"}, bufsize=1) as child:
            for line in child.stdout:  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
    finally:
        config_file.unlink(missing_ok=True)
    if child.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise DeltaTuneError(f"training {run_dir.name} failed (exit code {child.returncode}): {tail} (log: {log})")


def table_row(name: str, configs: list[RunConfig]) -> Row:
    """One method's row: its run's results, or the mean (and spread) of its runs over several seeds."""
    runs = [Run.open(Path(c.output_dir).expanduser(), trust_remote_code=c.model.trust_remote_code) for c in configs]
    try:
        return _row(name, configs, runs)
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, OSError) as exc:
        files = ", ".join(str(run.folder / RESULTS_FILE) for run in runs)
        raise CheckpointError(f"{files}: not the results of finished runs ({type(exc).__name__}: {exc}); re-train "
                              "that method with --force") from None


def _row(name: str, configs: list[RunConfig], runs: list[Run]) -> Row:
    results = [run.results for run in runs]
    first, metric = results[0], results[0]["metric"]
    tests, bases = _test_scores(results, metric), _test_scores(results, metric, baseline=True)
    examples, predictions = first.get("examples") or {}, first.get("predictions") or {}
    return Row(method=name, deltas=" + ".join(d.method for d in configs[0].delta), metric=metric,
               test=statistics.fmean(tests) if tests else None,
               test_std=statistics.stdev(tests) if len(tests) > 1 else None, tests=tests,
               seeds=[c.train.seed for c in configs], test_n=examples.get("test"),
               majority=predictions.get("majority_accuracy") if predictions.get("split") == "test" else None,
               base=statistics.fmean(bases) if bases else None,
               trainable_params=first["trainable_params"], total_params=first["total_params"],
               trainable_pct=100 * first["trainable_params"] / first["total_params"],
               delta_bytes=(runs[0].best / TENSOR_FILE).stat().st_size,
               wall_time_s=statistics.fmean(r["wall_time_s"] for r in results),
               tokens_per_s=statistics.fmean(r["train_tokens_per_s"] for r in results),
               peak_rss_mb=max(r["peak_rss_mb"] for r in results), steps=first["steps"])


def _test_scores(results: list[dict[str, Any]], metric: str, baseline: bool = False) -> list[float]:
    """The test metric of each seed's run (of its model before training, with `baseline`)."""
    scores = [((r.get("baseline") or {}).get("test") if baseline else r.get("test")) or {} for r in results]
    return [s[metric] for s in scores if s.get(metric) is not None]


def write_outputs(out: Path, rows: list[Row], configs: dict[str, RunConfig], *, isolated: bool) -> None:
    """compare.json and compare.csv (the table), compare.png (metric vs trainable %), compare.html (the report)."""
    from deltatune.runs.report import compare_chart, write_compare_report

    storage.write_json(out / "compare.json", {"isolated_processes": isolated, "rows": [asdict(r) for r in rows]})
    with storage.atomic_path(out / "compare.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows({**asdict(r), "tests": " ".join(map(str, r.tests)), "seeds": " ".join(map(str, r.seeds))}
                         for r in rows)
    with storage.atomic_path(out / "compare.png") as tmp:
        tmp.write_bytes(compare_chart(rows))
    write_compare_report(out, rows, configs, isolated=isolated)
