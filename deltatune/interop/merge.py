"""Adapter arithmetic: saved LoRA deltas of one base model combined into a new LoRA delta, with the semantics of
PEFT's `LoraModel.add_weighted_adapter` (peft/tuners/lora/model.py, peft/utils/merge_utils.py).

Each input contributes its scaled update s·B·A with a weight w. Per module (the union of the inputs' modules; an
input that does not touch a module takes no part there), `how` is one of PEFT's combination types:
  * on the factors A and B separately, each weighted by ±sqrt(|w·s|) (the sign on A): `linear` (weighted sum),
    `ties` (magnitude pruning to `density`, sign election, disjoint mean), `dare_linear` / `dare_ties` (random
    pruning rescaled by 1/density, then sum / ties), `magnitude_prune`. These need equal ranks, and are an
    approximation (B'·A' has cross terms), as in PEFT;
  * `cat`: A and B stacked, rank = the sum of the ranks: B'·A' = Σ w·s·B·A exactly;
  * `svd` and `<type>_svd`: the combination applied to the full updates w·s·B·A, then truncated to `svd_rank`
    (default: the largest input rank) by SVD: B' = U·S, A' = Vh.
The result is a plain LoRA delta with alpha = r (scaling 1), saved with the inputs' base fingerprint. Random pruning
(dare) draws from torch's generator seeded with `seed`, in PEFT's order: the same seed gives PEFT's masks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from deltatune import storage
from deltatune.data.chat import TEMPLATE_FILE
from deltatune.delta import read_delta_config, read_delta_tensors, write_delta
from deltatune.errors import CheckpointError, ConfigError
from deltatune.fingerprint import check_same_base
from deltatune.generation.prompts import saved_template
from deltatune.methods.lora import SCALINGS, LoRA
from deltatune.registry import parse_delta_config
from deltatune.schema import MAX_WIDTH

RECORD_FILE = "merge.json"  # how a merged delta was made: inputs, weights, combination, settings


# ---- PEFT's combinations of task tensors (stacked on dim 0), weighted by `w` --------------------------------
def _weighted(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t * w.view(-1, *[1] * (t.dim() - 1))


def _magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest |values|."""
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def _random(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each value with probability density, rescaled by 1/density (DARE)."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _prune(tensors: list[torch.Tensor], density: float, rule: Callable) -> torch.Tensor:
    return torch.stack([t if density >= 1 else rule(t, density) for t in tensors])


def _ties_mean(t: torch.Tensor, w: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: elect each entry's sign (by total value or by count), average the weighted values that agree."""
    votes = t.sum(dim=0) if sign_method == "total" else t.sign().sum(dim=0)
    agree = t.sign() == torch.where(votes >= 0, 1, -1)
    return (_weighted(t, w) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _linear(ts: list[torch.Tensor], w: torch.Tensor, density: float | None, sign_method: str) -> torch.Tensor:
    return _weighted(torch.stack(ts), w).sum(dim=0)


def _ties(ts: list[torch.Tensor], w: torch.Tensor, density: float, sign_method: str) -> torch.Tensor:
    return _ties_mean(_prune(ts, density, _magnitude), w, sign_method)


def _dare_linear(ts: list[torch.Tensor], w: torch.Tensor, density: float, sign_method: str) -> torch.Tensor:
    return _weighted(_prune(ts, density, _random), w).sum(dim=0)


def _dare_ties(ts: list[torch.Tensor], w: torch.Tensor, density: float, sign_method: str) -> torch.Tensor:
    return _ties_mean(_prune(ts, density, _random), w, sign_method)


def _magnitude_prune(ts: list[torch.Tensor], w: torch.Tensor, density: float, sign_method: str) -> torch.Tensor:
    return _weighted(_prune(ts, density, _magnitude), w).sum(dim=0)


COMBINE: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear, "ties": _ties, "dare_linear": _dare_linear, "dare_ties": _dare_ties,
    "magnitude_prune": _magnitude_prune}
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
HOWS = (*COMBINE, "cat", "svd", *(f"{name}_svd" for name in PRUNING))


@dataclass(frozen=True)
class Settings:
    """How to combine: PEFT's combination type and its options."""

    how: str
    density: float | None = None  # fraction of values kept by the pruning types
    svd_rank: int | None = None
    svd_clamp: float | None = None  # quantile at which the SVD factors are clamped
    majority_sign: Literal["total", "frequency"] = "total"

    @property
    def combine(self) -> str:
        return "linear" if self.how == "svd" else self.how.removesuffix("_svd")

    def check(self) -> None:
        if self.how not in HOWS:
            raise ConfigError(f"unknown combination {self.how!r}; choose one of: {', '.join(HOWS)}")
        prunes = self.combine in PRUNING
        if prunes and self.density is None:
            raise ConfigError(f"{self.how} prunes each delta: give the fraction of values it keeps, --density "
                              "(0 < density <= 1, e.g. 0.5)")
        if not prunes and self.density is not None:
            raise ConfigError(f"--density applies to {', '.join(PRUNING)} (and their _svd forms), not {self.how}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ConfigError(f"--density must be in (0, 1], got {self.density}")
        svd = self.how.endswith("svd")
        if not svd and (self.svd_rank is not None or self.svd_clamp is not None):
            raise ConfigError(f"--svd-rank and --svd-clamp apply to svd and the *_svd combinations, not {self.how}")
        if self.svd_rank is not None and not 0 < self.svd_rank <= MAX_WIDTH:
            raise ConfigError(f"--svd-rank must be in 1..{MAX_WIDTH}, got {self.svd_rank}")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise ConfigError(f"--svd-clamp is a quantile in (0, 1], got {self.svd_clamp}")
        if self.majority_sign not in ("total", "frequency"):
            raise ConfigError(f"majority sign method must be total or frequency, got {self.majority_sign!r}")


@dataclass
class Source:
    """One input: its folder, LoRA config, scaling and factors per module name."""

    folder: Path
    config: LoRA
    base: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)

    @property
    def scaling(self) -> float:
        return SCALINGS[self.config.scaling](self.config.alpha, self.config.r)


def merge_deltas(deltas: Sequence[str | Path], weights: Sequence[float], out: str | Path, *, how: str,
                 density: float | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
                 majority_sign: Literal["total", "frequency"] = "total", seed: int = 0) -> Path:
    """Combine the LoRA deltas saved in `deltas` (delta folders or run folders) with `weights` into a new delta
    folder `out`, as PEFT's `add_weighted_adapter(adapters, weights, combination_type=how, density=...,
    svd_rank=..., svd_clamp=..., majority_sign_method=...)` does. `seed` seeds the random pruning of dare_*."""
    settings = Settings(how, density, svd_rank, svd_clamp, majority_sign)
    settings.check()
    if not deltas:
        raise ConfigError("merge-deltas needs at least one delta folder")
    if len(weights) != len(deltas):
        raise ConfigError(f"{len(weights)} weight(s) for {len(deltas)} deltas: give one weight per delta, in order")
    if bad := [w for w in weights if not math.isfinite(w)]:
        raise ConfigError(f"weights must be finite numbers, got {bad[0]}")
    out = Path(out)
    storage.check_new_folder(out)
    sources = [_read(Path(d)) for d in deltas]
    _check_same_base(sources)
    if len(sources) == 1 and how != "linear":
        warnings.warn(f"a single delta is combined linearly (scaled by its weight), as PEFT does; --how {how} "
                      "takes no part", stacklevel=2)
        settings = Settings("linear")
    rank = _new_rank(sources, settings)
    modules = _module_order(sources)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensors = {}
        for module in modules:
            a, b = _merge_module(module, sources, [float(w) for w in weights], settings, rank)
            tensors |= {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}
    config = _merged_config(sources, modules, rank)
    record = {"deltas": [str(s.folder) for s in sources], "weights": list(weights), "how": settings.how,
              "density": density, "svd_rank": svd_rank, "svd_clamp": svd_clamp, "majority_sign": majority_sign,
              "seed": seed, "rank": rank}
    with storage.new_folder(out) as tmp:
        write_delta(tmp, tensors, [{"config": config.to_dict(), "tensors": sorted(tensors)}], sources[0].base)
        storage.write_json(tmp / RECORD_FILE, record)
        if (template := _chat_template(sources)) is not None:
            storage.write_text(tmp / TEMPLATE_FILE, template)
    return out


def _chat_template(sources: list[Source]) -> str | None:
    """The chat template saved with the inputs (SFT runs save theirs; checked as generation reads it), for
    generation with the merged delta."""
    saved = {s.folder: text for s in sources if (text := saved_template(s.folder)) is not None}
    if len(set(saved.values())) > 1:
        warnings.warn(f"the deltas were trained with different chat templates; the merged delta keeps the one of "
                      f"{next(iter(saved))} (generate --template overrides it)", stacklevel=3)
    return next(iter(saved.values()), None)


def _read(folder: Path) -> Source:
    """A LoRA delta folder (a run folder means its best/), checked as `deltatune.load` checks it."""
    if (folder / "config.yaml").is_file() and (folder / "best").is_dir():
        folder = folder / "best"
    meta = read_delta_config(folder)
    where = str(folder / "delta.json")
    methods = [part["config"].get("method") for part in meta["deltas"]]
    if methods != ["lora"]:
        raise ConfigError(f"{folder} holds {' + '.join(map(str, methods))}: merge-deltas combines LoRA deltas only "
                          "(one LoRA per folder, no task head)")
    config = parse_delta_config(meta["deltas"][0]["config"], where=where)
    if config.dora:
        raise ConfigError(f"{folder} is a DoRA delta: its magnitude vectors have no weighted combination; "
                          "merge-deltas combines plain LoRA (and rsLoRA) deltas")
    tensors = read_delta_tensors(folder, meta)
    modules = {name.removesuffix(".lora_A.weight") for name in tensors if name.endswith(".lora_A.weight")}
    if stray := sorted(set(tensors) - {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}) \
            or sorted(m for m in modules if f"{m}.lora_B.weight" not in tensors):
        raise CheckpointError(f"{folder / 'delta.safetensors'} does not hold pairs of LoRA factors "
                              f"(<module>.lora_A.weight, <module>.lora_B.weight), e.g. {stray[0]}; save it again "
                              "with deltatune")
    factors = {m: (tensors[f"{m}.lora_A.weight"].float(), tensors[f"{m}.lora_B.weight"].float()) for m in modules}
    return Source(folder, config, meta["base"], factors)


def _check_same_base(sources: list[Source]) -> None:
    first = sources[0]
    for other in sources[1:]:
        try:
            check_same_base(first.base, other.base)
        except CheckpointError as exc:
            raise ConfigError(f"{first.folder} and {other.folder} were trained on different base models, and only "
                              f"deltas of one base combine: {str(exc).split('. Load')[0]}") from None


def _new_rank(sources: list[Source], settings: Settings) -> int:
    """PEFT's rank of the result: the common rank (factor combinations), the sum (cat), svd_rank or the largest."""
    ranks = [s.config.r for s in sources]
    if settings.how == "cat":
        rank = sum(ranks)
    elif settings.how.endswith("svd"):
        rank = settings.svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise ConfigError(f"{settings.how} combines the factors A and B entry by entry, which needs equal ranks; the "
                          "deltas have r = " + ", ".join(f"{r} ({s.folder})" for r, s in zip(ranks, sources))
                          + ". Use cat (exact, rank = the sum) or svd (--svd-rank R)")
    else:
        rank = ranks[0]
    if rank > MAX_WIDTH:
        raise ConfigError(f"the merged delta would have rank {rank}, more than {MAX_WIDTH}; merge fewer deltas "
                          "or use svd with --svd-rank")
    return rank


def _module_order(sources: list[Source]) -> list[str]:
    """The union of the inputs' modules in the model's order (as the base fingerprint lists weights; PEFT visits
    modules in that order, which decides the random masks of dare)."""
    order = {name.removesuffix(".weight"): i for i, name in enumerate(sources[0].base["shapes"])}
    modules = {m for s in sources for m in s.factors}
    return sorted(modules, key=lambda m: (order.get(m, len(order)), m))


def _merge_module(module: str, sources: list[Source], weights: list[float], settings: Settings,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged delta at `module`, from the inputs that touch it."""
    present = [(s.factors[module], s.scaling, w) for s, w in zip(sources, weights) if module in s.factors]
    (a0, b0), dtype = present[0][0], present[0][0][0].dtype
    if settings.how == "cat":
        a = torch.cat([a * w * s for (a, _), s, w in present])
        b = torch.cat([b for (_, b), _, _ in present], dim=1)
        return _pad(a, rank, 0).to(dtype), _pad(b, rank, 1).to(dtype)
    combine = partial(COMBINE[settings.combine], density=settings.density, sign_method=settings.majority_sign)
    if settings.how.endswith("svd"):
        a, b = _svd_factors(*_update_svd(present, settings.how, combine), rank, settings.svd_clamp)
        return a.reshape(rank, *a0.shape[1:]).to(dtype), b.reshape(b0.shape[0], rank, *b0.shape[2:]).to(dtype)
    roots = [math.sqrt(abs(s * w)) for _, s, w in present]  # on A and B, weighted by ±sqrt(|w·s|), the sign on A
    signs = [1.0 if s * w >= 0 else -1.0 for _, s, w in present]
    a = combine([a for (a, _), _, _ in present], torch.tensor([r * sign for r, sign in zip(roots, signs)]))
    b = combine([b for (_, b), _, _ in present], torch.tensor(roots))
    return a.to(dtype), b.to(dtype)


def _update_svd(present: list, how: str, combine: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of the combined update: for svd, Σ w·s·B·A is the product of the stacked factors (its SVD comes from
    a small core); the pruning types work entry by entry on the full updates s·B·A, weighted by w."""
    if how == "svd":
        return _stacked_svd(torch.cat([b.flatten(1) * s * w for (_, b), s, w in present], dim=1),
                            torch.cat([a.flatten(1) for (a, _), _, _ in present]))
    updates = [b.flatten(1) @ a.flatten(1) * s for (a, b), s, _ in present]
    return torch.linalg.svd(combine(updates, torch.tensor([w for *_, w in present])), full_matrices=False)


def _stacked_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced SVD of b·a (b: out × R, a: R × in, R small) without forming it: b = Qb·Rb, aᵀ = Qa·Ra, and the
    SVD of the R × R core Rb·Raᵀ (the same singular values and vectors as PEFT's SVD of the full update)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def _svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                 clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in) and B (out, rank): B·A the best rank-`rank` approximation of the update with SVD u·s·vh (zero
    rows beyond its own rank); `clamp` limits both to that quantile of their values, as PEFT's svd_clamp."""
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return _pad(a, rank, 0), _pad(b, rank, 1)


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `rank` (modules only some inputs touch, or of lower rank)."""
    missing = rank - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _merged_config(sources: list[Source], modules: list[str], rank: int) -> LoRA:
    """alpha = r (scaling 1: the factors carry the scales); the inputs' targeting when they all agree, else the
    module names."""
    first = sources[0].config
    targeting = {(tuple(s.config.targets), str(s.config.layers), tuple(s.config.exclude)) for s in sources}
    same = len(targeting) == 1 and all(set(s.factors) == set(modules) for s in sources)
    where = dict(targets=first.targets, layers=first.layers, exclude=first.exclude) if same else \
        dict(targets=modules)
    return LoRA(r=rank, alpha=rank, dropout=first.dropout, init=first.init, **where)
