"""`Schema`: base of every config model. Unknown keys are rejected, and invalid values raise one ConfigError
whose keys read like `--set` paths (`train.optimizer.lr`), also when the model is nested in another."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from deltatune.errors import config_error


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = ""  # its key in the run config, used to name errors when built on its own

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.schema_name()) from None

    @classmethod
    def schema_name(cls) -> str:
        """How errors name this section when it is built on its own (e.g. `LoRA(r=0)`)."""
        return cls.section or cls.__name__


def nested(field: str, schema: type[Schema]) -> Any:
    """A before-validator building an optional nested section through its own Schema (a mapping -> `schema(**it)`),
    so its errors name the nested key and list that section's allowed keys. Use as `_x = nested("x", XConfig)`."""
    def build(value: Any) -> Any:
        return schema(**value) if isinstance(value, dict) else value

    return field_validator(field, mode="before")(build)


def one_or_many(*fields: str) -> Any:
    """A before-validator that lets YAML give a single pattern as a plain string (`targets: all-linear` is
    `targets: [all-linear]`); the JSON schema says so too. Use as `_one_pattern = one_or_many("targets")`."""
    def as_list(value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    return field_validator(*fields, mode="before", json_schema_input_type=str | list[str] | None)(as_list)
