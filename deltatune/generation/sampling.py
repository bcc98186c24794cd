"""Text generation with a model (and any attached delta) through Hugging Face `generate` and its KV cache.

Batches are left-padded (what decoder generation needs); greedy decoding at temperature 0, otherwise sampling
with temperature, top-p and top-k, reproducible with a seed. `generate_ids` works on token ids (no tokenizer),
`generate` on text; `on_text` streams one prompt's output as it is generated. Only the token ids of a model
folder's `generation_config.json` take part: beam search, extra sequences, decoding modes fetched from the hub,
cache kinds or watermarks in that file never change what `Sampling` asks for.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from pydantic import Field
from torch import nn
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from deltatune.errors import ConfigError
from deltatune.schema import MAX_COUNT, MAX_LENGTH, MAX_SCALE, MAX_SEED, Schema

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class Sampling(Schema):
    """How new tokens are chosen. Temperature 0 is greedy decoding (top_p and top_k then play no part)."""

    section = "sampling"

    max_new_tokens: int = Field(64, ge=1, le=MAX_LENGTH)
    temperature: float = Field(0.0, ge=0, le=MAX_SCALE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_COUNT)  # 0 = no top-k cut
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_SCALE)  # > 1 discourages tokens already in the text
    # sampling reproducible across calls; the global RNG is left untouched
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = []  # each output ends before the first of these strings

    def generate_kwargs(self) -> dict:
        """Keyword arguments of Hugging Face `generate` for these settings."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty)
        if self.temperature == 0:
            return kwargs | dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs | dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(), *,
                 pad_token_id: int, eos_token_id: int | list[int] | None = None, use_cache: bool = True,
                 tokenizer: PreTrainedTokenizerBase | None = None,
                 streamer: BaseStreamer | None = None) -> list[list[int]]:
    """New token ids for each prompt (ids), generated as one left-padded batch (an encoder-decoder's: right-padded
    encoder inputs), each cut before its first eos.

    With a `tokenizer`, generation of a row also ends once it produced one of `sampling.stop`.
    """
    if not hasattr(model, "generate") or not model.can_generate():
        raise ConfigError(f"{type(model).__name__} cannot generate text: load the model as a causal LM "
                          "(task: text), not with a classification head")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one non-empty prompt")
    width = max(len(p) for p in prompts)
    if (limit := context_length(model)) is not None and width + sampling.max_new_tokens > limit:
        from deltatune.delta import occupied_positions

        taken = f" (with {n} positions taken by the delta's virtual tokens)" if (n := occupied_positions(model)) else ""
        raise ConfigError(f"a prompt of {width} tokens and max_new_tokens={sampling.max_new_tokens} do not fit the "
                          f"model's context of {limit} tokens{taken}; shorten the prompt or lower --max-new-tokens")
    device = next(model.parameters()).device
    # an encoder-decoder's prompt is the encoder's input (right-padded); its output is [start] + the new tokens
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))

    def padded(row: Sequence[int], fill: int) -> list[int]:
        pad = [fill] * (width - len(row))
        return list(row) + pad if encoder_decoder else pad + list(row)

    ids = torch.tensor([padded(p, pad_token_id) for p in prompts], device=device)
    mask = torch.tensor([padded([1] * len(p), 0) for p in prompts], device=device)
    kwargs = sampling.generate_kwargs()
    if tokenizer is not None and sampling.stop:
        kwargs |= dict(stop_strings=sampling.stop, tokenizer=tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=sampling.seed is not None), \
                _token_ids_only(model):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_token_id,
                                 eos_token_id=eos_token_id, use_cache=use_cache, streamer=streamer, **kwargs)
    finally:
        model.train(was_training)
    return [until_eos(row, eos_token_id) for row in out[:, 1 if encoder_decoder else width:].tolist()]


@contextmanager
def _token_ids_only(model: nn.Module) -> Iterator[None]:
    """While generating, the model's generation config holds only its token ids (transformers would otherwise fill
    every setting `Sampling` leaves unset from the model folder's generation_config.json)."""
    saved = getattr(model, "generation_config", None)
    if saved is None:
        yield
        return
    model.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in GENERATION_TOKEN_KEYS})
    try:
        yield
    finally:
        model.generation_config = saved


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             sampling: Sampling = Sampling(), *, add_special_tokens: bool = True,
             on_text: Callable[[str], None] | None = None, use_cache: bool = True) -> list[str]:
    """Completions of `prompts` (text), each cut before the first of `sampling.stop`.

    `add_special_tokens=False` for prompts that already hold them (rendered by a chat template). `on_text`
    receives the output of a single prompt piece by piece while it is generated; the pieces join to the result.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    if on_text is not None and len(prompts) != 1:
        raise ConfigError(f"streaming works on one prompt at a time, got {len(prompts)}")
    eos = eos_ids(model, tokenizer)
    streamer = _TextStream(tokenizer, on_text, sampling.stop, eos) if on_text is not None else None
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    new = generate_ids(model, encoded, sampling, pad_token_id=pad, eos_token_id=eos, use_cache=use_cache,
                       tokenizer=tokenizer, streamer=streamer)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [cut_at_stop(t, sampling.stop) for t in texts]


def context_length(model: nn.Module) -> int | None:
    """The most tokens (prompt + new) the model's position embeddings take, if its config says, less the
    positions attached deltas occupy (prompt tokens, prefixes)."""
    from deltatune.delta import occupied_positions

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if limit is None else limit - occupied_positions(model)


def eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end generation: the tokenizer's eos and those of the model's generation config."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def until_eos(row: list[int], eos_token_id: int | list[int] | None) -> list[int]:
    """`row` up to (not including) its first end-of-sequence token."""
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
    return next((row[:i] for i, t in enumerate(row) if t in eos), row)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(hits)] if hits else text


class _TextStream(BaseStreamer):
    """Hands the decoded new text to `on_text` as tokens arrive, exactly as `generate` will return it.

    The last (longest stop string - 1) characters are held back until more text shows they do not start a stop
    string; a trailing U+FFFD (a multi-byte character still incomplete) waits for its next token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None], stop: list[str],
                 eos: list[int]) -> None:
        self.tokenizer, self.on_text, self.stop, self.eos = tokenizer, on_text, stop, eos
        self.hold = max((len(s) - 1 for s in stop if s), default=0)
        self.ids: list[int] = []
        self.shown = 0
        self.saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.saw_prompt:  # generate passes the prompt first
            self.saw_prompt = True
            return
        self.ids += value.reshape(-1).tolist()
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        full = self.tokenizer.decode(until_eos(self.ids, self.eos), skip_special_tokens=True)
        text = cut_at_stop(full, self.stop)
        end = len(text)
        if not final:
            end = min(end, len(full) - self.hold - full.endswith("\ufffd"))
        if end > self.shown:
            self.on_text(text[self.shown:end])
            self.shown = end
