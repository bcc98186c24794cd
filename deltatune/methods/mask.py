"""Mask tuning (Zhao et al. 2020, "Masking as an efficient alternative to finetuning", after Piggyback, Mallya et
al. 2018): the frozen weight W of every targeted Linear / GPT-2 Conv1D / Conv2d is used as W ⊙ m, a binary mask
m = 1[s >= threshold] of real-valued scores s, one per weight. The scores train through a straight-through
estimator (dL/ds := dL/dm); the base weights never change. Every score starts at `init_score` > threshold (a
uniform constant, as in the paper, defaults from Piggyback: threshold 5e-3, scores 1e-2), so the mask starts all
ones and attaching changes no output.

Saving: the trained tensors are the float scores, and `save()` writes them (`<module>.mask_scores`) like every
delta: checkpoints then resume exactly (the loop's resume goes through `save`/`load_state_dict`) and
`deltatune.load` reproduces outputs bit for bit. Saving only the bits would reset the scores' distance to the
threshold on every resume. The 1 bit/weight artefact is separate: `export_mask(file)` writes the binary mask
bit-packed (uint8, 8 weights per byte: 1/32 of the float32 scores) and `import_mask(file)` puts one into an
attached mask delta (scores become init_score where kept and 0 where dropped: same outputs, training can go on).
`merge()` folds the mask in, W <- W ⊙ m; `unmerge()` restores W from a copy, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import storage
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import CheckpointError, ConfigError
from deltatune.registry import register
from deltatune.schema import MAX_SCALE, NonEmptyPatterns, Patterns
from deltatune.targeting import MergeableWrapper, find_modules

MASK_FORMAT = "deltatune-mask"


class Mask(DeltaConfig):
    """Mask tuning settings: threshold, initial score, which modules."""

    uses_base_weights: ClassVar[bool] = True  # W ⊙ m needs the real weights: no quantized base

    threshold: float = Field(5e-3, gt=0.0, lt=1.0, description="a weight is kept while its score >= threshold")
    init_score: float = Field(1e-2, ge=-MAX_SCALE, le=MAX_SCALE,
                              description="starting value of every score; above threshold, so the mask "
                                          "starts all ones")
    targets: NonEmptyPatterns = Field(default_factory=lambda: ["all-linear"], description="module patterns (name, "
                                      "dot-suffix, 're:...', 'type:...', 'all-linear')")
    layers: str | list[int] | None = Field(None, description="restrict to these layer indices, e.g. '0-3' or [0, -1]")
    exclude: Patterns = Field(default_factory=list, description="patterns of modules to leave alone")

    @model_validator(mode="after")
    def _starts_all_ones(self) -> Mask:
        if not self.init_score > self.threshold:
            raise ValueError(f"init_score ({self.init_score}) must be above threshold ({self.threshold}), "
                             "so that the mask starts all ones")
        return self


def _linear(base: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), base.bias)  # a bf16-held layer (quantize.QuantizedLinear) gets fp32 x


def _conv1d(base: Conv1D, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GPT-2 Conv1D (weight stored (in, out)), computed as its own forward does."""
    return torch.addmm(base.bias, x.view(-1, x.size(-1)), weight).view(*x.shape[:-1], base.nf)


def _conv2d(base: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return base._conv_forward(x, weight, base.bias)


FORWARDS: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    Conv1D: _conv1d, nn.Linear: _linear, nn.Conv2d: _conv2d}


def binarize(scores: torch.Tensor, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """1[scores >= threshold] in the forward pass, identity gradient to the scores in the backward pass."""
    hard = (scores >= threshold).to(dtype)
    # (s - s.detach()) is exactly 0, so the value is exactly the hard mask; its gradient w.r.t. s is 1
    return hard + (scores - scores.detach()).to(dtype)


class MaskModule(MergeableWrapper):
    """A frozen `base_layer` whose weight is multiplied by the binarised `mask_scores`."""

    owner_method = "mask"

    def __init__(self, base: nn.Module, config: Mask):
        super().__init__()
        self.base_layer = base
        self.apply_weight = next(f for cls, f in FORWARDS.items() if isinstance(base, cls))
        self.threshold = config.threshold
        weight = base.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)  # small score updates survive in half precision
        self.mask_scores = nn.Parameter(torch.full(weight.shape, config.init_score, dtype=dtype, device=weight.device))
        self.train(base.training)  # a new module starts in training mode: take the model's

    def mask(self) -> torch.Tensor:
        return binarize(self.mask_scores, self.threshold, self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(self.base_layer, x, self.base_layer.weight * self.mask())

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        # the same product as the forward: merged outputs are identical
        return {"weight": self.base_layer.weight * self.mask()}

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


@register("mask")
class MaskDelta(Delta[Mask]):
    """Mask tuning: learn a binary keep/drop mask over frozen linear weights (straight-through scores); mergeable."""

    mergeable = True

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        found = find_modules(self.model, cfg.targets, tuple(FORWARDS), cfg.layers, cfg.exclude)
        self.wrappers: dict[str, MaskModule] = {}
        for name, module in found.items():
            self.wrappers[name] = MaskModule(module, cfg)
            self.swap(name, self.wrappers[name])
        return [w.mask_scores for w in self.wrappers.values()]

    def merge_weights(self) -> None:
        counts: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        if tied := [n for n, w in self.wrappers.items() if counts.get(id(w.base_layer.weight), 0) > 1]:
            raise ConfigError(f"cannot merge a mask into weights shared with another module ({', '.join(tied[:3])}): "
                              "merging would mask both uses. Keep the delta unmerged, or exclude those modules")
        for w in self.wrappers.values():
            w.merge()
        self.set_swapped(False)  # plain modules again

    def unmerge_weights(self) -> None:
        for w in reversed(self.wrappers.values()):
            w.unmerge()
        self.set_swapped(True)

    # ---- the binary mask -----------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """The current binary masks (bool, shaped like each weight) by module name."""
        return {name: w.mask_scores.detach() >= w.threshold for name, w in self.wrappers.items()}

    def sparsity(self) -> float:
        """Fraction of the targeted weights the mask drops (0.0 at start)."""
        masks = self.masks().values()
        return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def export_mask(self, path: str | Path) -> Path:
        """Write the binary mask bit-packed (1 bit per weight) to the safetensors file `path`."""
        tensors: dict[str, torch.Tensor] = {}
        for name, mask in self.masks().items():
            tensors[f"{name}.mask_bits"] = pack_bits(mask)
            tensors[f"{name}.mask_shape"] = torch.tensor(mask.shape, dtype=torch.int64)
        storage.save_tensors(path, tensors, metadata={"format": MASK_FORMAT})
        return Path(path)

    def import_mask(self, path: str | Path) -> None:
        """Load a mask written by `export_mask`: scores become init_score where kept, 0 where dropped."""
        saved = storage.load_tensors(path)
        names = {k.rsplit(".", 1)[0] for k in saved}
        missing, unexpected = sorted(set(self.wrappers) - names), sorted(names - set(self.wrappers))
        shapes = [f"{n}: saved {saved[f'{n}.mask_shape'].tolist()}, model {list(w.mask_scores.shape)}"
                  for n, w in self.wrappers.items() if n in names
                  and saved[f"{n}.mask_shape"].tolist() != list(w.mask_scores.shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(f"mask file {path} does not fit this delta: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}")
        init = self.config.init_score
        with torch.no_grad():
            for name, w in self.wrappers.items():
                mask = unpack_bits(saved[f"{name}.mask_bits"], w.mask_scores.shape)
                w.mask_scores.copy_(torch.where(mask, init, 0.0))


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # most significant bit first, as numpy.packbits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 values per byte (zero-padded at the end)."""
    flat = mask.flatten().to(torch.uint8).cpu()
    flat = F.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape`."""
    bits = (packed.to(torch.uint8)[:, None] >> _SHIFTS) & 1
    return bits.flatten()[:torch.Size(shape).numel()].view(shape).bool()
