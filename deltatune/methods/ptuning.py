"""P-tuning v1 (Liu et al. 2021): virtual tokens from a prompt encoder, placed by a template around the input.

The prompt encoder is a strategy (`ENCODERS`: none | mlp | lstm); the template places `[P]` virtual tokens,
literal words and the tokenizer's mask token around the input text (`"[P][P][P] {text} [P][P] It was {mask}"`).
Literal words are embedded by the frozen embedding table, so only the [P] tokens train; their token ids are
resolved once with the model's tokenizer and saved in the config. Everything after `{text}` sits after the
prompt in cached generation (with a decoder, "[P][P] {text} It was" makes the model continue after "It was");
without the KV cache every step re-reads the whole text, so those pieces would move behind the generated tokens.
The tokens go in through `_virtual_tokens.InputTokensDelta` (a carrier on the input embeddings and two model hooks).
"""

from __future__ import annotations

import re
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


# ---- P-tuning prompt encoders (strategies) --------------------------------------------------------------------
class LSTMEncoder(nn.Module):
    """Bidirectional 2-layer LSTM then a 2-layer MLP, as in the P-tuning paper (and PEFT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in the LSTM's own dtype, outside a bf16 base's autocast: oneDNN has no bf16 LSTM on CPUs without bf16
        with torch.autocast(x.device.type, enabled=False):
            hidden = self.lstm(x[None].to(self.lstm.weight_ih_l0.dtype))[0]
        return self.mlp(hidden)[0]


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim))


ENCODERS = {"none": lambda dim, hidden: nn.Identity(), "mlp": _mlp, "lstm": LSTMEncoder}


MARKERS = ("[P]", "{text}", "{mask}")
Piece = str  # "[P]", "{mask}", or literal text


def template_pieces(template: str) -> tuple[list[Piece], list[Piece]]:
    """The pieces of a P-tuning template before and after `{text}` (literal text keeps its leading space)."""
    parts = [p if p in MARKERS else p.rstrip() for p in re.split(r"(\[P\]|\{text\}|\{mask\})", template)]
    parts = [p for p in parts if p.strip()]
    if parts.count("{text}") != 1 or "[P]" not in parts:
        raise ValueError(f"template {template!r} needs exactly one {{text}} and at least one [P], e.g. "
                         "'[P][P][P] {text} [P][P] It was {mask}'")
    cut = parts.index("{text}")
    return parts[:cut], parts[cut + 1:]


class PTuning(DeltaConfig):
    """P-tuning v1 settings: template of [P] tokens, words and {mask} around the text; prompt encoder."""

    template: str = Field("[P][P][P][P][P][P][P][P][P][P] {text}", max_length=MAX_WIDTH,
                          description="[P] virtual tokens, literal words and {mask} around one {text}")
    encoder: Literal["lstm", "mlp", "none"] = Field("lstm", description="prompt encoder (reparameterisation)")
    hidden_size: int = Field(128, gt=0, le=MAX_WIDTH, description="prompt-encoder hidden size")
    position: Position = Field("auto", description=POSITION_HELP)
    literal_token_ids: list[list[TokenId]] | None = Field(
        None, description="token ids of the template's words and {mask}, in order (set from the tokenizer)")

    @model_validator(mode="after")
    def _parse(self) -> PTuning:
        self.pieces()
        return self

    def pieces(self) -> tuple[list[Piece], list[Piece]]:
        return template_pieces(self.template)

    def literals(self) -> list[Piece]:
        return [p for part in self.pieces() for p in part if p != "[P]"]


def literal_ids(model: nn.Module, literals: list[str]) -> list[list[int]]:
    """Token ids of each literal word piece of a template; `{mask}` is the tokenizer's mask token."""
    tokenizer = model_tokenizer(model, "a template with words or {mask}", "literal_token_ids")
    if "{mask}" in literals and tokenizer.mask_token_id is None:
        raise ConfigError(f"the template uses {{mask}} but the tokenizer of {model.config._name_or_path} has no mask "
                          "token (decoders have none: drop {mask}; the model predicts from the last token)")
    return [[tokenizer.mask_token_id] if piece == "{mask}" else tokenizer(piece, add_special_tokens=False)["input_ids"]
            for piece in literals]


@register("ptuning")
class PTuningDelta(InputTokensDelta[PTuning]):
    """P-tuning v1: virtual tokens from a prompt encoder (LSTM, MLP or none), placed around the input by a template
    together with fixed words and the mask token."""

    peft_type = "P_TUNING"

    def make_tokens(self, embeddings: nn.Module) -> VirtualTokens:
        cfg = self.config
        literals = cfg.literals()
        if literals and cfg.literal_token_ids is None:  # saved with the delta: load needs no tokenizer
            self.config = cfg = cfg.model_copy(update={"literal_token_ids": literal_ids(self.model, literals)})
        if len(cfg.literal_token_ids or []) != len(literals):
            raise ConfigError(f"literal_token_ids has {len(cfg.literal_token_ids or [])} entries but the template "
                              f"{cfg.template!r} has {len(literals)} words/{{mask}} pieces")
        self.before, self.after, self.literal_ids = self.slots(cfg.pieces(), cfg.literal_token_ids or [])
        weight = embeddings.weight
        n_virtual = len(self.before) + len(self.after) - len(self.literal_ids)
        encoder = ENCODERS[cfg.encoder](weight.shape[1], cfg.hidden_size).to(weight.device, weight.dtype)
        init = torch.randn(n_virtual, weight.shape[1]) * weight.detach().float().std()
        return VirtualTokens(init.to(weight.device, weight.dtype), encoder)

    def for_inference(self) -> None:
        """Replace the prompt encoder by the tokens it computes; `save` then writes only those (encoder: none)."""
        if self.config.encoder == "none":
            return
        with torch.no_grad():
            tokens = self.carrier.tokens().detach().clone()
        self.carrier.tokens = VirtualTokens(tokens, nn.Identity())
        self.collapse_to(self.carrier.tokens.embedding, encoder="none")

    @staticmethod
    def slots(pieces: tuple[list[Piece], list[Piece]],
              ids: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
        """Rows of the extra table (virtual tokens first, then literal tokens) for the pieces before/after {text}."""
        n_virtual = sum(p == "[P]" for part in pieces for p in part)
        words, literal, virtual, out = iter(ids), [], 0, []
        for part in pieces:
            rows = []
            for piece in part:
                if piece == "[P]":
                    rows.append(virtual)
                    virtual += 1
                else:
                    for token in next(words):
                        rows.append(n_virtual + len(literal))
                        literal.append(token)
            out.append(rows)
        return out[0], out[1], literal
