"""DataConfig: which files to read, how to split them, and how records become examples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from deltatune.schema import Schema


class DataConfig(Schema):
    """The `data:` section of a run config. Invalid values raise ConfigError."""

    section = "data"

    train: str
    validation: str | None = None
    test: str | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    format: Literal["classification", "regression", "text"] = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    max_length: int = Field(256, gt=0)  # lowered to the model's maximum when that is smaller
    truncation: Literal["warn", "error", "silent"] = "warn"  # what longer records do (see truncation.py)
    limit: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6 or self.split[0] == 0:
            raise ValueError(f"split {self.split} must be three non-negative fractions (train, validation, test) "
                             "that sum to 1, with train > 0")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels {self.labels} must be a non-empty list without duplicates")
        return self
