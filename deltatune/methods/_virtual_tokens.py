"""Virtual tokens in the input: the plumbing shared by prompt tuning (prompt.py) and P-tuning (ptuning.py), and the
`Carrier` that prefix-tuning (the `_prefix_cache.py` plumbing) uses too. Not a method: the registry skips `_` modules.

No model code is copied or subclassed. The input embedding module is swapped for a `Carrier`, a transparent
wrapper that owns the delta's tensors (so they live in the model's module tree), and two hooks on the model do
the rest:
  * a forward pre-hook turns `input_ids` into `inputs_embeds` with the virtual tokens inserted, and lays out
    attention_mask, token_type_ids and token-level labels to match (virtual tokens: mask 1, type 0, label -100);
  * a forward hook removes the virtual positions from token-level outputs (`logits`), so callers and the training
    loop see the original sequence length.
Layout: encoders (bidirectional attention) keep their first token ([CLS], read by the classifier) first:
`[CLS] P.. text P.. pad`. Decoders are laid out left-padded, `pad P.. text P..`, with position ids counting
attended tokens only (as HF generate does): the last position is a real token whatever the padding side, which
is what GPT-2/Llama sequence classification pools when given `inputs_embeds`. In cached generation the prefix is
already in the cache; the pre-hook then only extends the mask and the position ids of the new tokens.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.delta import C, Delta
from deltatune.errors import ConfigError, TargetError
from deltatune.schema import MAX_COUNT
from deltatune.targeting import WrapperModule


class Carrier(WrapperModule):
    """Wraps the input embeddings unchanged and carries a delta's modules (virtual tokens, prefixes)."""

    def __init__(self, base: nn.Module, owner: str, **parts: nn.Module):
        super().__init__()
        self.owner_method = owner
        self.base_layer = base
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)


def input_embeddings(model: nn.Module, method: str) -> tuple[str, nn.Module]:
    """(name, module) of the input embeddings, which must not carry another delta's tokens or prefixes yet."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) and hasattr(model, "config") else None
    if not isinstance(embeddings, nn.Module) or getattr(embeddings, "weight", None) is None:  # a Carrier has one
        raise TargetError(f"{method} adds virtual tokens to the input, so it needs a model that takes token ids (a "
                          f"transformers model with a config and get_input_embeddings()); {type(model).__name__} "
                          "has neither: use lora, full, bitfit or head on it instead")
    if isinstance(embeddings, Carrier):
        raise TargetError(f"{method}: the input embeddings already carry a {embeddings.owner_method} delta; "
                          f"{method} and {embeddings.owner_method} both extend the input and cannot be combined")
    return next(n for n, m in model.named_modules() if m is embeddings), embeddings


def is_causal(model: nn.Module) -> bool:
    """True for decoders: some attention module of the model is causal."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def takes(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting attended tokens only (pads get 0), as HF generate computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class VirtualTokens(nn.Module):
    """n trainable embeddings, passed through a prompt encoder (identity for prompt tuning)."""

    def __init__(self, init: torch.Tensor, encoder: nn.Module):
        super().__init__()
        self.embedding = nn.Parameter(init)
        self.encoder = encoder

    def forward(self) -> torch.Tensor:
        return self.encoder(self.embedding)


Position = Literal["auto", "start", "after_first"]
POSITION_HELP = "where the first virtual tokens go: auto = after [CLS] for encoders, at the start for decoders"
TokenId = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class InputTokensDelta(Delta[C]):
    """Shared machinery: carrier + hooks inserting `virtual()` at the layout positions. Subclasses build tokens."""

    preserves_output = False
    rewrites_inputs = True
    # Inserted positions before / after the text, as rows of the extra table: the trainable virtual tokens,
    # then the embeddings of `literal_ids` (fixed words of a template). Set by make_tokens.
    before: list[int]
    after: list[int]
    literal_ids: list[int]

    def make_tokens(self, embeddings: nn.Module) -> VirtualTokens:
        raise NotImplementedError

    def build(self) -> list[nn.Parameter]:
        name, embeddings = input_embeddings(self.model, self.method)
        self.carrier = Carrier(embeddings, self.method, tokens=self.make_tokens(embeddings))
        self.swap(name, self.carrier)
        # an encoder-decoder's virtual tokens go into its encoder input, laid out as for encoders
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.causal = is_causal(self.model) and not self.encoder_decoder
        position = self.config.position  # type: ignore[attr-defined]
        self.keep_first = int(position == "after_first" or (position == "auto" and not self.causal))
        self.extra_positions = len(self.before) + len(self.after)
        ids = torch.tensor(self.literal_ids, dtype=torch.long, device=embeddings.weight.device)
        self.carrier.register_buffer("literal_ids", ids, persistent=False)
        self._restore: torch.Tensor | None = None
        self._inside = False  # within the model's forward (its encoder then needs no hook of its own)
        self._hooks = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                       self.model.register_forward_hook(self._after, with_kwargs=True)]
        if self.encoder_decoder:
            self._hooks.append(self.model.get_encoder().register_forward_pre_hook(self._encoder_before,
                                                                                  with_kwargs=True))
        return list(self.carrier.tokens.parameters())

    def restore(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def extra_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """The rows `before`/`after` index: virtual tokens, then the frozen embeddings of the literal words."""
        virtual = self.carrier.tokens().to(dtype)
        if not self.literal_ids:
            return virtual
        return torch.cat([virtual, self.carrier.base_layer(self.carrier.literal_ids).to(dtype)])

    def layout(self, mask: torch.Tensor) -> torch.Tensor:
        """Per row, indices into [the L input positions, then the n virtual tokens] giving the new sequence."""
        length = mask.shape[1]
        before, after = [length + j for j in self.before], [length + j for j in self.after]
        rows = []
        for row in mask.bool().tolist():
            real = [i for i, m in enumerate(row) if m]
            pads = [i for i, m in enumerate(row) if not m]
            k = min(self.keep_first, len(real))
            seq = real[:k] + before + real[k:] + after
            rows.append(pads + seq if self.causal else seq + pads)
        return torch.tensor(rows, device=mask.device)

    def _before(self, module, args, kwargs):
        if args:  # input_ids given positionally
            kwargs = {"input_ids": args[0], **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:  # generate ran the encoder itself (its hook added the tokens): the
            if self.encoder_decoder and (mask := kwargs.get("attention_mask")) is not None:  # decoder's
                kwargs["attention_mask"] = self.spread(self.layout(mask), mask, 1)  # cross-attention mask follows
            return (), kwargs
        x = ids if ids is not None else embeds
        batch, length = x.shape[:2]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        if not self.encoder_decoder and cache is not None and cache.get_seq_length() > 0:
            n = self.extra_positions  # cached decoding: virtual tokens are in the cache
            full = torch.ones(batch, cache.get_seq_length() + length - n, dtype=torch.long, device=x.device)
            mask = full if mask is None else mask
            mask = torch.cat([mask.new_ones(batch, n), mask], 1).sort(dim=1).values  # pads first, as laid out
            kwargs["attention_mask"] = mask
            if takes(self.model, "position_ids"):
                kwargs["position_ids"] = positions(mask)[:, -length:]
            return (), kwargs
        idx = self.add_tokens(kwargs)
        labels = kwargs.get("labels")
        if not self.encoder_decoder and labels is not None and labels.shape[:2] == (batch, length):
            kwargs["labels"] = self.spread(idx, labels, -100)
        if self.causal and takes(self.model, "position_ids"):
            kwargs["position_ids"] = positions(kwargs["attention_mask"])
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = None  # encoders: the default 0..L'-1 fits the new layout
        self._restore = None if self.encoder_decoder else idx.argsort(1)[:, :length]  # where each position went
        self._inside = True
        return (), kwargs

    def _encoder_before(self, module, args, kwargs):
        """An encoder-decoder's encoder called on its own (as `generate` does): add the tokens there."""
        if self._inside:  # called by the model's forward, whose hook added them already
            return None
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        self.add_tokens(kwargs)
        return (), kwargs

    def add_tokens(self, kwargs: dict) -> torch.Tensor:
        """Put the virtual tokens into `kwargs` (inputs_embeds, attention_mask, token_type_ids); returns the layout."""
        ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        batch, length = x.shape[:2]
        if embeds is None:
            embeds = self.carrier(ids)
        mask = kwargs.get("attention_mask")
        mask = torch.ones(batch, length, dtype=torch.long, device=x.device) if mask is None else mask
        idx = self.layout(mask)
        table = torch.cat([embeds, self.extra_rows(embeds.dtype).expand(batch, -1, -1)], 1)
        kwargs["inputs_embeds"] = table.gather(1, idx[..., None].expand(-1, -1, table.shape[-1]))
        kwargs["attention_mask"] = self.spread(idx, mask, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = self.spread(idx, kwargs["token_type_ids"], 0)
        return idx

    def spread(self, idx: torch.Tensor, t: torch.Tensor, fill: int) -> torch.Tensor:
        """`t` (batch, L) laid out like the new sequence, `fill` at the extra positions."""
        return torch.cat([t, t.new_full((t.shape[0], self.extra_positions), fill)], 1).gather(1, idx)

    def _after(self, module, args, kwargs, output):
        where, self._restore, self._inside = self._restore, None, False
        logits = getattr(output, "logits", None)
        if where is not None and isinstance(logits, torch.Tensor) and logits.dim() >= 3 \
                and logits.shape[1] == where.shape[1] + self.extra_positions:
            output.logits = logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))
        return output


def model_tokenizer(model: nn.Module, needed_for: str, instead: str):
    """The tokenizer saved next to the model (`model.config._name_or_path`); ConfigError naming `instead` if none."""
    from deltatune.models.load import load_tokenizer

    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path:
        raise ConfigError(f"{needed_for} needs the model's tokenizer, but the model has no source path "
                          f"(config._name_or_path); give {instead} instead")
    return load_tokenizer(path)
