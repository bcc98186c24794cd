"""The delta contract: a small set of new or unfrozen tensors plus the rule for how they touch a frozen model.

A method subclasses `Delta`, names its pydantic `config_class`, and implements `build()` (change the model,
return the tensors to train). The base class does the rest the same way for every method: freezing, detaching
bit-for-bit, saving only the delta's tensors, loading with key/shape checks against the right base model.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Generic, Iterable, Literal, Sequence, TypeVar, get_args
from weakref import WeakKeyDictionary

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from deltatune import storage
from deltatune.errors import CheckpointError, ConfigError, TargetError
from deltatune.fingerprint import Fingerprint, check_finite, check_same_base, fingerprint
from deltatune.registry import method_of, methods, parse_delta_config
from deltatune.safety import inside
from deltatune.models.quantize import QuantizedLinear, quantized_layers
from deltatune.schema import Schema
from deltatune.targeting import check_not_taken

FORMAT = "deltatune-delta"
FORMAT_VERSION = 2  # 2: the base fingerprint holds sampled weights (version 1 files load, checked by shapes)
CONFIG_FILE = "delta.json"
TENSOR_FILE = "delta.safetensors"
# Other folder formats `load` reads, by the file that marks them: "module:function(model, folder)", imported on use,
# so that the core imports no interop (or method) module.
FOREIGN_FORMATS = {"adapter_config.json": "deltatune.interop.peft:load_peft"}  # Hugging Face PEFT adapters

_ATTACHED: WeakKeyDictionary[nn.Module, list[Delta]] = WeakKeyDictionary()
_BASE_FINGERPRINT: WeakKeyDictionary[nn.Module, dict[str, Any]] = WeakKeyDictionary()


class SavedPart(BaseModel):
    config: dict[str, Any]
    tensors: list[str]


class DeltaFile(BaseModel):
    """The structure of delta.json; anything else is a CheckpointError naming the bad key."""

    format: Literal["deltatune-delta"]
    version: int
    deltatune_version: str = ""
    deltas: list[SavedPart]
    base: Fingerprint
    sha256: str


class DeltaConfig(Schema):
    """Base of every method's config. Unknown keys are rejected; `method` is set by `@register`."""

    method: ClassVar[str] = ""
    # Fields listing folders the delta reads (e.g. fusion's adapters): a saved delta holds copies of them and names
    # them relative to its own folder, and loading accepts only folders inside it.
    folder_fields: ClassVar[tuple[str, ...]] = ()
    trains_base: ClassVar[bool] = False  # the method trains the base model's own tensors (full fine-tuning, BitFit)
    uses_base_weights: ClassVar[bool] = False  # computes with the base's weights themselves (mask tuning masks them)

    def needs_dense_base(self) -> str | None:
        """Why this method (so configured) cannot run on a quantized (int8 / int4) base, or None when it can."""
        if self.trains_base:
            return "trains the base weights, which cannot be quantized"
        if self.uses_base_weights:
            return "computes with the base weights themselves, which a quantized layer does not hold"
        return None

    @classmethod
    def schema_name(cls) -> str:
        return cls.method or cls.__name__

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.model_dump(mode="json")}


class DeltaBase:
    """The public API shared by a single delta and a group of deltas attached together."""

    model: nn.Module

    def parts(self) -> list[Delta]:
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The delta's tensors by their stable names (as in the model when the delta was attached)."""
        return {name: p for part in self.parts() for name, p in part._params.items()}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable delta parameters, all parameters of the model with the delta attached)."""
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.model.parameters())
        present = {id(p) for p in self.model.parameters()}  # in-place deltas (full, bitfit) stay in the model
        merged_extra = sum(p.numel() for part in self.parts() if part.merged for p in part._params.values()
                           if id(p) not in present)
        return trainable, total + merged_extra

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors `save` writes (each part's `saved_tensors()`)."""
        return {name: t for part in self.parts() for name, t in part.saved_tensors().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; missing, unexpected or mis-shaped keys are one CheckpointError."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        shapes = [f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
                  for k in own.keys() & tensors.keys() if tensors[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError("saved delta does not fit: " + "; ".join(
                f"{label}: {_preview(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if items))
        with torch.no_grad():
            for part in self.parts():
                part.widen_to(tensors)
                part.load_saved(tensors)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model for the forwards inside (e.g. DPO's reference log-probs): every part switched off in
        place, no copy of the model; switched on again on exit, also after an error. A merged delta is refused."""
        parts = self.parts()
        if merged := [part.method for part in parts if part.merged]:
            raise ConfigError(f"cannot switch off a merged delta ({', '.join(merged)}): its weights are folded into "
                              "the base; unmerge() it first")
        off: list[Delta] = []
        try:
            for part in reversed(parts):
                part.switch_off()
                off.append(part)
            yield
        finally:
            for part in reversed(off):
                part.switch_on()

    def extra_loss(self) -> torch.Tensor | None:
        """Sum of the parts' auxiliary losses (e.g. a sparsity penalty), or None."""
        losses = [loss for part in self.parts() if (loss := part.extra_loss()) is not None]
        return sum(losses) if losses else None

    def merge(self) -> None:
        """Fold every part into the base weights (no added inference latency); `unmerge()` reverts exactly."""
        for part in self.parts():
            part.merge()

    def unmerge(self) -> None:
        for part in reversed(self.parts()):
            part.unmerge()

    def for_inference(self) -> None:
        """Drop training-only structure (e.g. prefix-tuning's MLP) so `save` writes only what inference needs."""
        for part in self.parts():
            part.for_inference()

    def detach(self) -> None:
        """Remove the delta, restoring the original modules, weights and requires_grad flags bit for bit."""
        for part in reversed(self.parts()):
            part.detach()

    def save(self, directory: str | Path) -> Path:
        """Write `delta.safetensors` (only the delta's tensors) and `delta.json` (configs, base fingerprint)."""
        directory = Path(directory)
        parts = [{"config": part.saved_config(directory).to_dict(), "tensors": sorted(part._params)}
                 for part in self.parts()]
        return write_delta(directory, self.state_dict(), parts, _BASE_FINGERPRINT[self.model])


def write_delta(directory: Path, tensors: dict[str, torch.Tensor], parts: list[dict[str, Any]],
                base: dict[str, Any]) -> Path:
    """Write a delta folder: `delta.safetensors` and `delta.json` (`parts`: each method's config dict and tensor
    names; `base`: the base model's fingerprint)."""
    if not tensors:
        raise CheckpointError("refusing to save an empty delta: it has no tensors")
    storage.save_tensors(directory / TENSOR_FILE, tensors, metadata={"format": FORMAT})
    from deltatune import __version__

    meta = {"format": FORMAT, "version": FORMAT_VERSION, "deltatune_version": __version__, "deltas": parts,
            "base": base, "sha256": storage.sha256(directory / TENSOR_FILE)}
    storage.write_json(directory / CONFIG_FILE, meta)
    return directory


C = TypeVar("C", bound=DeltaConfig)


class Delta(DeltaBase, ABC, Generic[C]):
    """Contract for one method: `class LoRADelta(Delta[LoRA])` (the type argument is its `config_class`) implements
    `build()` (+ merge hooks if mergeable). The class attributes below say what the method is; code outside the
    method's file reads them (never a list of method names)."""

    config_class: ClassVar[type[DeltaConfig]]
    method: ClassVar[str] = ""  # set by @register
    mergeable: ClassVar[bool] = False  # merge() folds it into the base weights (no added latency)
    role: ClassVar[str] = "delta"  # "head" for new task heads: the optimizer may give them their own LR
    preserves_output: ClassVar[bool] = True  # attaching leaves the model's outputs unchanged until trained
    rewrites_inputs: ClassVar[bool] = False  # extends the model's input / attention cache (virtual tokens, prefixes)
    fsdp: ClassVar[bool] = False  # trains whole weights in place (full fine-tuning, heads): FSDP can shard it
    per_task: ClassVar[bool] = True  # per_task may hold one copy of it per task (heads are per task already)
    peft_type: ClassVar[str | None] = None  # its Hugging Face PEFT adapter type (interop/peft.py), if it has one
    peft_options: ClassVar[dict[str, bool]] = {}  # adapter-config flags that tell it from others of its peft_type
    extra_positions: int = 0  # sequence positions the delta occupies (virtual tokens, prefixes), set by build()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if (args := get_args(base)) and isinstance(args[0], type) and issubclass(args[0], DeltaConfig):
                cls.config_class = args[0]

    def __init__(self, model: nn.Module, config: C):
        self.model = model
        self.config: C = config
        self.attached = False
        self.merged = False
        self._params: dict[str, nn.Parameter] = {}
        self._swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        self._grad_flags: dict[nn.Parameter, bool] = {}
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stat_hooks: list[Any] = []
        self._off = False  # switched off (`disabled()`): swaps undone, hooks silent, in-place tensors exchanged

    def parts(self) -> list[Delta]:
        return [self]

    # ---- what a method implements -------------------------------------------------------------------
    @abstractmethod
    def build(self) -> list[nn.Parameter]:
        """Change the model (via `self.swap`) and return the tensors to train. Raise TargetError if none fit."""

    def merge_weights(self) -> None:
        """Fold the delta into the base weights (mergeable methods only)."""

    def unmerge_weights(self) -> None:
        """Exactly undo `merge_weights`."""

    def restore(self) -> None:
        """Undo changes other than module swaps (e.g. restore unfrozen weights); called by `detach`."""

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def lr_roles(self) -> dict[str, str]:
        """For LoRA+: trainable tensor name -> "A", "B" (trains at optimizer.loraplus_lr_ratio x its LR) or "embedding"
        (optimizer.loraplus_lr_embedding); methods without low-rank factors name none."""
        return {}

    def for_inference(self) -> None:
        """Replace training-only structure by what it computes (outputs unchanged); most methods have none."""

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors `save` writes: the trainable ones as they are, unless the method saves another form."""
        return {name: p.detach() for name, p in self._params.items()}

    def widen_to(self, tensors: dict[str, torch.Tensor]) -> None:
        """Trainable tensors created narrower than saved (on a bf16 base) take the saved dtype (fp32 master weights,
        as the training loop keeps them), so a loaded delta computes as it did when trained."""
        for name, p in self._params.items():
            saved = tensors.get(name)
            if saved is not None and p.is_floating_point() and saved.is_floating_point() \
                    and saved.element_size() > p.element_size():
                p.data = p.data.to(saved.dtype)

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trainable tensors from `tensors` (in `saved_tensors` form, keys and shapes already checked)."""
        for name, p in self._params.items():
            p.copy_(tensors[name])

    def switch_off(self) -> None:
        """Make the model compute as if the delta were not attached: swapped modules out, `hook`s silent, tensors
        trained in place exchanged with their originals (`keep_values`). Methods that change the model otherwise
        extend this and `switch_on`; `DeltaBase.disabled()` is the public form."""
        self._off = True
        self.set_swapped(False)
        exchange_storage(self._kept)

    def switch_on(self) -> None:
        """Exactly undo `switch_off`."""
        exchange_storage(self._kept)
        self.set_swapped(True)
        self._off = False

    def saved_config(self, directory: Path) -> DeltaConfig:
        """The config to record when saving into `directory`; methods with `folder_fields` copy those folders into
        `directory` here and name the copies relative to it."""
        return self.config

    # ---- helpers for methods ---------------------------------------------------------------------------
    def collapse_to(self, param: nn.Parameter, **config_update) -> None:
        """After a `for_inference` rewrite: `param` (already in the model) is now this delta's only tensor, and the
        config records the simpler structure (e.g. `reparam="none"`) so a saved copy loads into it."""
        self.config = self.config.model_copy(update=config_update)
        self._params = {next(n for n, p in self.model.named_parameters() if p is param): param}

    def hook(self, register: Callable[..., Any], fn: Callable[..., Any], **kwargs: Any) -> Any:
        """`register(fn, **kwargs)` (e.g. `module.register_forward_pre_hook`) with `fn` silent while the delta is
        switched off; returns the handle (the method removes it in `restore`)."""
        def gated(*args: Any) -> Any:
            return None if self._off else fn(*args)

        return register(gated, **kwargs)

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors of the base the delta changes in place (weights it trains): `detach` copies these values back."""
        self._kept = [(t, t.detach().clone()) for t in tensors]

    def swap(self, name: str, new: nn.Module) -> None:
        """Replace the submodule `name` by `new`, remembering the original for `detach`."""
        parent, attr = _parent_of(self.model, name)
        old = getattr(parent, attr)
        check_not_taken({name: old})
        new.train(old.training)  # a module swapped into an eval-mode model must not run dropout
        setattr(parent, attr, new)
        self._swaps.append((parent, attr, old, new))

    def fold_wrappers(self, wrappers: Sequence[nn.Module]) -> None:
        """Merge wrappers (each with `base_layer`, `merge()`, `unmerge()`) into their base layers, then put the plain
        modules back (no added latency). Refuses weights tied to another module: merging would change both."""
        shared = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        if tied := [w for w in wrappers if shared[id(w.base_layer.weight)] > 1]:
            raise ConfigError(f"cannot merge {self.method} into a weight shared with another module ({len(tied)} "
                              "tied, e.g. input embeddings tied to the output head): merging would change both. "
                              "Keep the delta unmerged, or untie the weights before attaching")
        for wrapper in wrappers:
            wrapper.merge()
        self.set_swapped(False)

    def unfold_wrappers(self, wrappers: Sequence[nn.Module]) -> None:
        """Exactly undo `fold_wrappers`."""
        for wrapper in reversed(wrappers):
            wrapper.unmerge()
        self.set_swapped(True)

    def set_swapped(self, swapped: bool) -> None:
        """Put the originals back (False) or the replacements in again (True); used by merge/unmerge."""
        for parent, attr, old, new in (self._swaps if swapped else reversed(self._swaps)):
            setattr(parent, attr, new if swapped else old)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def attach(self) -> Delta:
        """Freeze the base, build the delta, mark only its tensors trainable."""
        if self.attached:
            raise ConfigError(f"this {self.method} delta is already attached")
        self._check_base_precision()
        others = _ATTACHED.setdefault(self.model, [])
        if not others:
            _BASE_FINGERPRINT[self.model] = fingerprint(self.model)
        owned_by_others = {p for other in others for p in other._params.values()}
        self._grad_flags = {p: p.requires_grad for p in self.model.parameters() if p not in owned_by_others}
        for p in self._grad_flags:
            p.requires_grad_(False)
        try:
            owned = self.build()
            if not owned:
                raise TargetError(f"{self.method}: the config selects nothing to train in {type(self.model).__name__}")
            self._check_held_weights(owned)
            if clash := [p for p in owned if p in owned_by_others]:
                raise ConfigError(f"{self.method} would train {len(clash)} tensors another attached delta "
                                  "already owns: these methods cannot be combined on the same modules")
        except BaseException:
            self._undo()
            raise
        # a tied tensor (input embeddings = LM head) is named by its first name, as in named_parameters()
        names = {id(p): n for n, p in reversed(list(self.model.named_parameters(remove_duplicate=False)))}
        self._params = {names[id(p)]: p for p in owned}
        for p in owned:
            p.requires_grad_(True)
        self._match_compute_dtype(owned)
        if not others:  # the first delta freezes the base's running statistics until the last one detaches
            self._stat_hooks = freeze_running_stats(self.model)
        others.append(self)
        self.attached = True
        return self

    def _check_base_precision(self) -> None:
        """A quantized base holds no weights to train, mask or rewrite; a reduced-precision one (model.dtype: bf16)
        none to train in fp32 next to its bf16 tensors."""
        if (reason := self.config.needs_dense_base()) and (quantized := quantized_layers(self.model)):
            raise ConfigError(f"{self.method} {reason} ({len(quantized)} int8/int4 layers, e.g. {quantized[0]}): "
                              "load the base without model.quantize (model.dtype: bf16 halves its memory instead), "
                              "or a method that leaves the base weights as they are (e.g. lora with init kaiming)")
        compute = getattr(self.model, "deltatune_compute_dtype", torch.float32)
        if self.config.trains_base and compute != torch.float32:
            raise ConfigError(f"{self.method} trains the base's own tensors (in fp32), but this base computes in "
                              f"{compute} (model.dtype): load it in fp32 (model.dtype: auto or fp32)")

    def _check_held_weights(self, owned: list[nn.Parameter]) -> None:
        """A QuantizedLinear's weight (int8 / int4 / bf16-held) has no gradient: no delta may train it."""
        held = {id(m.weight): n for n, m in self.model.named_modules() if isinstance(m, QuantizedLinear)}
        if names := [held[id(p)] for p in owned if id(p) in held]:
            raise ConfigError(f"{self.method} would train the weights of {len(names)} layers held frozen in "
                              f"{self.model.get_submodule(names[0]).mode} (e.g. {names[0]}): load the base in fp32 "
                              "(model.dtype: fp32, no model.quantize) to train its weights")

    def _match_compute_dtype(self, owned: list[nn.Parameter]) -> None:
        """A base held in bf16 but computing in fp32 (models/precision.hold_in_bf16) gets fp32 delta tensors, however
        a method sized them (many take the dtype of the weight they extend): the trained ones and the frozen ones
        of the modules it swapped in (e.g. fusion's adapters), never the base's own."""
        if getattr(self.model, "deltatune_compute_dtype", None) != torch.float32:
            return
        for p in {*owned, *(p for *_, new in self._swaps for p in new.parameters())}:
            if p not in self._grad_flags and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()

    def detach(self) -> None:
        stack = _ATTACHED.get(self.model, [])
        if not self.attached:
            raise ConfigError(f"this {self.method} delta is not attached")
        if stack[-1] is not self:
            raise ConfigError(f"detach deltas in reverse order of attaching: {stack[-1].method} was attached last")
        if self.merged:
            self.unmerge()
        self.restore()
        self._undo()
        for hook in self._stat_hooks:
            hook.remove()
        self._stat_hooks = []
        stack.pop()
        self.attached = False

    def merge(self) -> None:
        if not self.mergeable:
            raise ConfigError(f"{self.method} cannot be merged into the base weights; keep it attached instead")
        if self.merged:
            raise ConfigError(f"this {self.method} delta is already merged")
        if quantized := quantized_layers(self.model):
            raise ConfigError(f"cannot merge {self.method} into a quantized base ({len(quantized)} int8/int4 layers, "
                              f"e.g. {quantized[0]}): save the delta, then load it onto the base loaded without "
                              "model.quantize (`deltatune merge RUN OUT` does this for a quantized run), or onto "
                              "deltatune.models.quantize.dequantize_base(model) before attaching, and merge there")
        with torch.no_grad():
            self.merge_weights()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise ConfigError(f"this {self.method} delta is not merged")
        with torch.no_grad():
            self.unmerge_weights()
        self.merged = False

    def _undo(self) -> None:
        with torch.no_grad():
            for tensor, value in self._kept:
                tensor.copy_(value)
        self._kept = []
        self.set_swapped(False)
        self._swaps.clear()
        for p, flag in self._grad_flags.items():
            p.requires_grad_(flag)


def exchange_storage(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Swap the storage of each (tensor, other) pair: no copy, no version bump of a tensor autograd saved."""
    for tensor, other in pairs:
        tensor.data, other.data = other.data, tensor.data


def freeze_running_stats(model: nn.Module) -> list[Any]:
    """Make BatchNorm-style layers normalise with their running statistics in training too, and never update them:
    those statistics are base-model buffers, which a delta must leave bit for bit (and which it does not save)."""
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            hooks += [module.register_forward_pre_hook(_use_running_stats),
                      module.register_forward_hook(_restore_mode)]
    return hooks


def _use_running_stats(module: nn.Module, args: tuple) -> None:
    module.deltatune_training = module.training
    module.training = False


def _restore_mode(module: nn.Module, args: tuple, output: Any) -> None:
    module.training = module.__dict__.pop("deltatune_training", module.training)


class DeltaGroup(DeltaBase):
    """Several deltas attached to one model together (e.g. LoRA on the body plus a new task head)."""

    def __init__(self, model: nn.Module, deltas: Sequence[Delta]):
        self.model = model
        self._parts = list(deltas)

    def parts(self) -> list[Delta]:
        return list(self._parts)

    @property
    def merged(self) -> bool:
        return all(part.merged for part in self._parts)


def attach(model: nn.Module, config: DeltaConfig | Sequence[DeltaConfig]) -> Delta | DeltaGroup:
    """Attach one method (or several, in order) to `model`; returns the delta handle."""
    configs = [config] if isinstance(config, DeltaConfig) else list(config)
    if not configs:
        raise ConfigError("attach() needs at least one method config, e.g. deltatune.LoRA(r=8)")
    attached: list[Delta] = []
    try:
        for cfg in configs:
            if not isinstance(cfg, DeltaConfig):
                raise ConfigError(f"expected a method config such as deltatune.LoRA(...), got {type(cfg).__name__}")
            attached.append(method_of(cfg).delta_class(model, cfg).attach())
    except BaseException:
        for delta in reversed(attached):
            delta.detach()
        raise
    return attached[0] if len(attached) == 1 else DeltaGroup(model, attached)


def read_delta_config(path: str | Path) -> dict[str, Any]:
    """Read and check `delta.json` of a saved delta folder."""
    path = Path(path)
    file = inside(path, CONFIG_FILE, str(path))
    if not file.is_file():
        hint = " (it looks like a Hugging Face PEFT adapter)" if (path / "adapter_config.json").exists() else ""
        raise CheckpointError(f"{path} is not a saved deltatune delta: {CONFIG_FILE} not found{hint}")
    try:
        meta = storage.read_json(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupted: {exc}") from None
    if isinstance(meta, dict) and meta.get("format") == FORMAT and isinstance(meta.get("version"), int) \
            and meta["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {meta['version']} is newer than this deltatune reads "
                              f"({FORMAT_VERSION}); upgrade deltatune")
    try:
        DeltaFile.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise CheckpointError(f"{file} is not a valid deltatune delta file: {where}: {err['msg']} "
                              f"({len(exc.errors())} problem(s)); save the delta again with deltatune") from None
    return meta


def load(model: nn.Module, path: str | Path) -> Delta | DeltaGroup:
    """Attach the delta saved in folder `path` to `model` (a fresh copy of the same base) and load its tensors.
    A Hugging Face PEFT adapter folder (`adapter_config.json`) loads as the equivalent deltas."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        for marker, loader in FOREIGN_FORMATS.items():
            if (path / marker).is_file():
                module, _, function = loader.partition(":")
                return getattr(importlib.import_module(module), function)(model, path)
    meta = read_delta_config(path)
    check_same_base(meta["base"], base_fingerprint(model))
    where = str(path / CONFIG_FILE)
    configs = [parse_delta_config(_in_folder(d["config"], path, where), where=where) for d in meta["deltas"]]
    tensors = read_delta_tensors(path, meta)
    delta = attach(model, configs)
    try:
        delta.load_state_dict(tensors)
    except BaseException:
        delta.detach()
        raise
    return delta


def read_delta_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the delta folder `path` whose `delta.json` is `meta`: checksum verified, all finite."""
    tensor_file = inside(path, TENSOR_FILE, str(path / CONFIG_FILE))
    if not tensor_file.is_file() or storage.sha256(tensor_file) != meta.get("sha256"):
        raise CheckpointError(f"{tensor_file} is missing or corrupted (checksum differs from {CONFIG_FILE})")
    tensors = storage.load_tensors(tensor_file)
    check_finite(tensors, str(tensor_file))
    return tensors


def _in_folder(raw: Any, folder: Path, where: str) -> Any:
    """A saved method config with its `folder_fields` resolved inside `folder` (CheckpointError if one leaves it)."""
    method = methods().get(raw.get("method")) if isinstance(raw, dict) else None
    fields = method.config_class.folder_fields if method else ()
    return {**raw, **{f: [str(inside(folder, name, f"{where}: {f}")) for name in raw[f]]
                      for f in fields if isinstance(raw.get(f), list)}}


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of `model` as it was before any delta changed it (weights trained in place included)."""
    return _BASE_FINGERPRINT[model] if _ATTACHED.get(model) else fingerprint(model)


def occupied_positions(model: nn.Module) -> int:
    """Sequence positions the deltas attached to `model` take from its context (virtual tokens, prefixes)."""
    return sum(delta.extra_positions for delta in _ATTACHED.get(model, []))


def owned_tensors(model: nn.Module) -> set[int]:
    """ids of the tensors that deltas already attached to `model` own (a new delta must leave them alone)."""
    return {id(p) for delta in _ATTACHED.get(model, []) for p in delta._params.values()}


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _preview(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
