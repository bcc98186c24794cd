"""Prompt tuning (Lester et al. 2021): n trainable virtual tokens in the input (encoders: after [CLS]).

The tokens go in through `_virtual_tokens.InputTokensDelta` (a carrier on the input embeddings and two model hooks).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.delta import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.methods._virtual_tokens import POSITION_HELP, InputTokensDelta, Position, TokenId, VirtualTokens, \
    model_tokenizer
from deltatune.registry import register
from deltatune.schema import MAX_WIDTH


class Prompt(DeltaConfig):
    """Prompt tuning settings: number of virtual tokens, their initialisation and position."""

    n_tokens: int = Field(20, gt=0, le=MAX_WIDTH, description="number of virtual tokens")
    init: Literal["random", "vocab", "text"] = Field("vocab", description="random normal, embeddings of random "
                                                     "vocabulary tokens, or the embeddings of `init_text`")
    init_text: str | None = Field(None, description="text for init=text, e.g. 'Classify the sentiment:' "
                                  "(tokenised with the model's own tokenizer; repeated to n_tokens)")
    init_token_ids: list[TokenId] | None = Field(None, max_length=MAX_WIDTH,
                                                 description="token ids for init=text (set from init_text)")
    position: Position = Field("auto", description=POSITION_HELP)

    @model_validator(mode="after")
    def _text_given(self) -> Prompt:
        if self.init == "text" and not (self.init_text or self.init_token_ids):
            raise ValueError("init='text' needs init_text (e.g. 'Classify the sentiment:') or init_token_ids")
        return self


@register("prompt")
class PromptDelta(InputTokensDelta[Prompt]):
    """Prompt tuning: n trainable virtual token embeddings in front of the input (encoders: after [CLS])."""

    peft_type = "PROMPT_TUNING"

    def make_tokens(self, embeddings: nn.Module) -> VirtualTokens:
        cfg = self.config
        self.before, self.after, self.literal_ids = list(range(cfg.n_tokens)), [], []
        weight = embeddings.weight
        if cfg.init == "random":
            init = torch.randn(cfg.n_tokens, weight.shape[1]) * weight.detach().float().std()
        else:
            if cfg.init == "text" and cfg.init_token_ids is None:
                ids = text_ids(self.model, cfg.init_text or "")
                self.config = cfg = cfg.model_copy(update={"init_token_ids": ids})  # saved: load needs no tokenizer
            if cfg.init == "text":
                ids = (cfg.init_token_ids * cfg.n_tokens)[:cfg.n_tokens]  # type: ignore[operator]
            else:
                ids = torch.randint(0, weight.shape[0], (cfg.n_tokens,)).tolist()
            if max(ids) >= weight.shape[0] or min(ids) < 0:
                raise ConfigError(f"init token ids must be in [0, {weight.shape[0]}), got {ids}")
            init = weight.detach()[ids].clone()
        return VirtualTokens(init.to(weight.device, weight.dtype), nn.Identity())


def text_ids(model: nn.Module, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer saved next to the model."""
    ids = model_tokenizer(model, "init_text", "init_token_ids")(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {text!r} gives no tokens")
    return ids
