"""The run config: pydantic models are the schema of the YAML file and of `--set key=value` overrides.

    model: {path: minilm}
    data: {train: rotten_tomatoes, format: classification}
    delta: [{method: lora, r: 8, targets: [query, value]}, {method: head}]
    train: {epochs: 3, batch_size: 32, optimizer: {lr: 5.0e-4}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, field_validator

from deltatune.data import DataConfig
from deltatune.delta import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.registry import parse_delta_config
from deltatune.schema import Schema
from deltatune.train import TrainConfig

TASK_OF_FORMAT = {"classification": "classification", "regression": "regression", "text": "causal_lm",
                  "auto": "causal_lm", "alpaca": "causal_lm", "sharegpt": "causal_lm", "messages": "causal_lm"}


class ModelConfig(Schema):
    """Which pretrained model to start from (a local folder or a packaged alias such as `minilm`)."""

    section = "model"

    path: str
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False


class RunConfig(Schema):
    """A whole fine-tuning run. Unknown keys anywhere are errors that list the allowed keys."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def schema_name(cls) -> str:
        return ""

    model: ModelConfig
    data: DataConfig
    delta: list[DeltaConfig]
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/run"

    @field_validator("delta", mode="before")
    @classmethod
    def _parse_deltas(cls, value: Any) -> list[DeltaConfig]:
        items = value if isinstance(value, list) else [value]
        return [item if isinstance(item, DeltaConfig) else parse_delta_config(item, where=str(i))
                for i, item in enumerate(items)]

    @property
    def task(self) -> str:
        return TASK_OF_FORMAT[self.data.format]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for writing back to YAML (the resolved config saved with every run)."""
        out = self.model_dump(mode="json", exclude={"delta"})
        return {"model": out["model"], "data": out["data"], "delta": [d.to_dict() for d in self.delta],
                "train": out["train"], "output_dir": self.output_dir}


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `key.sub=value` overrides, and validate it (one ConfigError if anything is off)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys model, data, delta, train; got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, where=str(path))


def validate_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    try:
        config = RunConfig(**raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_paths(config)
    return config


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
    value = yaml.safe_load(text) if text else ""
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _check_paths(config: RunConfig) -> None:
    """Fail before any heavy work if a named file or folder does not exist (packaged aliases are fine)."""
    from deltatune.assets import PACKAGED_DATASETS, PACKAGED_MODELS

    if config.model.path not in PACKAGED_MODELS and not Path(config.model.path).is_dir():
        raise ConfigError(f"model.path: folder {config.model.path!r} not found "
                          f"(give a local model folder or one of: {', '.join(PACKAGED_MODELS)})")
    for split in ("train", "validation", "test"):
        value = getattr(config.data, split)
        if value is not None and value not in PACKAGED_DATASETS and not Path(value).is_file():
            raise ConfigError(f"data.{split}: file {value!r} not found "
                              f"(give a data file or one of: {', '.join(PACKAGED_DATASETS)})")
