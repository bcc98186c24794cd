"""Chat templates and prompt-loss masking: conversations -> token ids with labels only on assistant turns.

The template is the tokenizer's own `chat_template`, a named one shipped here (TEMPLATES, for tokenizers without
one) or inline jinja (`resolve_template`). A conversation is rendered to text once and tokenized once (exactly the
ids `apply_chat_template` gives at generation time); the assistant turns are character spans of that text, found
from the template's `{% generation %}` blocks when it has them, otherwise by rendering the conversation prefix by
prefix: the text a turn adds after the generation prompt (`add_generation_prompt=True`) of the turns before it.
A token is an assistant token when its characters overlap such a span. The run saves the template it trained with
as `chat_template.jinja` (TEMPLATE_FILE) in the run folder and in `best/`, for generation and chat.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

import jinja2
from datasets import Dataset
from transformers.utils.chat_template_utils import render_jinja_template

from deltatune.data.conversations import Message, RecordError
from deltatune.data.truncation import FULL_LENGTH
from deltatune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_FILE = "chat_template.jinja"
Span = tuple[int, int]

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "alpaca": (
        "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
        "{%- set turns = messages[1:] %}"
        "{%- else %}{{- 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\\n\\n' }}"
        "{%- set turns = messages %}{%- endif %}"
        "{%- for message in turns %}"
        "{%- if message['role'] == 'assistant' %}{{- '### Response:\\n' }}"
        "{% generation %}{{- message['content'] + eos_token + '\\n\\n' }}{% endgeneration %}"
        "{%- else %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"),
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve_template(tokenizer: PreTrainedTokenizerBase, name_or_jinja: str | None = None,
                     option: str = "data.chat_template") -> str:
    """The jinja source of a chat template: a TEMPLATES name, inline jinja, or (None) the tokenizer's own.
    Errors name the setting it came from (`option`)."""
    if name_or_jinja is None:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise ConfigError(f"the tokenizer has no chat template: set {option} to one of "
                              f"{', '.join(TEMPLATES)} or to an inline jinja template")
        return own
    if name_or_jinja in TEMPLATES:
        return TEMPLATES[name_or_jinja]
    if "{{" not in name_or_jinja and "{%" not in name_or_jinja:
        raise ConfigError(f"{option}: unknown template {name_or_jinja!r}; use one of "
                          f"{', '.join(TEMPLATES)}, an inline jinja template, or leave it unset (the tokenizer's own)")
    try:
        render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], name_or_jinja, tokenizer)
    except RecordError as e:
        raise ConfigError(f"{option}: the inline template does not render a simple conversation ({e})") \
            from None
    return name_or_jinja


def render(messages: list[Message], template: str, tokenizer: PreTrainedTokenizerBase,
           add_generation_prompt: bool = False) -> str:
    """The text of a conversation, as `tokenizer.apply_chat_template(..., tokenize=False)` renders it."""
    return _render(messages, template, tokenizer, add_generation_prompt)[0]


def assistant_spans(messages: list[Message], template: str,
                    tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant turns (see the module docstring)."""
    if _GENERATION_TAG.search(template):
        return _render(messages, template, tokenizer, False, spans=True)
    text, spans = render(messages, template, tokenizer), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], template, tokenizer, True), render(messages[:i + 1], template, tokenizer)
        if not (end.startswith(start) and text.startswith(end)):
            raise RecordError(
                f"the chat template renders the conversation cut after turn {i} differently from the whole one, so "
                "the assistant turns cannot be located; use a template with {% generation %} blocks or one of "
                f"{', '.join(TEMPLATES)} (data.chat_template)")
        spans.append((len(start), len(end)))
    return text, spans


def encode_conversations(conversations: list[list[Message]], tokenizer: PreTrainedTokenizerBase, template: str,
                         max_length: int, train_on_prompt: bool = False,
                         where: Callable[[int], str] = "conversation {}".format) -> Dataset:
    """Token ids (truncated to max_length) with labels = ids on assistant tokens and -100 elsewhere (all tokens
    with `train_on_prompt`), one example per conversation. A conversation cut before its assistant turns keeps no
    target (`has_targets`); prepare_data drops those after applying data.truncation.

    A conversation the template cannot render (or locate the assistant turns of) is a DataError at `where(i)`."""
    if not tokenizer.is_fast:
        raise ConfigError(f"chat formats need a fast tokenizer (character offsets); {type(tokenizer).__name__} "
                          "is a slow one: load it with use_fast=True or convert it")
    rendered = []
    for i, messages in enumerate(conversations):
        try:
            rendered.append(assistant_spans(messages, template, tokenizer))
        except RecordError as e:
            raise DataError(f"{where(i)}: {e}") from None
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], FULL_LENGTH: []}
    for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
        rows[FULL_LENGTH].append(len(ids))  # for data.truncation (see truncation.py)
        ids = ids[:max_length]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(list(ids) if train_on_prompt else [
            t if any(s < b and e > a for a, b in spans) else -100 for t, (s, e) in zip(ids, offsets)])
    return Dataset.from_dict(rows)


def has_targets(labels: list[int]) -> bool:
    """Whether an encoded conversation has a token to learn (the first token is never a target)."""
    return any(label != -100 for label in labels[1:])


def _render(messages: list[Message], template: str, tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool,
            spans: bool = False) -> tuple[str, list[Span]]:
    kwargs: dict[str, Any] = dict(tokenizer.special_tokens_map)  # bos_token, eos_token, ... as apply_chat_template
    try:
        texts, indices = render_jinja_template(conversations=[messages], chat_template=template,
                                               add_generation_prompt=add_generation_prompt,
                                               return_assistant_tokens_mask=spans, **kwargs)
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
        # the template is untrusted input, rendered in jinja's sandbox: whatever it raises is its failure
        raise RecordError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None
    return texts[0], [tuple(span) for span in indices[0]] if spans else []
