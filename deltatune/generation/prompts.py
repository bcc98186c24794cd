"""Prompts for generation and generation-based evaluation: read from files, rendered with a chat template.

A prompt file is `.txt` (one prompt per line; blank lines are skipped) or a data file (.jsonl/.json/.csv/
.parquet) whose records hold a `prompt` (plus an optional `reference`) or `messages` (role/content; a final
assistant turn is the reference answer, not part of the prompt); records in the training formats sharegpt
(`conversations`) and alpaca (`instruction`, `input`, `output`) are read as training reads them. An optional
`adapter` names the delta a record is generated with when several are attached (mixed-adapter batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.data.chat import TEMPLATE_FILE
from deltatune.errors import CheckpointError, ConfigError, DataError
from deltatune.safety import inside

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_TEMPLATE_BYTES = 1 << 20  # real chat templates are a few kilobytes
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: plain `text` or chat `messages`, with the reference answer when the file gives one."""

    where: str  # file:line, for error messages
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    reference: str | None = None
    adapter: str | None = None  # the delta to generate with, by name (mixed-adapter batches)

    def to_dict(self) -> dict[str, Any]:
        """The prompt as it appears in output files."""
        prompt = {"prompt": self.text} if self.messages is None else {"messages": list(self.messages)}
        return prompt | {key: value for key in ("reference", "adapter") if (value := getattr(self, key)) is not None}


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """The prompts of a file (the first `limit`); one DataError naming file and line for a bad record."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        records = _read_text_prompts(path)
    else:
        from deltatune.data.load import read_table

        table = read_table(path)
        records = [_record(table.data[i], table.where(i)) for i in range(len(table.data))]
    if not records:
        raise DataError(f"{path}: no prompts; write one prompt per line")
    return records[:limit] if limit else records


def output_rows(records: list[PromptRecord], outputs: list[str], base: list[str] | None = None) -> list[dict]:
    """One JSON-ready row per prompt: the prompt (and reference), its `output`, and the `base` model's if given."""
    return [r.to_dict() | {"output": o} | ({"base": base[i]} if base is not None else {})
            for i, (r, o) in enumerate(zip(records, outputs))]


def saved_template(*folders: Path | None) -> str | None:
    """The chat template saved in the first of `folders` that has one (see TEMPLATE_FILE). It must be a file inside
    that folder, of a template's size, in UTF-8 (else CheckpointError); it is rendered sandboxed, as in training."""
    for folder in folders:
        if folder is not None and (folder / TEMPLATE_FILE).is_file():
            file = inside(folder, TEMPLATE_FILE, str(folder))
            if file.stat().st_size > MAX_TEMPLATE_BYTES:
                raise CheckpointError(f"{file} is {file.stat().st_size:,} bytes, too large for a chat template "
                                      f"(at most {MAX_TEMPLATE_BYTES:,}); restore it or pass --template")
            try:
                return file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CheckpointError(f"{file} is not UTF-8 text ({exc}); restore it or pass --template") from None
    return None


def chat_template(tokenizer: PreTrainedTokenizerBase, saved: str | None = None) -> str:
    """The `saved` template (what training used), else the tokenizer's own; an error if there is neither."""
    if saved:
        return saved
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template and none was saved with the run: pass --template "
                          "chatml | llama3 | alpaca (or a jinja file), or train with a chat format (it saves "
                          "chat_template.jinja)")
    from deltatune.data.chat import resolve_template

    return resolve_template(tokenizer)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str) -> str:
    """`messages` as prompt text ending where the assistant's reply starts, rendered exactly as in training."""
    from deltatune.data.chat import render
    from deltatune.data.conversations import RecordError

    try:
        return render(messages, template, tokenizer, add_generation_prompt=True)
    except RecordError as e:
        raise ConfigError(f"{e} (messages: {messages!r:.120})") from None


def chat_messages(record: PromptRecord, system: str | None = None) -> list[dict[str, str]]:
    """The record as chat messages (a plain prompt is one user turn), with `system` first unless it has one."""
    messages = list(record.messages) if record.messages else [{"role": "user", "content": record.text or ""}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _read_text_prompts(path: Path) -> list[PromptRecord]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [PromptRecord(f"{path}:{n}", text=line) for n, line in enumerate(lines, 1) if line.strip()]


def _record(row: dict[str, Any], where: str) -> PromptRecord:
    messages, prompt, reference = row.get("messages"), row.get("prompt"), row.get("reference")
    adapter = row.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
        raise DataError(f"{where}: 'adapter' must be the name of a delta, got {adapter!r}")
    if messages is None and prompt is None and (fmt := _sft_format(row)):
        messages = _sft_messages(row, fmt, where)
    if messages is not None:
        messages = _check_messages(messages, where)
        if messages[-1]["role"] == "assistant":
            *messages, last = messages
            reference = last["content"]
        if not messages:
            raise DataError(f"{where}: 'messages' holds only the assistant's answer; add the user turn before it")
        return PromptRecord(where, messages=tuple(messages), reference=reference, adapter=adapter)
    if not isinstance(prompt, str) or not prompt.strip():
        present = ", ".join(k for k, v in row.items() if v is not None)
        raise DataError(f"{where}: record needs a non-empty 'prompt' text or a 'messages' list (has: {present})")
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: 'reference' must be text, got {reference!r}")
    return PromptRecord(where, text=prompt, reference=reference, adapter=adapter)


def _sft_format(row: dict[str, Any]) -> str | None:
    """The training format of a record without `prompt` or `messages`: sharegpt or alpaca (default columns)."""
    return "sharegpt" if row.get("conversations") is not None else "alpaca" if "instruction" in row else None


def _sft_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """The record's turns (a final assistant turn is the reference), read with the training format's columns."""
    from deltatune.data.conversations import DEFAULT_COLUMNS, ROLES, Reader, RecordError

    try:
        return Reader(fmt, DEFAULT_COLUMNS[fmt], ROLES).conversation(row)
    except RecordError as e:
        raise DataError(f"{where}: {e}") from None


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must have a role ({', '.join(ROLES)}) and a content text, "
                            f"got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
