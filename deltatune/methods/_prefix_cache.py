"""Key/value prefixes at every layer: the plumbing shared by prefix-tuning (prefix.py) and P-tuning v2
(ptuning_v2.py). Not a method: the registry skips `_` modules.

The prefixes go in through the model's own cache API: a forward pre-hook on the model fills a `DynamicCache`
(transformers' public class) with each layer's prefix keys/values and passes it as `past_key_values`, prepends n
ones to the attention mask, and sets position ids from the unextended mask, so real tokens take positions
n, n+1, .. after the prefix (as the papers' code and PEFT do) whatever the padding side. No attention code is
copied. In cached generation the prefix is already in the cache: the pre-hook only extends the mask (and
positions) of the new tokens.

Gradient checkpointing makes transformers drop `past_key_values` inside checkpointed layers (it would be written
twice on the backward replay). A forward pre-hook on every self-attention module then hands it a single-use
`DynamicCache` holding only that layer's prefix: re-running it on the replay gives the same keys.

Reparameterisation is a strategy (`REPARAMS`): prefix-tuning trains an embedding through an MLP (`mlp`, hidden
size configurable); P-tuning v2 trains the prefix tensors directly (`none`). `collapse()` replaces the MLP by the
plain prefix it computes (the paper's inference form): afterwards `save` writes only the (n, layers·2·kv_width)
prefix tensor and the config says `reparam: none`, so loading needs no MLP. Works for decoders (GPT-2, Llama,
GPT-NeoX whose attention takes the cache as `layer_past`), for BERT-style encoders (transformers 5 BERT
self-attention reads `past_key_values` in encoder mode too), and for encoder-decoders (T5, BART): there the
prefixes go into the decoder's self-attention cache (`EncoderDecoderCache`) and extend `decoder_attention_mask`.
Models whose attention takes no cache (DistilBERT) are refused.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
from pydantic import Field
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import ConfigError
from deltatune.methods._virtual_tokens import Carrier, input_embeddings, positions, takes
from deltatune.schema import MAX_SCALE, MAX_WIDTH


# (token ids, embeddings, mask) keywords of the tokens the prefix precedes: the decoder's in an encoder-decoder
INPUTS = ("input_ids", "inputs_embeds", "attention_mask")
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


class PrefixSettings(DeltaConfig):
    """Prefix length, reparameterisation and its hidden size (the settings of both prefix methods)."""

    n_tokens: int = Field(10, gt=0, le=MAX_WIDTH, description="prefix length (virtual key/value positions per layer)")
    reparam: Literal["mlp", "none"] = Field("mlp", description="train an embedding through an MLP (prefix-tuning) "
                                            "or the prefix tensors directly (P-tuning v2)")
    hidden_size: int = Field(512, gt=0, le=MAX_WIDTH, description="hidden size of the reparameterisation MLP")
    init_std: float = Field(0.02, gt=0, le=MAX_SCALE, description="std of the normal init of the trained tensors")


P = TypeVar("P", bound=PrefixSettings)


class PlainPrefix(nn.Module):
    """The prefix tensors themselves, (n, layers·2·kv_width)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self) -> torch.Tensor:
        return self.weight


class MLPPrefix(nn.Module):
    """An (n, d_model) embedding through Linear-tanh-Linear to (n, layers·2·kv_width), as in Li & Liang."""

    def __init__(self, embedding: torch.Tensor, hidden: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.mlp = nn.Sequential(nn.Linear(embedding.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)


class Shape:
    """Layer count, key/value heads and head size, from the model config."""

    def __init__(self, model: nn.Module):
        cfg = model.config.get_text_config()
        # an encoder-decoder's prefixes go to its decoder's self-attention layers
        self.layers = len(attention_modules(model)) if is_encoder_decoder(model) else cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        if getattr(cfg, "new_decoder_architecture", None) is False:  # Falcon: its cache holds every query head,
            self.kv_heads = 1 if cfg.multi_query else cfg.num_kv_heads  # except with multi-query attention (one)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.width = self.layers * 2 * self.kv_heads * self.head_dim


def cache_keyword(attention: nn.Module) -> str | None:
    """The keyword an attention module takes its cache by (GPT-NeoX: `layer_past`), or None."""
    return next((k for k in ("past_key_values", "layer_past") if takes(attention, k)), None)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def attention_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Self-attention modules by layer index: they have `layer_idx` and take a cache. In an
    encoder-decoder, the decoder's: the first such module of each layer (cross-attention comes after it)."""
    decoder = is_encoder_decoder(model)
    found: dict[int, list[nn.Module]] = {}
    for module in (model.get_decoder() if decoder else model).modules():
        if isinstance(getattr(module, "layer_idx", None), int) and not getattr(module, "is_cross_attention", False) \
                and cache_keyword(module) and not (decoder and module.layer_idx in found):
            found.setdefault(module.layer_idx, []).append(module)
    return found


class PrefixCacheDelta(Delta[P]):
    """Shared machinery: the prefix module on a carrier, the hooks that put its keys/values into the cache."""

    preserves_output = False
    rewrites_inputs = True
    peft_type = "PREFIX_TUNING"

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        name, embeddings = input_embeddings(self.model, self.method)
        self.shape = shape = Shape(self.model)
        attention = attention_modules(self.model)
        if sorted(attention) != list(range(shape.layers)):
            raise ConfigError(f"{self.method} fills each attention layer's key/value cache, but the attention "
                              f"layers of {type(self.model).__name__} take no cache (found one for layers "
                              f"{sorted(attention)} of 0..{shape.layers - 1}); use prompt or ptuning (virtual tokens "
                              "in the input) or lora")
        weight = embeddings.weight
        like = dict(device=weight.device, dtype=weight.dtype)
        n = self.extra_positions = cfg.n_tokens  # real tokens take positions after the prefix
        if cfg.reparam == "mlp":
            prefix = MLPPrefix(torch.randn(n, weight.shape[1], **like) * cfg.init_std, cfg.hidden_size,
                               shape.width).to(**like)
        else:
            prefix = PlainPrefix(torch.randn(n, shape.width, **like) * cfg.init_std)
        self.carrier = Carrier(embeddings, self.method, prefix=prefix)
        self.swap(name, self.carrier)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._drop_cache = False
        self._hooks = [self.hook(self.model.register_forward_pre_hook, self._before, with_kwargs=True),
                       self.hook(self.model.register_forward_hook, self._after, with_kwargs=True)]
        self._hooks += [self.hook(m.register_forward_pre_hook, self._attention_before, with_kwargs=True)
                        for modules in attention.values() for m in modules]
        return list(prefix.parameters())

    def restore(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def prefix_kv(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv_heads, n, head_dim)."""
        s = self.shape
        flat = self.carrier.prefix()
        kv = flat.view(-1, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
        return [(kv[i, 0][None].expand(batch, -1, -1, -1), kv[i, 1][None].expand(batch, -1, -1, -1))
                for i in range(s.layers)]

    def _before(self, module, args, kwargs):
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        ids, embeds, mask_key = DECODER_INPUTS if is_encoder_decoder(self.model) else INPUTS
        x = next(kwargs[k] for k in (ids, embeds, "labels", "input_ids") if kwargs.get(k) is not None)
        batch, length = x.shape[:2]
        n = self.config.n_tokens
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:  # a new sequence: the prefix goes into the cache first
            self._kv = kv = self.prefix_kv(batch)
            use_cache = kwargs.get("use_cache")
            self._drop_cache = cache is None and not (self.model.config.use_cache if use_cache is None else use_cache)
            if cache is None:
                cache = DynamicCache(config=self.model.config)
                if is_encoder_decoder(self.model):
                    cache = EncoderDecoderCache(cache, DynamicCache(config=self.model.config))
            own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            for i, (k, v) in enumerate(kv):
                own.update(k, v, i)
            kwargs["past_key_values"] = cache
            past = n
        mask = kwargs.get(mask_key)
        if mask is None:
            mask = torch.ones(batch, past - n + length, dtype=torch.long, device=x.device)
        if mask_key == "attention_mask" and takes(self.model, "position_ids"):
            kwargs["position_ids"] = positions(mask)[:, -length:] + n  # after the prefix, as in the papers and PEFT
        kwargs[mask_key] = torch.cat([mask.new_ones(batch, n), mask], 1)
        return (), kwargs

    def _after(self, module, args, kwargs, output):
        if self._drop_cache and getattr(output, "past_key_values", None) is not None:
            output.past_key_values = None  # the caller asked for no cache: ours must not look like a decoding state
        return output

    def _attention_before(self, module, args, kwargs):
        """Under gradient checkpointing the layer gets no cache: give it a single-use one with its prefix."""
        key = cache_keyword(module)
        if kwargs.get(key) is not None or self._kv is None or not self.model.training:
            return None
        i = module.layer_idx
        kwargs[key] = DynamicCache([(None, None)] * i + [self._kv[i]])
        return args, kwargs

    def for_inference(self) -> None:
        self.collapse()

    def collapse(self) -> None:
        """Replace the MLP by the prefix it computes; `save` then writes only that tensor (reparam: none)."""
        if not isinstance(self.carrier.prefix, MLPPrefix):
            return
        with torch.no_grad():
            flat = self.carrier.prefix().detach().clone()
        self.carrier.prefix = PlainPrefix(flat)
        self.collapse_to(self.carrier.prefix.weight, reparam="none")
