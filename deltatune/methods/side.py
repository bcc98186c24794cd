"""Side-tuning (Zhang et al. 2019): a small trainable side network runs next to the frozen model and the two
representations are blended, alpha·base(x) + (1 - alpha)·side(x), with a learnable scalar alpha in (0, 1).

Where: at the hidden state the task head reads, i.e. the output of the LAST layer of the layer stack (before a
final norm where the model has one). That layer is wrapped in a `SideBlend` (tuple outputs of HF layers are
handled: the first element is blended), so classification and language modelling work alike.
What the side network reads: the output of the model's input embeddings (`get_input_embeddings()`; an
encoder-decoder's decoder embeddings, as the last layer is the decoder's), captured by a
forward hook (or `inputs_embeds` when those are passed to the model), layer-normed, then an MLP per token. What each
token adds from the rest of the sequence is a small strategy (`context`): `TokenOnly`, or `SequenceMean` (the
masked mean of all embeddings of the sequence, concatenated; padding is excluded through the `attention_mask`
keyword of the model call; it sees later tokens, so it is refused on generative models, and `auto` picks it only
for models that cannot generate, e.g. BERT-style classifiers whose head reads the first token, where a per-token
side network would be a constant). `TokenOnly` is what KV-cache generation needs.

Alpha = sigmoid(logit), as the authors' code learns it, starting at `alpha_init` (0.9: the pretrained
representation dominates at first). The side network's output layer starts at zero, so attaching gives
alpha_init·base(x): the output changes (`preserves_output` is False). With `alpha_schedule: linear` (a curriculum
from the frozen representation toward the side network) a floor under alpha decays from 1 to 0 over
`schedule_steps` training-mode forward passes (micro-batches): alpha = floor + (1 - floor)·sigmoid(logit). The
floor starts at 1, so the output is exactly the base's at attach (`preserves_output` is True for that config).
The floor is a tensor of the delta (`side_alpha_floor`): it is saved with it, so a loaded delta or a resumed run
continues the curriculum exactly; it is used detached, never gets a gradient, and so optimizers never change it.
Not mergeable: the side network runs at inference.
Attach other methods before `side`: targeting does not look inside the wrapped last layer.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.arch import describe
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import ConfigError, DeltaTuneError, TargetError
from deltatune.registry import register
from deltatune.schema import MAX_COUNT, MAX_DEPTH, MAX_WIDTH
from deltatune.targeting import DeltaModule


class Side(DeltaConfig):
    """Side-tuning settings: side network size, alpha start and curriculum, sequence context."""

    hidden_size: int = Field(64, gt=0, le=MAX_WIDTH, description="width of the side network")
    num_layers: int = Field(2, ge=1, le=MAX_DEPTH, description="hidden layers of the side MLP (Linear + GELU each), "
                                                 "followed by the output Linear")
    alpha_init: float = Field(0.9, gt=0.0, lt=1.0, description="starting weight of the frozen model in "
                                                               "alpha·base + (1 - alpha)·side")
    alpha_schedule: Literal["none", "linear"] = Field(
        "none", description="'linear': a floor under alpha decays from 1 to 0 over schedule_steps training forward "
                            "passes (curriculum); 'none': alpha is only learned")
    schedule_steps: int = Field(1000, gt=0, le=MAX_COUNT,
                                description="length of the linear alpha curriculum, in forward passes")
    context: Literal["auto", "none", "mean"] = Field(
        "auto", description="what each token's side input adds from the sequence: 'mean' = masked mean of all "
                            "embeddings (sees later tokens: not for generative models), 'none' = nothing; "
                            "'auto' = mean unless the model can generate text")


# ---- context strategies: what a token's side input adds from the rest of the sequence -------------------
class TokenOnly:
    """Each token on its own (safe for causal language models and KV-cache generation)."""

    widen = 1

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x


class SequenceMean:
    """Each token concatenated with the mean embedding of its sequence (padding excluded via attention_mask)."""

    widen = 2

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            weight = x.new_ones(x.shape[:2])
        elif mask.shape != x.shape[:2]:
            raise DeltaTuneError(f"side-tuning (context: mean) needs a 2-D attention_mask shaped like the input "
                                 f"{tuple(x.shape[:2])}, got {tuple(mask.shape)}; use context: none")
        else:
            weight = mask.to(x.dtype)
        mean = (x * weight[..., None]).sum(1, keepdim=True) / weight.sum(1).clamp(min=1)[:, None, None]
        return torch.cat([x, mean.expand_as(x)], dim=-1)


CONTEXTS = {"none": TokenOnly, "mean": SequenceMean}


class SideNetwork(nn.Module):
    """LayerNorm(embeddings) -> context -> [Linear, GELU] x num_layers -> Linear (zero at start)."""

    def __init__(self, n_in: int, width: int, n_out: int, num_layers: int, context: TokenOnly | SequenceMean):
        super().__init__()
        self.context = context
        self.norm = nn.LayerNorm(n_in, elementwise_affine=False)
        dims = [n_in * context.widen] + [width] * num_layers
        self.mlp = nn.Sequential(*[m for a, b in pairwise(dims) for m in (nn.Linear(a, b), nn.GELU())])
        self.out = nn.Linear(width, n_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(embeds.to(self.out.weight.dtype))
        return self.out(self.mlp(self.context(x, mask)))


class SideBlend(DeltaModule):
    """The last layer (`base_layer`) with its hidden-state output blended with the side network's."""

    owner_method = "side"

    def __init__(self, base: nn.Module, side: SideNetwork, cfg: Side):
        super().__init__()
        self.base_layer = base
        self.side = side
        like = {"device": side.out.weight.device, "dtype": side.out.weight.dtype}
        self.side_alpha_logit = nn.Parameter(torch.tensor(math.log(cfg.alpha_init / (1 - cfg.alpha_init)), **like))
        self.side_alpha_floor = nn.Parameter(torch.ones((), **like)) if cfg.alpha_schedule == "linear" else None
        self.floor_step = 1.0 / cfg.schedule_steps
        self.inputs: dict[str, torch.Tensor] = {}  # this forward's embeddings and attention mask, set by hooks
        self.mask_key = "attention_mask"  # the model call's keyword holding the mask of the last layer's tokens
        self.train(base.training)  # a new module is in training mode; take the model's (eval passes keep the floor)

    def alpha(self) -> torch.Tensor:
        """The effective alpha (the floor enters as a detached copy: no gradient, free to change in place)."""
        alpha = torch.sigmoid(self.side_alpha_logit)
        if self.side_alpha_floor is None:
            return alpha
        floor = self.side_alpha_floor.detach().clone()
        return floor + (1 - floor) * alpha

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        embeds, mask = self.inputs.pop("embeds", None), self.inputs.pop("mask", None)
        if embeds is None:
            raise DeltaTuneError("side-tuning saw no input embeddings in this forward pass: call the model "
                                 "itself with input_ids or inputs_embeds")
        if embeds.shape[:2] != hidden.shape[:2]:
            raise DeltaTuneError(f"side-tuning: the input embeddings {tuple(embeds.shape[:2])} and the last hidden "
                                 f"state {tuple(hidden.shape[:2])} differ in length (another delta adds tokens?); "
                                 "side-tuning cannot be combined with it")
        alpha = self.alpha().to(hidden.dtype)
        blended = alpha * hidden + (1 - alpha) * self.side(embeds, mask).to(hidden.dtype)
        if self.training and self.side_alpha_floor is not None:  # the curriculum advances once per training pass
            with torch.no_grad():
                self.side_alpha_floor.sub_(self.floor_step).clamp_(min=0.0)
        return (blended, *out[1:]) if isinstance(out, tuple) else blended

    def capture_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the whole model: start a fresh forward; keep the mask / inputs_embeds if given."""
        self.inputs.clear()
        if (mask := kwargs.get(self.mask_key)) is not None:
            self.inputs["mask"] = mask
        if (embeds := kwargs.get("inputs_embeds")) is not None:
            self.inputs["embeds"] = embeds

    def capture_embeds(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.inputs["embeds"] = output

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha().detach()):.4g}, context={type(self.side.context).__name__}"


@register("side")
class SideDelta(Delta[Side]):
    """Side-tuning: a small network on the input embeddings, blended into the last hidden state by a learned alpha."""

    @property
    def preserves_output(self) -> bool:  # type: ignore[override]
        return self.config.alpha_schedule == "linear"  # floor 1: alpha is exactly 1

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        arch = describe(self.model)
        if not arch.layers:
            raise TargetError(f"side-tuning blends at the output of the last layer of the layer stack, and "
                              f"{type(self.model).__name__} has no layer stack that deltatune recognises; use lora, "
                              "full or head")
        embedding = _side_input(self.model)
        if not isinstance(embedding, nn.Module) or getattr(embedding, "weight", None) is None:
            raise TargetError(f"side-tuning reads the input embeddings, and {type(self.model).__name__} has no "
                              "get_input_embeddings() returning an embedding module")
        n_in = embedding.weight.shape[-1]
        n_out = getattr(getattr(self.model, "config", None), "hidden_size", None) or n_in
        side = SideNetwork(n_in, cfg.hidden_size, n_out, cfg.num_layers, CONTEXTS[self._context(cfg)]())
        side.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
        name = arch.layers[-1]
        self.blend = SideBlend(self.model.get_submodule(name), side, cfg)
        if _is_encoder_decoder(self.model):  # the last layer is the decoder's: its mask is the decoder's
            self.blend.mask_key = "decoder_attention_mask"
        self.swap(name, self.blend)
        # hooks last: nothing below can fail, so a failed attach never leaves one behind
        self._hooks = [embedding.register_forward_hook(self.blend.capture_embeds),
                       self.model.register_forward_pre_hook(self.blend.capture_call, with_kwargs=True)]
        return [p for n, p in self.blend.named_parameters() if not n.startswith("base_layer.")]

    def restore(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.blend.inputs.clear()

    def alpha(self) -> float:
        """The current effective alpha (weight of the frozen model's representation)."""
        return float(self.blend.alpha().detach())

    def _context(self, cfg: Side) -> str:
        can_generate = getattr(self.model, "can_generate", None)
        generative = bool(can_generate()) if callable(can_generate) else False
        if cfg.context == "auto":
            return "none" if generative else "mean"
        if cfg.context == "mean" and generative:
            raise ConfigError(f"side-tuning context 'mean' lets every token see later tokens, which a generative "
                              f"model ({type(self.model).__name__}) must not; use context: none")
        return cfg.context


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _side_input(model: nn.Module) -> nn.Module | None:
    """The input embeddings of the stack the last layer belongs to: an encoder-decoder's decoder embeds its own
    tokens (T5, BART: `decoder.embed_tokens`, not the shared module `get_input_embeddings()` returns)."""
    owner = model.get_decoder() if _is_encoder_decoder(model) and hasattr(model, "get_decoder") else model
    get_embeddings = getattr(owner, "get_input_embeddings", None)
    return get_embeddings() if callable(get_embeddings) else None
