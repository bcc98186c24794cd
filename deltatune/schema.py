"""`Schema`: base of every config model. Unknown keys are rejected, and invalid values raise one ConfigError
whose keys read like `--set` paths (`train.optimizer.lr`), also when the model is nested in another."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from deltatune.errors import config_error

# Upper bounds of config numbers: far above any real use, low enough that a typo or a hostile config (r: 1e8,
# num_threads: 1e5) is a ConfigError before anything is allocated.
MAX_WIDTH = 65_536  # ranks, hidden sizes, bottlenecks, virtual tokens, layers to freeze
MAX_LABELS = 100_000  # outputs of a classification head
MAX_BATCH = 65_536  # examples per batch, gradient accumulation
MAX_LENGTH = 1_048_576  # tokens in a sequence, new tokens to generate
MAX_COUNT = 1_000_000_000  # step counts, intervals, epochs, records, top-k
MAX_DEPTH = 1024  # layers of a small network a method adds
MAX_SEED = 2**32 - 1  # numpy's limit (torch and random take it too)
MAX_THREADS = 1024
MAX_SCALE = 1e6  # multipliers, loss weights, norms
MAX_LR = 10.0


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
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


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A list of module patterns (targeting.py's forms); YAML may give a single one as a plain string (`targets:
# all-linear` is `targets: [all-linear]`), and the JSON schema says so too.
_ONE_OR_MANY = BeforeValidator(_as_list, json_schema_input_type=str | list[str])
Patterns = Annotated[list[str], _ONE_OR_MANY]
NonEmptyPatterns = Annotated[list[str], Field(min_length=1), _ONE_OR_MANY]
