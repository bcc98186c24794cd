"""AdapterFusion (Pfeiffer et al. 2021), stage 2 of two: several adapters trained separately (stage 1, method
`adapter`) are loaded frozen, and a small attention at each of their sites learns how to mix them.

At a site with output h and the N adapters' branch outputs z_n = adapter_n(h) (without their own residual):
    w = softmax_n( (Q LN(h)) · (K z_n) / sqrt(d) ),   out = h + sum_n w_n · V z_n
Q, K, V are d×d linears, as in the paper; the query is the sublayer output the adapters read, layer-normed
without affine parameters (in the reference Pfeiffer placement the query is a LayerNorm output too; here the
wrapped projection's raw output can be ~0.1 in scale, and routing then barely learns). Initialisation:
Q = 0 (weights exactly uniform at start, while K and V still get gradients through Q's), K default, V = identity
with zero bias, so training starts from exactly the mean of the adapters' outputs. The optional penalty
`value_regularization · ||V - I||²` (0.01, as in the adapter-transformers reference) keeps V near identity.

Saving: the fusion delta's tensors are Q, K, V only (the trainable set; the contract saves exactly that). The
config names the adapters by folder (relative ones resolve from the current directory), and their tensor files'
SHA-256 are recorded on attach (`adapter_sha256`). A saved fusion holds copies of its adapters
(`adapters/0`, `adapters/1`, ... next to delta.json) and names them relative to its own folder, so it is
self-contained, and `deltatune.load` reads no folder outside it; it rebuilds the exact same fusion or refuses
adapters whose checksums changed. Other deltas saved in an adapter's folder (e.g. its task head) are ignored:
attach a new head after the fusion.

Not output-preserving (`preserves_output = False`): attaching adds the mean of trained adapters to the bare model.
`FusionDelta.fusion_weights()` returns the last attention weights of every site (they sum to 1 over adapters).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from deltatune.arch import describe
from deltatune.delta import CONFIG_FILE, TENSOR_FILE, Delta, DeltaConfig, base_fingerprint, read_delta_config
from deltatune.errors import CheckpointError, ConfigError, TargetError
from deltatune.fingerprint import check_finite, check_same_base
from deltatune.storage import atomic_path, load_tensors, sha256
from deltatune.methods.adapter import Adapter, Bottleneck, like, on_output, output_size
from deltatune.registry import register
from deltatune.safety import inside
from deltatune.schema import MAX_SCALE
from deltatune.targeting import WrapperModule, exact_pattern, find_modules

BRANCH = ".adapter."  # tensor names of a saved adapter: "<site>.adapter.<down|up|norm>.<weight|bias>"


class Fusion(DeltaConfig):
    """AdapterFusion settings: the saved adapters to fuse, and the value-matrix regularisation."""

    folder_fields = ("adapters",)

    adapters: list[str] = Field(description="folders of at least 2 saved adapter deltas (e.g. runs/a/best)",
                                examples=[["runs/adapter-a/best", "runs/adapter-b/best"]])
    value_regularization: float = Field(0.01, ge=0, le=MAX_SCALE, description="weight of ||V - I||² added to the loss")
    adapter_sha256: list[str] | None = Field(None, description="checksums of the adapters' tensor files; "
                                             "recorded on attach, checked on load (leave unset)")

    @field_validator("adapters")
    @classmethod
    def _at_least_two(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError(f"AdapterFusion fuses at least 2 saved adapters, got {len(value)}; "
                             "to use one adapter, load it with deltatune.load instead")
        if len(set(value)) != len(value):
            raise ValueError(f"adapter folders must be distinct, got {value}")
        if missing := [v for v in value if not Path(v).is_dir()]:
            raise ValueError(f"adapter folders {missing} not found (relative paths resolve from {Path.cwd()}); "
                             "run from the folder they are relative to, or train the adapters first (method: adapter)")
        return value

    @model_validator(mode="after")
    def _checksums_fit(self) -> Fusion:
        if self.adapter_sha256 is not None and len(self.adapter_sha256) != len(self.adapters):
            raise ValueError(f"{len(self.adapter_sha256)} checksums for {len(self.adapters)} adapters")
        return self


@dataclass
class SavedAdapter:
    """One stage-1 adapter read from disk: its config, tensors, sites, base fingerprint and checksum."""

    path: Path
    config: Adapter
    tensors: dict[str, torch.Tensor]
    base: dict
    sha256: str

    @property
    def sites(self) -> list[str]:
        return sorted({name.rsplit(BRANCH, 1)[0] for name in self.tensors})

    @classmethod
    def read(cls, folder: str) -> SavedAdapter:
        path = Path(folder)
        if not path.is_dir():
            raise CheckpointError(f"adapter folder {str(path)!r} not found (relative paths resolve from "
                                  f"{Path.cwd()}); fusion references its adapters by folder")
        meta = read_delta_config(path)
        parts = [d for d in meta["deltas"] if d["config"].get("method") == "adapter"]
        if len(parts) != 1:
            found = [d["config"].get("method") for d in meta["deltas"]]
            raise ConfigError(f"{path} holds deltas {found}; AdapterFusion needs folders with exactly one "
                              "`adapter` delta each (train them with method: adapter first)")
        file = inside(path, TENSOR_FILE, str(path / CONFIG_FILE))
        digest = sha256(file) if file.is_file() else None
        if digest != meta.get("sha256"):
            raise CheckpointError(f"{file} is missing or corrupted (checksum differs from its delta.json)")
        config = Adapter(**{k: v for k, v in parts[0]["config"].items() if k != "method"})
        wanted = set(parts[0]["tensors"])
        tensors = {k: v for k, v in load_tensors(file).items() if k in wanted}
        check_finite(tensors, str(file))
        return cls(path, config, tensors, meta["base"], digest)

    def branch(self, site: str, hidden: int, like: dict) -> Bottleneck:
        """This adapter's frozen bottleneck at `site`, with its saved tensors."""
        branch = Bottleneck.from_config(self.config, hidden, like)
        prefix = site + BRANCH
        try:
            branch.load_state_dict({k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)})
        except RuntimeError as exc:
            raise CheckpointError(f"adapter {self.path} does not fit module {site!r}: {exc}") from None
        return branch.requires_grad_(False)


def check_compatible(saved: list[SavedAdapter], heads: list[str]) -> None:
    """Same base body (task heads may differ) and the same sites, or one clear error naming the odd adapter."""
    def body(a: SavedAdapter) -> dict:
        return {k: v for k, v in a.base["shapes"].items() if not any(k == h or k.startswith(h + ".") for h in heads)}

    first = saved[0]
    for other in saved[1:]:
        a, b = body(first), body(other)
        if a != b:
            diffs = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise CheckpointError(
                f"adapters {first.path} and {other.path} were trained on different base models "
                f"({first.base['class']} from {first.base['name_or_path']} vs {other.base['class']} from "
                f"{other.base['name_or_path']}; e.g. {', '.join(diffs[:3])} differ); fuse adapters of one base")
        if first.sites != other.sites:
            def where(s: SavedAdapter) -> str:
                c = s.config
                return f"{len(s.sites)} modules (placement {c.placement}, layers {c.layers}, modules {c.modules})"
            raise ConfigError(f"adapters sit at different modules: {first.path} at {where(first)}, {other.path} at "
                              f"{where(other)}; AdapterFusion needs adapters trained with the same placement")


class FusionAttention(nn.Module):
    """softmax over adapters of (Q h)·(K z_n)/sqrt(d), then the weighted sum of V z_n."""

    def __init__(self, hidden: int, like: dict):
        super().__init__()
        self.query = nn.Linear(hidden, hidden, **like)
        self.key = nn.Linear(hidden, hidden, **like)
        self.value = nn.Linear(hidden, hidden, **like)
        self.scale = hidden ** -0.5
        with torch.no_grad():
            self.query.weight.zero_()
            self.query.bias.zero_()
            self.value.weight.copy_(torch.eye(hidden))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (..., d), z (..., N, d) -> fused (..., d), weights (..., N)."""
        query = self.query(F.layer_norm(h, h.shape[-1:]))  # routing independent of the sublayer's output scale
        scores = (self.key(z) @ query.unsqueeze(-1)).squeeze(-1) * self.scale
        weights = scores.softmax(dim=-1)
        return (weights.unsqueeze(-1) * self.value(z)).sum(dim=-2), weights


class FusionModule(WrapperModule):
    """A frozen `base_layer`, N frozen `adapters` on its output h, and the trainable `fusion` mixing them."""

    owner_method = "fusion"

    def __init__(self, base: nn.Module, adapters: list[Bottleneck], hidden: int):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleList(adapters)
        self.fusion = FusionAttention(hidden, like(base))
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple:
        return on_output(self.base_layer(x, *args, **kwargs), self._fuse)

    def _fuse(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.stack([adapter(h) for adapter in self.adapters], dim=-2)
        fused, weights = self.fusion(h, z)
        self.last_weights = weights.detach()
        return h + fused


@register("fusion")
class FusionDelta(Delta[Fusion]):
    """AdapterFusion: learned attention over several trained, frozen adapters (stage 2 of two); not mergeable."""

    preserves_output = False  # the fused adapters are trained: attaching adds their mean output to the base

    def build(self) -> list[nn.Parameter]:
        cfg = self.config
        saved = [SavedAdapter.read(folder) for folder in cfg.adapters]
        pinned = cfg.adapter_sha256 or [s.sha256 for s in saved]
        if changed := [str(s.path) for s, digest in zip(saved, pinned) if s.sha256 != digest]:
            raise CheckpointError(f"adapters {changed} changed since this fusion was trained (their tensor "
                                  "checksums differ); fuse and train again, or restore those adapters")
        heads = describe(self.model).heads
        check_compatible(saved, heads)
        for adapter in saved:  # the body they were trained on (each task had its own head)
            try:
                check_same_base(adapter.base, base_fingerprint(self.model), skip=heads)
            except CheckpointError as exc:
                raise CheckpointError(f"adapter {adapter.path}: {exc}") from None
        sites = saved[0].sites
        if not sites:
            raise CheckpointError(f"adapter {saved[0].path} holds no adapter tensors")
        modules = find_modules(self.model, [exact_pattern(sites)])
        if missing := sorted(set(sites) - set(modules)):
            raise TargetError(f"the adapters' modules {missing[:3]} are not in {type(self.model).__name__}; "
                              "fuse adapters trained on this model")
        wrappers = {}
        for site, module in modules.items():
            hidden = output_size(site, module)
            wrappers[site] = FusionModule(module, [s.branch(site, hidden, like(module)) for s in saved], hidden)
        self.wrappers: dict[str, FusionModule] = {}
        for site, wrapper in wrappers.items():
            self.swap(site, wrapper)
            self.wrappers[site] = wrapper
        self.config = cfg.model_copy(update={"adapter_sha256": [s.sha256 for s in saved]})  # pinned in delta.json
        return [p for w in wrappers.values() for p in w.fusion.parameters()]

    def saved_config(self, directory: Path) -> Fusion:
        """Copy the fused adapters into `directory/adapters/<i>` and name those copies (relative to `directory`)."""
        names = []
        for i, folder in enumerate(self.config.adapters):
            name, source = f"adapters/{i}", Path(folder)
            if source.resolve() != (directory / name).resolve():
                for file in (CONFIG_FILE, TENSOR_FILE):
                    with atomic_path(directory / name / file) as tmp:
                        shutil.copyfile(source / file, tmp)
            names.append(name)
        return self.config.model_copy(update={"adapters": names})

    def fusion_weights(self) -> dict[str, torch.Tensor]:
        """Attention weights over the adapters from the last forward pass, by module: (..., N), summing to 1."""
        return {site: w.last_weights for site, w in self.wrappers.items() if w.last_weights is not None}

    def extra_loss(self) -> torch.Tensor | None:
        reg = self.config.value_regularization
        if not reg:
            return None
        value = [w.fusion.value.weight for w in self.wrappers.values()]
        return reg * sum(((v - torch.eye(v.shape[0], dtype=v.dtype, device=v.device)) ** 2).sum() for v in value)
