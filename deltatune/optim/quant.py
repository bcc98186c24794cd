"""Block-wise 8-bit quantisation with a dynamic code, for optimizer states on any device (CPU included).

A tensor is cut into blocks of `BLOCK` consecutive elements (flattened). Each block is divided by its absolute
maximum, and every value is stored as the index (uint8) of the nearest of 256 code values in [-1, 1] (or [0, 1]):

    codes, absmax = quantize(x, signed=True)        # uint8, same numel as x (flat); float32, one per block
    y = dequantize(codes, absmax, signed=True)      # flat float32; |x - y| <= max_error(signed) * block absmax

The code is "dynamic" (Dettmers 2016; the data type of 8-bit Adam, Dettmers et al. 2022): an exponent picks a
decade (10^-6 .. 10^0) and a linear fraction the point inside it, with more points for larger decades. So
small values keep a relative precision a linear code would round to zero, which matters for Adam's second moment.
Storage: 1 byte per element plus 4 bytes per block (~1.016 bytes per element with BLOCK = 256).
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 256
DECADES = 7  # 10^-6 .. 10^0
KEY_SHIFT = 15  # float32 bits >> 15: exponent and the top 8 mantissa bits
KEYS = (127 << 8) + 1  # keys of the magnitudes 0 .. 1.0


@functools.cache
def dynamic_code(signed: bool) -> torch.Tensor:
    """The sorted code values. Unsigned (256): 0, 1 and, per decade 10^e (e = -6..0), the midpoints of a linear
    grid over [0.1, 1] * 10^e with 2^(e+7) cells. Signed (255, symmetric): 0, +-1 and, per decade e = -5..0, the
    2^(e+6) midpoints and their negatives (so a block whose largest magnitude is negative is stored exactly too)."""
    values = [0.0, 1.0] + ([-1.0] if signed else [])
    for i in range(1 if signed else 0, DECADES):
        cells = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, cells + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - DECADES + 1)).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == (255 if signed else 256)
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _lookup(signed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tables for the nearest-code search (a binary search, torch.bucketize, is ~100x slower on CPU).

    A magnitude in [0, 1] is keyed by its float32 exponent and top 8 mantissa bits; every key interval is narrower
    (2^-8 relative) than the gaps of the code (>= 0.7% relative), so it holds at most one midpoint between code
    values. `below[key]` counts the midpoints under the interval, and one comparison with the next midpoint
    finishes the search. Returns (below, midpoints + [inf], index of the code value 0)."""
    code = dynamic_code(signed)
    magnitudes = code[code >= 0]
    mids = (magnitudes[1:] + magnitudes[:-1]) / 2
    starts = (torch.arange(KEYS + 1, dtype=torch.int32) << KEY_SHIFT).view(torch.float32)
    below = torch.bucketize(starts, mids)  # midpoints < start
    assert int((below[1:] - below[:-1]).max()) <= 1
    return below[:-1], torch.cat([mids, torch.tensor([math.inf])]), len(code) - len(magnitudes)


def nearest(x: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """uint8 index of the code value nearest to each element of `x` (float32, values in [-1, 1])."""
    below, mids, zero = (t.to(x.device) if isinstance(t, torch.Tensor) else t for t in _lookup(signed))
    magnitude = x.abs().contiguous()
    key = (magnitude.view(torch.int32) >> KEY_SHIFT).clamp_(0, KEYS - 1).long()
    index = torch.take(below, key)
    index = (index + (torch.take(mids, index) < magnitude)).float()  # float ops: much faster than int64 on CPU
    return (zero + torch.copysign(index, x) if signed else index).to(torch.uint8)


def max_error(signed: bool) -> float:
    """Largest |x - dequantize(quantize(x))| for |x| <= 1 (half the widest gap of the code), relative to absmax."""
    return float((dynamic_code(signed).diff().max() / 2).item())


def num_blocks(numel: int, block: int = BLOCK) -> int:
    return math.ceil(numel / block)


def zeros(numel: int, signed: bool = True, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `numel` zeros, without a float32 tensor of that size."""
    zero = int((dynamic_code(signed) == 0).nonzero())
    return (torch.full((numel,), zero, dtype=torch.uint8, device=device),
            torch.zeros(num_blocks(numel), dtype=torch.float32, device=device))


def quantize(x: torch.Tensor, signed: bool = True, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): flat uint8 codes of `x` and the float32 absolute maximum of each block."""
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(x.numel(), block), dtype=torch.float32, device=x.device)
    quantize_into(x, codes, absmax, signed, block)
    return codes, absmax


def quantize_into(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True,
                  block: int = BLOCK) -> None:
    """Quantize `x` into existing flat `codes` (uint8, numel of x) and `absmax` (one per block), in place."""
    if not signed and bool((x < 0).any()):
        raise ValueError("the unsigned code cannot store negative values")
    blocks = _blocked(x.detach().reshape(-1).float(), block)
    scale = blocks.abs().amax(dim=1)
    absmax.copy_(scale)
    normalised = blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes.copy_(nearest(normalised.reshape(-1)[:x.numel()], signed))


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True, block: int = BLOCK) -> torch.Tensor:
    """Flat float32 values of `codes` (uint8) scaled by each block's `absmax`."""
    values = dynamic_code(signed).to(codes.device)[codes.reshape(-1).long()]
    blocks = _blocked(values, block) * absmax[:, None]
    return blocks.reshape(-1)[:codes.numel()]


def _blocked(flat: torch.Tensor, block: int) -> torch.Tensor:
    """`flat` zero-padded to whole blocks, as (blocks, block)."""
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)
