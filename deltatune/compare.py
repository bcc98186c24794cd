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
its own process, so its peak memory is its own.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field

from deltatune import io, runfolder
from deltatune.config import RunConfig, read_config, validate_config
from deltatune.delta import TENSOR_FILE
from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.methods.head import Head
from deltatune.registry import get_method
from deltatune.runfolder import flatten
from deltatune.schema import Schema

RESULTS = "results.json"
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
    test: float | None
    base: float | None
    trainable_params: int
    total_params: int
    trainable_pct: float
    delta_bytes: int
    wall_time_s: float  # the whole run: training and evaluations
    tokens_per_s: float
    peak_rss_mb: float
    steps: int


def run_compare(path: str | Path, methods: list[str] | None = None, overrides: list[str] = (), *,
                force: bool = False, isolate: bool = True,
                on_event: Callable[[str, dict[str, Any]], None] | None = None) -> tuple[Path, list[Row]]:
    """Train every method of the comparison (or reuse its finished run) and write compare.json/.csv/.png/.html
    into the config's output_dir. Returns (that folder, the table rows)."""
    emit = on_event or (lambda kind, info: None)
    raw = read_config(path, overrides)
    compare = CompareConfig(**(raw.pop("compare", None) or {}))
    names = methods or compare.methods
    if not names:
        raise ConfigError(f"{path}: no methods to compare: pass --methods lora,prefix,... or list them in "
                          "compare.methods")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods to compare are listed twice: {', '.join(names)}")
    configs = {name: method_config(raw, name, compare.settings.get(name), where=str(path)) for name in names}
    out = compare_folder(raw, path)
    for i, (name, config) in enumerate(configs.items()):
        run_dir = runfolder.output_folder(config.output_dir)
        info = {"method": name, "index": i + 1, "total": len(configs), "run_dir": str(run_dir)}
        if (run_dir / RESULTS).is_file() and not force:
            check_same_config(run_dir, config)
            emit("skip", info)
            continue
        emit("train", info)
        # an interrupted run resumes; a finished one (with force) or one that died before its first checkpoint
        # is replaced: its files are moved aside, never deleted
        resume = (run_dir / "checkpoints").is_dir() and not force
        train_one(config, resume=resume, overwrite=not resume, isolate=isolate)
    rows = [table_row(name, Path(config.output_dir), config) for name, config in configs.items()]
    write_outputs(out, rows, configs, isolated=isolate)
    return out, rows


def compare_folder(raw: dict[str, Any], path: str | Path) -> Path:
    """The comparison's own folder (compare.json, ..., one run folder per method): any folder a run could use,
    except one that holds a single run."""
    out = runfolder.output_folder(raw.get("output_dir", RunConfig.model_fields["output_dir"].default),
                                  config_path=path)
    if entries := runfolder.run_entries(out):
        raise ConfigError(f"output_dir {out} holds a single training run ({', '.join(entries)}), not a comparison: "
                          "give the comparison a folder of its own")
    return out


def method_config(raw: dict[str, Any], name: str, settings: MethodSettings | None, where: str) -> RunConfig:
    """The run config of one compared method: the shared sections, its delta list, its train overrides."""
    settings = settings or MethodSettings()
    delta = {"method": name, **settings.delta}
    get_method(str(delta["method"]))  # an unknown name is an error listing the registered methods
    run = copy.deepcopy(raw)
    run["delta"] = [delta]
    run["train"] = deep_merge(run.get("train") or {}, settings.train)
    run["output_dir"] = str(Path(run.get("output_dir", RunConfig.model_fields["output_dir"].default)) / name)
    config = validate_config(run, where=f"{where} (compare: {name})")
    head = settings.head if settings.head is not None else delta["method"] != "head" and config.task in HEAD_TASKS
    return config.model_copy(update={"delta": [Head(), *config.delta]}) if head else config


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def check_same_config(run_dir: Path, config: RunConfig) -> None:
    """A finished run is reused only if it was trained with the config asked for now."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    wanted = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))
    saved, wanted = flatten(saved), flatten(wanted)
    if changed := sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)):
        raise ConfigError(f"{run_dir} holds a finished run with a different config (changed: "
                          f"{', '.join(changed[:5])}); re-run it with --force, or choose another output_dir")


def train_one(config: RunConfig, *, resume: bool, overwrite: bool, isolate: bool) -> None:
    """Train one method: in a fresh `python -m deltatune train` (its own peak memory), or in this process."""
    run_dir = Path(config.output_dir).expanduser()
    if not isolate:
        from deltatune.run import run_training

        run_training(config, resume=resume, overwrite=overwrite)
        return
    # the method's config goes next to its run folder (a new run must start in a folder without config.yaml)
    config_file = run_dir.with_name(f".{run_dir.name}.config.yaml")
    io.write_text(config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "deltatune", "train", str(config_file),
               "--resume" if resume else "--overwrite"]
    try:
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env={**env, "COLUMNS": "120"},
                                  check=False)
    finally:
        config_file.unlink(missing_ok=True)
    if done.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise DeltaTuneError(f"training {run_dir.name} failed (exit code {done.returncode}): {tail} (log: {log})")


def table_row(name: str, run_dir: Path, config: RunConfig) -> Row:
    res = io.read_json(run_dir / RESULTS)
    metric = res["metric"]
    return Row(method=name, deltas=" + ".join(d.method for d in config.delta), metric=metric,
               test=(res.get("test") or {}).get(metric),
               base=((res.get("baseline") or {}).get("test") or {}).get(metric),
               trainable_params=res["trainable_params"], total_params=res["total_params"],
               trainable_pct=100 * res["trainable_params"] / res["total_params"],
               delta_bytes=(run_dir / "best" / TENSOR_FILE).stat().st_size, wall_time_s=res["wall_time_s"],
               tokens_per_s=res["train_tokens_per_s"], peak_rss_mb=res["peak_rss_mb"], steps=res["steps"])


def write_outputs(out: Path, rows: list[Row], configs: dict[str, RunConfig], *, isolated: bool) -> None:
    """compare.json and compare.csv (the table), compare.png (metric vs trainable %), compare.html (the report)."""
    from deltatune.report import compare_chart, write_compare_report

    io.write_json(out / "compare.json", {"isolated_processes": isolated, "rows": [asdict(r) for r in rows]})
    with io.atomic_path(out / "compare.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with io.atomic_path(out / "compare.png") as tmp:
        tmp.write_bytes(compare_chart(rows))
    write_compare_report(out, rows, configs, isolated=isolated)
