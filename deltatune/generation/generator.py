"""A causal LM ready to generate: a base model, an optional saved delta (merged or not), and the chat template the
delta was trained with. Used by `deltatune generate`, `chat` and generation-based evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from deltatune.delta import DeltaBase
from deltatune.errors import ConfigError, DataError
from deltatune.generation.sampling import Sampling, context_length, generate
from deltatune.generation.prompts import PromptRecord, chat_messages, chat_template, render_chat, saved_template


@dataclass
class Generator:
    """Base model + tokenizer, the saved delta to attach (`delta_dir`) and the run's saved chat template, if any;
    or several saved LoRA deltas (`mixed`, name -> folder) attached side by side, each prompt generated with the
    delta its record names in `adapter`."""

    model: nn.Module
    tokenizer: Any
    delta_dir: Path | None = None
    template: str | None = None  # saved with the run: what training used; None = the tokenizer's own
    delta: DeltaBase | None = field(default=None, repr=False)
    mixed: dict[str, Path] = field(default_factory=dict)
    name: str | None = None  # of the one delta, as records name it in `adapter` (default: from its folder)

    def attach_delta(self, merge: bool = False) -> None:
        """Load the saved delta onto the model; `merge` folds it into the base weights."""
        import deltatune

        if self.mixed:
            if merge:
                raise ConfigError("--merge folds one delta into the base weights, but with several --delta each "
                                  "prompt uses its own: drop --merge, or combine the deltas first with merge-deltas")
            from deltatune.generation.mixed import attach_mixed

            self.delta = attach_mixed(self.model, self.mixed)
            return
        if self.delta_dir is None:
            if merge:
                raise ConfigError("--merge needs a delta: give --run or --delta")
            return
        self.delta = deltatune.load(self.model, self.delta_dir)
        if merge:
            self.delta.merge()

    def detach_delta(self) -> None:
        """Back to the base model, bit for bit."""
        if self.delta is not None:
            self.delta.detach()
            self.delta = None

    def chat_template(self) -> str:
        """The template prompts are rendered with: the one saved with the run, else the tokenizer's."""
        return chat_template(self.tokenizer, self.template)

    def prompt_text(self, record: PromptRecord, chat: bool, system: str | None = None) -> str:
        """The text the model continues: the record itself, or its messages rendered by the chat template."""
        if not chat and record.messages is None:
            return record.text or ""
        return render_chat(self.tokenizer, chat_messages(record, system), self.chat_template())

    def use_chat(self, chat: bool | None, records: list[PromptRecord]) -> bool:
        """Whether prompts go through the chat template: as asked, else when the run saved its template (an SFT
        run) or a record holds messages."""
        has_messages = any(r.messages is not None for r in records)
        if chat is False and has_messages:
            where = next(r.where for r in records if r.messages is not None)
            raise ConfigError(f"{where}: 'messages' records need the chat template; drop --no-chat")
        return chat if chat is not None else self.template is not None or has_messages

    def complete(self, records: list[PromptRecord], sampling: Sampling, *, chat: bool | None = None,
                 system: str | None = None, batch_size: int = 8, on_text: Callable[[str], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> list[str]:
        """Outputs for `records`, generated in batches of `batch_size` (`on_text` streams a single record;
        `on_batch(done, total)` is called after each batch)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be 1 or more, got {batch_size}")
        chat = self.use_chat(chat, records)
        routes = self.routes(records)
        texts = [self.prompt_text(r, chat, system) for r in records]
        outputs: list[str] = []
        for i in range(0, len(texts), batch_size):
            if routes is not None:
                self.delta.route(routes[i:i + batch_size])  # type: ignore[union-attr]
            outputs += generate(self.model, self.tokenizer, texts[i:i + batch_size], sampling,
                                add_special_tokens=not chat, on_text=on_text)
            if on_batch is not None:
                on_batch(len(outputs), len(texts))
        return outputs


    def routes(self, records: list[PromptRecord]) -> list[str] | None:
        """The delta name of every record when several deltas are attached side by side (each record must name one
        of them); None otherwise. With one delta attached, a record may name only that one."""
        if self.delta is None or not (self.mixed or self.delta_dir):
            return None  # the base model (the records' adapters take no part), or a delta without a folder
        names = list(self.mixed) or [self.name or delta_name(self.delta_dir)]  # type: ignore[arg-type]
        for record in records:
            if record.adapter is None and self.mixed:
                raise DataError(f"{record.where}: the prompt names no adapter; with several --delta every prompt "
                                f"names its delta in an 'adapter' field (one of: {', '.join(names)})")
            if record.adapter is not None and record.adapter not in names:
                raise DataError(f"{record.where}: unknown adapter {record.adapter!r}; the deltas given are: "
                                f"{', '.join(names)} (name a delta as --delta NAME=FOLDER)")
        return [r.adapter for r in records] if self.mixed else None  # type: ignore[misc]


def delta_name(folder: Path) -> str:
    """The name a delta folder goes by in an `adapter` field: its folder's name (a run's best/: the run's)."""
    folder = Path(folder)
    return folder.resolve().parent.name if folder.name == "best" else folder.name


def named_deltas(specs: Sequence[str | Path]) -> dict[str, Path]:
    """Delta folders by name, from `--delta` values `NAME=FOLDER` or `FOLDER` (named by `delta_name`)."""
    named: dict[str, Path] = {}
    for spec in map(str, specs):
        name, sep, folder = spec.partition("=")
        if not (sep and re.fullmatch(r"[\w.-]+", name)):
            name, folder = delta_name(Path(spec)), spec
        if name in named:
            raise ConfigError(f"two deltas are named {name!r} ({named[name]}, {folder}): name them apart with "
                              "--delta NAME=FOLDER")
        named[name] = Path(folder)
    return named


def open_generator(*, run: str | Path | None = None, model: str | None = None,
                   delta: str | Path | Sequence[str | Path] | None = None,
                   template: str | None = None, attach: bool = True, merge: bool = False,
                   trust_remote_code: bool = False) -> Generator:
    """Load a run's base model and best delta, or `model` (folder or alias) and an optional `delta` folder; several
    `delta` folders (`NAME=FOLDER` or `FOLDER`, see `named_deltas`) attach side by side: each prompt's record names
    its delta in `adapter` (LoRA deltas only).

    `template` (a shipped name, a .jinja file or inline jinja) replaces the saved chat template. `attach=False`
    leaves the delta unloaded (call `attach_delta` later, e.g. after generating with the base).
    `trust_remote_code` allows code from the model folder (a run's config.yaml cannot). `merge` (now, or later by
    `attach_delta(merge=True)`) loads a quantized run's base unquantized.
    """
    from deltatune.models.load import load_model
    from deltatune.runs.run import Run

    if (run is None) == (model is None):
        raise ConfigError("give either a run folder or a model")
    deltas = named_deltas([delta] if isinstance(delta, (str, Path)) else delta or [])
    if run is not None:
        if deltas:
            raise ConfigError("--delta goes with --model; a --run already has its delta (best/)")
        trained = Run.open(run, trust_remote_code=trust_remote_code).causal_lm()
        model, options, saved = trained.config.model.path, trained.base_options(), trained.template
        if merge:  # merging needs real weights: a quantized run's base as its checkpoint stores it
            options["quantize"] = None
        deltas = {delta_name(trained.best): trained.best}
    else:
        options = dict(trust_remote_code=trust_remote_code)
        saved = _saved_template(deltas) if template is None else None
    base, tokenizer = load_model(model, "causal_lm", **options)
    if template is not None:
        saved = _template_option(tokenizer, template)
    (name, folder), = deltas.items() if len(deltas) == 1 else [(None, None)]
    generator = Generator(base, tokenizer, folder, saved, mixed=deltas if len(deltas) > 1 else {}, name=name)
    if attach:
        generator.attach_delta(merge)
    return generator


def _saved_template(deltas: dict[str, Path]) -> str | None:
    """The chat template saved with the deltas (one template for all of them: prompts are rendered before they
    are routed)."""
    templates = {name: saved_template(folder) for name, folder in deltas.items()}
    if len(set(templates.values())) > 1:
        raise ConfigError("the deltas were trained with different chat templates (" + ", ".join(
            f"{name}: {'its own' if t else 'none saved'}" for name, t in templates.items()) + "); every prompt of a "
            "mixed batch is rendered with one: pass --template")
    return next(iter(templates.values()), None)


def _template_option(tokenizer: Any, template: str) -> str:
    """The jinja source `--template` names: a shipped template, a .jinja file or inline jinja."""
    from deltatune.data.chat import resolve_template

    if template.endswith(".jinja"):
        if not Path(template).is_file():
            raise ConfigError(f"--template: no such file {template!r}")
        template = Path(template).read_text(encoding="utf-8")
    return resolve_template(tokenizer, template, option="--template")


class Conversation:
    """A multi-turn chat: every reply sees the whole history rendered by the chat template.

    When the history no longer fits the model's context (prompt + max_new_tokens), the oldest turns are dropped
    (a system prompt stays).
    """

    def __init__(self, generator: Generator, sampling: Sampling, system: str | None = None) -> None:
        generator.chat_template()  # fail now, not at the first message, if there is none
        self.generator, self.sampling, self.system = generator, sampling, system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to `text`; `on_text` receives it piece by piece while it is generated."""
        self.messages.append({"role": "user", "content": text})
        self._fit_context()
        record = PromptRecord("chat", messages=tuple(self.messages))
        try:
            answer = self.generator.complete([record], self.sampling, chat=True, on_text=on_text)[0]
        except BaseException:  # e.g. Ctrl-C while streaming: the unanswered message leaves the history
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _prompt_tokens(self) -> int:
        record = PromptRecord("chat", messages=tuple(self.messages))
        text = self.generator.prompt_text(record, chat=True)
        return len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit_context(self) -> None:
        limit = context_length(self.generator.model)
        if limit is None:
            return
        first = 1 if self.system else 0
        while self._prompt_tokens() + self.sampling.max_new_tokens > limit:
            if len(self.messages) - first <= 1:  # only the new message is left
                self.messages.pop()
                raise ConfigError(f"the message is too long: it and {self.sampling.max_new_tokens} new tokens do "
                                  f"not fit the model's context of {limit} tokens; shorten it or lower "
                                  "--max-new-tokens")
            del self.messages[first:first + 2]  # the oldest user turn and its answer
