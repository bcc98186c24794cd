"""The `eval_generation:` section of a run config: plain schema, no generation code (config/ imports it)."""

from __future__ import annotations

from pydantic import Field

from deltatune.schema import MAX_BATCH, MAX_COUNT, MAX_LENGTH, Schema


class GenerationEval(Schema):
    """`eval_generation:` after training, score greedy outputs on `file` (prompts with references), for the
    fine-tuned model and (when the run evaluates a baseline) the base model; written to results.json."""

    section = "eval_generation"

    file: str = Field(description=".jsonl/.json/.csv/.parquet (or a packaged alias): prompt + reference, or "
                                  "messages ending with the assistant's answer", examples=["held_out.jsonl"])
    skip: int = Field(0, ge=0, le=MAX_COUNT,
                      description="records to pass over first (e.g. those the training data took from "
                                  "the same file)")
    limit: int | None = Field(None, gt=0, le=MAX_COUNT, description="then N records at most")
    max_new_tokens: int = Field(64, ge=1, le=MAX_LENGTH, description="longest answer, in tokens (greedy decoding)")
    stop: list[str] = Field([], description="cut each answer at the first of these strings")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="prompts generated together")
    system: str | None = Field(None, description="system prompt for records without one")
