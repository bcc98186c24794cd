"""SFT records -> conversations: lists of {"role": system|user|assistant, "content": str} messages.

Formats: `messages` (OpenAI style turns with role/content), `sharegpt` (turns with from/value, roles human/gpt)
and `alpaca` (instruction, optional input, output). `data.columns` renames any column or turn key, `data.roles`
maps the data's role names. `detect_format` picks the format of a file (`format: auto`) from its columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deltatune.data.config import Columns, DataConfig
from deltatune.data.load import Table
from deltatune.errors import DataError

Message = dict[str, str]
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
DEFAULT_COLUMNS = {
    "messages": Columns(messages="messages", role="role", content="content", system="system"),
    "sharegpt": Columns(messages="conversations", role="from", content="value", system="system"),
    "alpaca": Columns(instruction="instruction", input="input", output="output", system="system"),
}


class RecordError(ValueError):
    """What is wrong with one record (the caller adds file:line)."""


@dataclass(frozen=True)
class Reader:
    """Reads the records of one chat format with the configured column names and role mapping."""

    format: str
    columns: Columns
    roles: dict[str, str]

    @classmethod
    def of(cls, fmt: str, cfg: DataConfig) -> Reader:
        given = cfg.columns.model_dump(exclude_none=True)
        return cls(fmt, DEFAULT_COLUMNS[fmt].model_copy(update=given), {**ROLES, **cfg.roles})

    def __call__(self, record: dict[str, Any]) -> list[Message]:
        """The conversation of a record, ending with its last assistant turn; RecordError says what is wrong."""
        messages = self.conversation(record)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RecordError(no_value(record, self.columns.output) if self.format == "alpaca" else
                              f"{self.columns.messages!r} has no assistant turn (nothing to learn from)")
        return messages[:last + 1]

    def conversation(self, record: dict[str, Any]) -> list[Message]:
        """All turns of a record, an answer or not (a prompt to generate from); RecordError says what is wrong."""
        messages = self._alpaca(record) if self.format == "alpaca" else self._turns(record)
        system = record.get(self.columns.system)
        if not missing(system) and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": _text(system, self.columns.system)})
        return messages

    def _alpaca(self, record: dict[str, Any]) -> list[Message]:
        c = self.columns
        instruction, extra, output = _required(record, c.instruction), record.get(c.input), record.get(c.output)
        if not missing(extra):
            instruction = f"{instruction}\n\n{_text(extra, c.input)}"
        answer = [] if missing(output) else [{"role": "assistant", "content": _text(output, c.output)}]
        return [{"role": "user", "content": instruction}, *answer]

    def _turns(self, record: dict[str, Any]) -> list[Message]:
        c, turns = self.columns, record.get(self.columns.messages)
        if missing(turns):
            raise RecordError(no_value(record, c.messages))
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"{c.messages!r} must be a non-empty list of turns, got {turns!r:.60}")
        messages = []
        for i, turn in enumerate(turns):
            where = f"{c.messages}[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(f"{where} must be an object with {c.role!r} and {c.content!r}, got {turn!r:.60}")
            role, content = turn.get(c.role), turn.get(c.content)
            for key, value in ((c.role, role), (c.content, content)):
                if missing(value):
                    raise RecordError(f"{where} has no {key!r} (keys: {_present(turn)})")
            if role not in self.roles:
                raise RecordError(f"{where} has role {role!r}; known roles: {', '.join(self.roles)} "
                                  f"(map others with data.roles, e.g. {{{role}: assistant}})")
            if self.roles[role] == "system" and i > 0:
                raise RecordError(f"{where} is a system message after the first turn; put it first")
            messages.append({"role": self.roles[role], "content": _text(content, f"{where}.{c.content}")})
        return messages


def detect_format(table: Table, cfg: DataConfig) -> str:
    """The format of a file: the first of preference, messages, sharegpt, alpaca, text whose columns it has."""
    names = set(table.data.column_names)
    if {cfg.columns.chosen or "chosen", cfg.columns.rejected or "rejected"} <= names:
        return "preference"
    for fmt in ("messages", "sharegpt"):
        c = Reader.of(fmt, cfg).columns
        turn = next((t[0] for t in table.data[c.messages] if t), None) if c.messages in names else None
        if isinstance(turn, dict) and {c.role, c.content} <= turn.keys():
            return fmt
    alpaca = Reader.of("alpaca", cfg).columns
    if {alpaca.instruction, alpaca.output} <= names:
        return "alpaca"
    if cfg.text_column in names:
        return "text"
    raise DataError(
        f"{table.path}: cannot tell the data format from its columns ({', '.join(sorted(names))}); expected "
        "preference (prompt, chosen, rejected), messages (a 'messages' list of role/content turns), sharegpt (a "
        "'conversations' list of from/value turns), "
        f"alpaca (instruction, input, output) or text ({cfg.text_column!r}). Name the format with data.format and "
        "map other column names with data.columns, e.g. {messages: dialog, role: speaker, content: text}")


def missing(value: Any) -> bool:
    """Absent, null, NaN (pandas' empty cell) or an empty string."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def no_value(record: dict[str, Any], key: str) -> str:
    return f"record has no {key!r} (columns: {_present(record)})"


def _required(record: dict[str, Any], key: str) -> str:
    if missing(value := record.get(key)):
        raise RecordError(no_value(record, key))
    return _text(value, key)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _present(record: dict[str, Any]) -> str:
    return ", ".join(k for k, v in record.items() if not missing(v)) or "none"
