"""P-tuning v2 (Liu et al. 2022): deep prompts, key/value prefixes trained directly at every layer.

The prefixes go into each layer's attention cache through `_prefix_cache.PrefixCacheDelta` (transformers' public
cache API), as prefix-tuning's do; by default without the reparameterisation MLP.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deltatune.methods._prefix_cache import PrefixCacheDelta, PrefixSettings
from deltatune.registry import register


class PTuningV2(PrefixSettings):
    """P-tuning v2 settings: deep prompts at every layer, no reparameterisation by default."""

    reparam: Literal["mlp", "none"] = Field("none", description="'none' (P-tuning v2) or 'mlp'")


@register("ptuning_v2")
class PTuningV2Delta(PrefixCacheDelta[PTuningV2]):
    """P-tuning v2: deep prompts (key/value prefixes) trained directly at every layer, no reparameterisation."""

    peft_options = {"prefix_projection": False}  # PEFT's PREFIX_TUNING without the MLP
