"""Prefix-tuning (Li & Liang 2021): trainable key/value prefixes at every layer, trained through an MLP.

The prefixes go into each layer's attention cache through `_prefix_cache.PrefixCacheDelta` (transformers' public
cache API); `for_inference()` collapses the MLP into the plain prefix it computes (saved as `reparam: none`).
"""

from __future__ import annotations

from deltatune.methods._prefix_cache import PrefixCacheDelta, PrefixSettings
from deltatune.registry import register


class Prefix(PrefixSettings):
    """Prefix-tuning settings: prefix length, MLP reparameterisation and its hidden size."""


@register("prefix")
class PrefixDelta(PrefixCacheDelta[Prefix]):
    """Prefix-tuning: trainable key/value prefixes at every layer through an MLP (collapse() for inference)."""

    peft_options = {"prefix_projection": True}  # PEFT's PREFIX_TUNING with the MLP
