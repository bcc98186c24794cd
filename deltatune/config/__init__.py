"""The run config: pydantic models are the schema of the YAML file and of `--set key=value` overrides.

    model: {path: minilm}
    data: {train: rotten_tomatoes, format: classification}
    delta: [{method: lora, r: 8, targets: [query, value]}, {method: head}]
    train: {epochs: 3, batch_size: 32, optimizer: {lr: 5.0e-4}}

Multi-task runs give `tasks:` (each with its own `data:`) instead of `data:`, and optionally `multitask:`
(sampling, loss weighting); see deltatune/train/tasks.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from deltatune.data import DataConfig
from deltatune.delta import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.models.precision import BaseDtype, ComputeDtype
from deltatune.models.quantize import Quantize
from deltatune.generation.config import GenerationEval
from deltatune.registry import parse_delta_config
from deltatune.safety import REMOTE_CODE_FLAG, load_yaml, read_yaml_file
from deltatune.schema import Schema, nested
from deltatune.train import TrainConfig
from deltatune.train.preference import PreferenceConfig
from deltatune.train.tasks import MultiTaskConfig, TaskConfig, check_run_tasks, parse_task_configs

TASK_OF_FORMAT = {"classification": "classification", "regression": "regression", "text": "causal_lm",
                  "auto": "causal_lm", "alpaca": "causal_lm", "sharegpt": "causal_lm", "messages": "causal_lm",
                  "preference": "causal_lm"}


class ModelConfig(Schema):
    """Which pretrained model to start from (a local folder or a packaged alias such as `minilm`)."""

    section = "model"

    path: str = Field(description="a local Hugging Face model folder or a packaged alias (`deltatune models`)",
                      examples=["minilm"])
    dtype: BaseDtype = Field("auto", description="how the frozen base's weights are held: auto = bf16 when no delta "
                             "trains the base weights and the CPU has native bf16 matmuls, compute_dtype is bf16, or "
                             "the fp32 weights would take over half the RAM; else fp32 (float32 / bfloat16: the same "
                             "as fp32 / bf16); trainable tensors stay fp32")
    compute_dtype: ComputeDtype = Field("auto", description="what a bf16 base's matmuls run in: auto = bf16 where the "
                                        "CPU has native bf16 matmuls, else fp32 (bf16 weights upcast layer by layer: "
                                        "half the memory at fp32 speed); bf16 elsewhere is emulated, 100x slower")
    quantize: Quantize | None = Field(None, description="weight-only int8 / int4 quantization of the base's Linear "
                                      "layers (QLoRA-style; needs torchao: pip install 'deltatune[quantize]')")
    trust_remote_code: bool = Field(False, description="run the model folder's own Python code: only together with "
                                                       "--trust-remote-code on the command line")


class RunConfig(Schema):
    """A whole fine-tuning run. Unknown keys anywhere are errors that list the allowed keys."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def schema_name(cls) -> str:
        return ""

    model: ModelConfig = Field(description="the pretrained model to start from")
    data: DataConfig | None = Field(None, description="the data of a single-task run (or `tasks:` instead)",
                                    examples=[{"train": "rotten_tomatoes"}])
    delta: list[DeltaConfig] = Field(description="the methods to attach, in order, each `{method: NAME, ...}` "
                                                 "(`deltatune methods` lists them)")
    train: TrainConfig = Field(TrainConfig(), description="how to train")
    output_dir: str = Field("runs/run", description="the run folder: logs, checkpoints, best/, report.html")
    eval_generation: GenerationEval | None = Field(
        None, description="after training: exact match / ROUGE-L of generated answers")
    tasks: list[TaskConfig] | None = Field(None, description="multi-task training: instead of `data`")
    multitask: MultiTaskConfig | None = Field(None, description="with `tasks`: sampling and loss weighting")
    preference: PreferenceConfig | None = Field(None, description="with data.format preference: the objective "
                                                                  "(DPO or SimPO) and its settings")

    @field_validator("delta", mode="before")
    @classmethod
    def _parse_deltas(cls, value: Any) -> list[DeltaConfig]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError("give at least one method, e.g. [{method: lora, r: 8}]")
        return [item if isinstance(item, DeltaConfig) else parse_delta_config(item, where=str(i))
                for i, item in enumerate(items)]

    _parse_tasks = field_validator("tasks", mode="before")(parse_task_configs)

    _multitask_schema = nested("multitask", MultiTaskConfig)
    _preference_schema = nested("preference", PreferenceConfig)

    @model_validator(mode="after")
    def _data_or_tasks(self) -> RunConfig:
        if (self.data is None) == (self.tasks is None):
            raise ValueError("give either `data:` (one task) or `tasks:` (a list of tasks, each with its own data)")
        if self.tasks is None and self.multitask is not None:
            raise ValueError("`multitask:` goes with `tasks:`; remove it or list the tasks")
        if self.tasks is not None and self.eval_generation is not None:
            raise ValueError("eval_generation goes with a single-task `data:` run, not with `tasks:`")
        if self.preference is not None and (self.data is None or self.data.format not in ("preference", "auto")):
            raise ValueError(f"`preference:` sets the objective of preference pairs; it needs data.format: preference "
                             f"(or auto), not {'tasks' if self.data is None else self.data.format}")
        if self.data is not None and self.data.format == "preference":
            self.preference = self.preference or PreferenceConfig()
        if self.tasks is not None:
            self.multitask = self.multitask or MultiTaskConfig()
            check_run_tasks(self.tasks, self.multitask, self.delta)
        if self.model.quantize and (dense := [d for d in self.delta if d.needs_dense_base()]):
            raise ValueError(f"model.quantize: {dense[0].method} {dense[0].needs_dense_base()}; remove model.quantize "
                             "or use a method that leaves the base weights as they are (e.g. lora with init kaiming)")
        self._check_precision()
        return self

    def _check_precision(self) -> None:
        """model.dtype with model.compute_dtype: combinations that fail on every CPU are refused here."""
        from deltatune.models.precision import resolve_base_precision

        try:  # native bf16 assumed: what is refused there is refused everywhere
            resolve_base_precision(self.model.dtype, self.model.compute_dtype, trained_by=self.base_trained_by,
                                   bf16_native=True)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @property
    def base_trained_by(self) -> str | None:
        """The first delta method that trains the base model's own weights (then `model.dtype: auto` keeps fp32)."""
        return next((d.method for d in self.delta if d.trains_base), None)

    def base_precision(self) -> dict[str, str]:
        """How the base loads: `load_model`'s dtype and compute_dtype names (fp32 / bf16 / ...), `auto` resolved for
        this CPU and model (an fp32 base keeps the setting: fp32 asked for also keeps train.precision auto at fp32);
        ConfigError for a combination that cannot work."""
        from deltatune.models.assets import resolve_model_path
        from deltatune.models.precision import DTYPE_NAMES, resolve_base_precision, stored_fp32_bytes

        storage, compute = resolve_base_precision(
            self.model.dtype, self.model.compute_dtype, trained_by=self.base_trained_by,
            fp32_bytes=lambda: stored_fp32_bytes(resolve_model_path(self.model.path)))
        dtype = DTYPE_NAMES[storage]
        return {"dtype": dtype, "compute_dtype": DTYPE_NAMES[compute] if dtype == "bf16" else self.model.compute_dtype}

    @property
    def task(self) -> str:
        """The model class to load: for multi-task runs a causal LM if a task is text, else classification."""
        if self.tasks is not None:
            return "causal_lm" if any(TASK_OF_FORMAT[t.data.format] == "causal_lm" for t in self.tasks) \
                else "classification"
        return TASK_OF_FORMAT[self.data.format]

    def data_configs(self) -> dict[str, DataConfig]:
        """Every data section by its key path (`data`, or `tasks.0.data`, ...)."""
        if self.tasks is None:
            return {"data": self.data}
        return {f"tasks.{i}.data": t.data for i, t in enumerate(self.tasks)}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for writing back to YAML (the resolved config saved with every run)."""
        out = self.model_dump(mode="json", exclude={"delta"})
        optional = {k: out[k] for k in ("tasks", "multitask", "eval_generation", "preference") if out[k] is not None}
        return {"model": out["model"], **({"data": out["data"]} if self.data is not None else {}),
                "delta": [d.to_dict() for d in self.delta], "train": out["train"], "output_dir": self.output_dir,
                **optional}


def load_config(path: str | Path, overrides: list[str] = (), *, trust_remote_code: bool = False) -> RunConfig:
    """Read a YAML config, apply `key.sub=value` overrides, and validate it (one ConfigError if anything is off).
    `trust_remote_code` is the caller's explicit permission to run code from the model folder (see
    `allow_remote_code`); a config file alone never grants it."""
    return validate_config(read_config(path, overrides), where=str(path), trust_remote_code=trust_remote_code)


def read_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML mapping of a config file with `key.sub=value` overrides applied, not validated yet."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys model, data, delta, train; got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


def validate_config(raw: dict[str, Any], where: str = "config", *, trust_remote_code: bool = False,
                    files: bool = True) -> RunConfig:
    """The RunConfig of plain data; `trust_remote_code` as in `load_config`. `files=False` leaves out
    `check_files` (a finished run reopened to generate needs none of its data files)."""
    if bad := non_string_keys(raw):
        raise ConfigError(f"{where}: keys must be names; {', '.join(bad)} is not (quote it, or fix the indentation)")
    try:
        config = RunConfig(**raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if files:
        check_files(config)
    return allow_remote_code(config, trust_remote_code, where)


def allow_remote_code(config: RunConfig, allowed: bool, where: str) -> RunConfig:
    """`config` with model.trust_remote_code set to `allowed`, the permission given on this command's line (or by
    the library caller). A file asking for remote code without that permission is refused: a config or run folder
    someone shared is data and must not be able to run code."""
    if config.model.trust_remote_code and not allowed:
        raise ConfigError(f"{where}: model.trust_remote_code is true, but a config file cannot switch on code "
                          f"from the model folder; pass {REMOTE_CODE_FLAG} on the command line (library: "
                          "the trust_remote_code argument) if you trust that model, or remove the setting")
    return config.model_copy(update={"model": config.model.model_copy(update={"trust_remote_code": allowed})})


def non_string_keys(node: Any, path: str = "") -> list[str]:
    """Paths of the keys that are not strings (YAML reads `1:` or `true:` as a number / boolean) in nested data."""
    if isinstance(node, dict):
        bad = [f"{path}{k}" for k in node if not isinstance(k, str)]
        return bad + [p for k, v in node.items() for p in non_string_keys(v, f"{path}{k}.")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in non_string_keys(v, f"{path}{i}.")]
    return []


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in nested dicts/lists; the value is parsed as YAML (so 3 is an int, [a, b] a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=1")
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        if isinstance(node, list):
            node = node[_index(part, node, key)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    value = load_yaml(text, where=f"--set {key}: the value") if text else ""
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def check_files(config: RunConfig) -> None:
    """Fail before any heavy work if a named file or folder does not exist (packaged aliases are fine)."""
    _check_paths(config)
    _check_generation_eval(config)


def _check_paths(config: RunConfig) -> None:
    from deltatune.models.assets import PACKAGED_DATASETS, PACKAGED_MODELS

    if config.model.path not in PACKAGED_MODELS and not Path(config.model.path).is_dir():
        raise ConfigError(f"model.path: folder {config.model.path!r} not found "
                          f"(give a local model folder or one of: {', '.join(PACKAGED_MODELS)})")
    for key, data in config.data_configs().items():
        for split in ("train", "validation", "test"):
            value = getattr(data, split)
            if value is not None and value not in PACKAGED_DATASETS and not Path(value).is_file():
                raise ConfigError(f"{key}.{split}: file {value!r} not found "
                                  f"(give a data file or one of: {', '.join(PACKAGED_DATASETS)})")


def _check_generation_eval(config: RunConfig) -> None:
    """`eval_generation` needs a text-generating run and an existing held-out file."""
    from deltatune.models.assets import PACKAGED_DATASETS

    if config.eval_generation is None:
        return
    if config.task != "causal_lm":
        raise ConfigError(f"eval_generation: generating answers needs a causal-LM run, not {config.task} "
                          f"(data.format: {config.data.format})")
    held_out = config.eval_generation.file
    if held_out not in PACKAGED_DATASETS and not Path(held_out).is_file():
        raise ConfigError(f"eval_generation.file: file {held_out!r} not found")
