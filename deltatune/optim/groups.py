"""Parameter groups: one LR and weight decay per tensor, tensors with equal settings share one named group."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.arch import Arch, describe
from deltatune.errors import ConfigError
from deltatune.optim import galore

if TYPE_CHECKING:
    from deltatune.delta import DeltaBase
    from deltatune.optim import OptimizerConfig


def stack_depths(model: nn.Module, arch: Arch | None = None) -> dict[str, int]:
    """Depth of every parameter name (tied aliases included) relative to the layer stack of `model`.

    -1: before the stack (the embeddings); i: inside layer i; L: after the stack (final norm, head).
    A tensor between two stacks (T5's encoder final norm) gets the index of the layer before it.
    Positions come from registration order, so this works for any module, not only known architectures.
    """
    arch = arch or describe(model)
    count, last, depths = len(arch.layers), -1, {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        index = arch.layer_index(name)
        if index is not None:
            last = depths[name] = index
        else:
            depths[name] = -1 if last < 0 else count if last == count - 1 else last
    return depths


def build_optimizer(model: nn.Module, delta: DeltaBase, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """An AdamW/SGD/GaLore-AdamW over the delta's tensors, grouped by (lr, weight decay, projected or not); each
    group has a readable "name". GaLore groups also carry the projection settings (see galore.py)."""
    params = delta.trainable_parameters()
    if not params:
        raise ConfigError("the delta has no trainable tensors to optimize")
    roles = {id(p): part.role for part in delta.parts() for p in part._params.values()}
    settings = _settings(model, params, roles, cfg)
    if cfg.loraplus_lr_ratio is not None:
        settings = _loraplus(settings, {n: r for part in delta.parts() for n, r in part.lr_roles().items()}, cfg)
    projected = galore.target_weights(model, params.values(), cfg.galore) if cfg.galore is not None else set()
    param_groups = _param_groups(params, settings, projected, cfg)
    if cfg.galore is not None:
        return galore.build(param_groups, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           foreach=True)


def _param_groups(params: dict[str, nn.Parameter], settings: dict[str, tuple[float, float, str]],
                  projected: set[int], cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """One group per (lr, weight decay, GaLore-projected or not), named after the labels of its tensors."""
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in params.items():
        if id(p) in seen:  # never hand the same tensor to the optimizer twice
            continue
        seen.add(id(p))
        lr, wd, label = settings[name]
        group = groups.setdefault((lr, wd, id(p) in projected),
                                  {"params": [], "lr": lr, "weight_decay": wd, "labels": []})
        group["params"].append(p)
        if label not in group["labels"]:
            group["labels"].append(label)
    param_groups = []
    for (_, wd, is_projected), group in groups.items():
        name = "+".join(group.pop("labels")) + (" (no decay)" if wd == 0 and cfg.weight_decay > 0 else "")
        extra = galore.group_settings(cfg.galore) if is_projected else {}
        param_groups.append({**group, **extra, "name": name + (" (galore)" if is_projected else "")})
    return param_groups


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """One row per parameter group (name, current lr, weight_decay, number of parameters), for logging."""
    return [{"name": g.get("name", f"group {i}"), "lr": g["lr"], "weight_decay": g["weight_decay"],
             "n_params": sum(p.numel() for p in g["params"])} for i, g in enumerate(optimizer.param_groups)]


LORAPLUS_EMBEDDING_LR = 1e-6  # PEFT's create_loraplus_optimizer default


def _loraplus(settings: dict[str, tuple[float, float, str]], lr_roles: dict[str, str],
              cfg: OptimizerConfig) -> dict[str, tuple[float, float, str]]:
    """LoRA+: tensors the delta calls "B" get loraplus_lr_ratio x their LR, "embedding" ones loraplus_lr_embedding
    ("A" and unnamed tensors keep theirs); tensors with an lr_groups LR keep it."""
    if not lr_roles:
        raise ConfigError("optimizer.loraplus_lr_ratio (LoRA+) sets the LR of LoRA's B factors, and this delta has no "
                          "LoRA: use method lora, or remove loraplus_lr_ratio")
    out = dict(settings)
    for name, role in lr_roles.items():
        lr, wd, label = settings[name]
        if label.startswith("lr_groups["):
            continue
        if role == "B":
            out[name] = (lr * cfg.loraplus_lr_ratio, wd, f"{label}, LoRA+ B")  # type: ignore[operator]
        elif role == "embedding":
            out[name] = (cfg.loraplus_lr_embedding or LORAPLUS_EMBEDDING_LR, wd, "LoRA+ embedding")
    return out


def _settings(model: nn.Module, params: dict[str, nn.Parameter], roles: dict[int, str],
              cfg: OptimizerConfig) -> dict[str, tuple[float, float, str]]:
    """(lr, weight_decay, label) per tensor name. LR precedence: lr_groups, then head_lr, then layer_decay, then lr."""
    unmatched = [pattern for pattern in cfg.lr_groups if not any(re.search(pattern, n) for n in params)]
    if unmatched:
        names = list(params)
        close = difflib.get_close_matches(unmatched[0], names, n=3, cutoff=0.3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"lr_groups pattern(s) {unmatched} match no trainable parameter (patterns are regexes "
                          f"searched in names such as {', '.join(names[:4])}).{hint}")
    depth_of: dict[str, int] = {}
    count = 0
    if cfg.layer_decay is not None:
        arch = describe(model)
        count = len(arch.layers)
        if count == 0:
            raise ConfigError(f"layer_decay needs a layer stack, and none was found in {type(model).__name__}; "
                              "use lr_groups to set LRs by parameter name instead")
        depths = stack_depths(model, arch)
        for name in params:  # a delta tensor the model no longer lists (e.g. merged away) counts as inside its layer
            index = arch.layer_index(name)
            depth_of[name] = depths.get(name, count if index is None else index)

    out = {}
    for name, p in params.items():
        wd = 0.0 if any(s in name for s in cfg.no_decay) else cfg.weight_decay
        pattern = next((pat for pat in cfg.lr_groups if re.search(pat, name)), None)
        if pattern is not None:
            lr, label = cfg.lr_groups[pattern], f"lr_groups[{pattern}]"
        elif cfg.head_lr is not None and roles.get(id(p)) == "head":
            lr, label = cfg.head_lr, "head"
        elif cfg.layer_decay is not None:
            depth = depth_of[name]
            lr = cfg.lr * cfg.layer_decay ** (count - depth)  # embeddings: depth -1 -> decay**(L+1); after: decay**0
            label = "embeddings" if depth < 0 else "after layers" if depth >= count else f"layer {depth}"
        else:
            lr, label = cfg.lr, "default"
        out[name] = (lr, wd, label)
    return out
