"""Hugging Face PEFT adapter folders, both ways: `export_peft` writes `adapter_config.json` and
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads with the same outputs; `load_peft` (what
`deltatune.load` does with such a folder) attaches the equivalent deltas.

deltatune's tensors already follow PEFT's layouts, so the format is a table, `SPECS`: per PEFT adapter type, its
adapter-config fields and the PEFT key of every tensor. Which method a PEFT type is comes from the registry: a
method's `peft_type` (and `peft_options`, e.g. prefix-tuning's `prefix_projection`) class attributes; no method is
imported here. One adapter holds one method; a task head (`peft_type = "modules_to_save"`) goes along as PEFT's
`modules_to_save`. Prompt-learning adapters are written in the
inference form PEFT itself saves: P-tuning as the prompt encoder's output, prefix-tuning as the prefix its MLP
computes. They load back as plain virtual tokens / prefixes (the same outputs; the encoder or MLP is not in the
file, in PEFT either).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from deltatune import storage
from deltatune.arch import describe
from deltatune.delta import Delta, DeltaBase, DeltaConfig, DeltaGroup, attach
from deltatune.errors import CheckpointError, ConfigError
from deltatune.registry import Method, methods

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TUNER_PREFIX = "base_model.model."  # LoRA / IA3 keys: PEFT wraps the model in a LoraModel / IA3Model
PROMPT_PREFIX = "base_model."  # modules_to_save keys of prompt-learning adapters
PROMPT_KEY = "prompt_embeddings"
MODULES_TO_SAVE = "modules_to_save"  # the `peft_type` of a method PEFT saves as whole modules (a task head)
# PEFT task types by the model class that the transformers Auto classes build for them
TASK_TYPES = {"SEQ_CLS": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
              "CAUSAL_LM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
              "TOKEN_CLS": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
              "QUESTION_ANS": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
              "FEATURE_EXTRACTION": modeling_auto.MODEL_MAPPING_NAMES}


class Spec:
    """One PEFT adapter type: how the configs and tensors of the methods of that `peft_type` map."""

    peft_type: ClassVar[str]
    head_prefix: ClassVar[str] = TUNER_PREFIX
    needs_task_type: ClassVar[bool] = False

    def config(self, delta: Delta) -> dict[str, Any]:
        """The adapter-config fields of this method (PEFT's names)."""
        raise NotImplementedError

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        """The deltatune config (of the method's `config_class`) of a PEFT adapter config."""
        raise NotImplementedError

    def keys(self, delta: Delta) -> dict[str, str]:
        """Our tensor name -> PEFT key."""
        return {name: TUNER_PREFIX + name for name in delta.trainable_parameters()}

    def tensors(self, delta: Delta) -> dict[str, torch.Tensor]:
        """Our tensor name -> the tensor as PEFT stores it."""
        return delta.state_dict()


def wrapped_modules(delta: Delta) -> dict[str, nn.Module]:
    """Module name -> wrapper, for methods that wrap modules (`delta.wrappers`, each with a `base_layer`)."""
    names = {id(m): n for n, m in delta.model.named_modules()}
    return {names[id(w)]: w for w in delta.wrappers}  # type: ignore[attr-defined]


def tuner_fields(delta: Delta) -> dict[str, Any]:
    modules = wrapped_modules(delta)
    return {"target_modules": compact_names(modules, base_module_names(delta.model, modules)),
            "fan_in_fan_out": any(isinstance(w.base_layer, Conv1D) for w in modules.values())}


def base_module_names(model: nn.Module, wrapped: dict[str, nn.Module]) -> list[str]:
    """The module names of the base model (without the insides of the delta's wrappers)."""
    return [n for n, _ in model.named_modules() if not any(n.startswith(w + ".") for w in wrapped)]


def compact_names(names: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """PEFT's short form of a module list: the last name parts (`q_proj`), as PEFT writes them, when those select
    exactly `names` among `candidates` (PEFT matches a name or its dot-suffix); else the full names."""
    short = {n.rsplit(".", 1)[-1] for n in names}
    selected = {c for c in candidates if c.rsplit(".", 1)[-1] in short}
    return sorted(short) if selected == set(names) else sorted(names)


def patterns(value: str | list[str] | None) -> list[str] | None:
    """PEFT's target list (names / dot-suffixes) or regex string (full match) as deltatune patterns."""
    if value is None or isinstance(value, list):
        return value
    return [value] if value == "all-linear" else [f"re:{value}"]


def refuse(peft: dict[str, Any], defaults: dict[str, Any]) -> None:
    """One error naming the PEFT options deltatune cannot represent, when set to anything but their default."""
    if used := [f"{key}={peft[key]!r}" for key, default in defaults.items() if peft.get(key) not in (default, None)]:
        raise ConfigError(f"PEFT {peft['peft_type']} adapter uses options deltatune cannot represent: "
                          f"{', '.join(used)}")


class LoRASpec(Spec):
    peft_type = "LORA"
    UNSUPPORTED: ClassVar[dict[str, Any]] = {  # PEFT options without a deltatune form, and their defaults
        "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layers_to_transform": None,
        "target_parameters": None, "layer_replication": None, "trainable_token_indices": None, "use_qalora": False,
        "alora_invocation_tokens": None}

    def config(self, delta: Delta) -> dict[str, Any]:
        cfg = delta.saved_config(Path())  # PiSSA / OLoRA: the plain rank-2r form they save as
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.scaling == "rslora",
                "use_dora": cfg.dora, "bias": "none", **tuner_fields(delta)}

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        refuse(peft, self.UNSUPPORTED)
        init = str(peft.get("init_lora_weights", True)).lower()
        if init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
            raise ConfigError(f"PEFT LORA adapter with init_lora_weights={init!r}: its tensors fit only the residual "
                              "base model PEFT changed at init. Save it from PEFT with save_pretrained(..., "
                              "path_initial_model_for_weight_conversion=...) to get a plain LoRA of the original base")
        return config_class(r=peft["r"], alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                    scaling="rslora" if peft.get("use_rslora") else "standard", dora=bool(peft.get("use_dora")),
                    targets=patterns(peft["target_modules"]), exclude=patterns(peft.get("exclude_modules")) or [])

    def keys(self, delta: Delta) -> dict[str, str]:
        """As in the model, except embeddings: PEFT names their factors `lora_embedding_A/B` (no `.weight`)."""
        embeddings = {n for n, w in wrapped_modules(delta).items() if isinstance(w.base_layer, nn.Embedding)}
        keys = {}
        for name in delta.trainable_parameters():
            module, _, leaf = name.partition(".lora_")
            if module in embeddings and leaf in ("A.weight", "B.weight"):
                keys[name] = f"{TUNER_PREFIX}{module}.lora_embedding_{leaf[0]}"
            else:
                keys[name] = TUNER_PREFIX + name
        return keys


class IA3Spec(Spec):
    peft_type = "IA3"

    def config(self, delta: Delta) -> dict[str, Any]:
        modules, fields = wrapped_modules(delta), tuner_fields(delta)
        feedforward = [n for n, w in modules.items() if w.is_feedforward]
        short = compact_names(feedforward, list(modules))
        if not set(short) <= set(fields["target_modules"]):  # PEFT wants feedforward within target_modules
            return {**fields, "target_modules": sorted(modules), "feedforward_modules": sorted(feedforward)}
        return {**fields, "feedforward_modules": short}

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        return config_class(targets=patterns(peft["target_modules"]),
                            feedforward=patterns(peft.get("feedforward_modules")) or [],
                            exclude=patterns(peft.get("exclude_modules")) or [])


class PromptLearningSpec(Spec):
    """Virtual tokens or prefixes: one tensor, `prompt_embeddings`, plus the model's shape in the config."""

    head_prefix = PROMPT_PREFIX
    needs_task_type = True

    def config(self, delta: Delta) -> dict[str, Any]:
        text = delta.model.config.get_text_config()
        return {"num_virtual_tokens": self.n_tokens(delta), "token_dim": text.hidden_size,
                "num_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
                "num_transformer_submodules": 1}

    def n_tokens(self, delta: Delta) -> int:
        return delta.config.n_tokens  # type: ignore[attr-defined]

    def keys(self, delta: Delta) -> dict[str, str]:
        """The tensor PEFT keeps: the virtual tokens (P-tuning: the encoder's input) or the plain prefix."""
        inference = self.inference_parameter(delta)
        return {next(n for n, p in delta.trainable_parameters().items() if p is inference): PROMPT_KEY}

    def tensors(self, delta: Delta) -> dict[str, torch.Tensor]:
        (name,) = self.keys(delta)
        return {name: self.inference_tensor(delta).detach()}

    def inference_parameter(self, delta: Delta) -> nn.Parameter:
        return delta.carrier.tokens.embedding  # type: ignore[attr-defined]

    def inference_tensor(self, delta: Delta) -> torch.Tensor:
        """What the model uses: for P-tuning the encoder's output, stored where PEFT's inference form keeps it."""
        return delta.carrier.tokens()  # type: ignore[attr-defined]


class VirtualTokensSpec(PromptLearningSpec):
    """Prompt tuning and P-tuning: PEFT puts the virtual tokens first, before any real token."""

    def config(self, delta: Delta) -> dict[str, Any]:
        problems = [text for text, present in (
            ("virtual tokens after the first token (position 'auto' keeps an encoder's [CLS] first)", delta.keep_first),
            ("pieces after the text", delta.after), ("fixed words or {mask} in the template", delta.literal_ids),
        ) if present]  # type: ignore[attr-defined]
        if problems:
            raise ConfigError(f"PEFT puts only {delta.method} virtual tokens, before the whole input; this delta has "
                              f"{'; '.join(problems)}: it has no PEFT form. Train with `position: start` and only "
                              "[P] tokens before {text} to export it")
        return super().config(delta)

    def n_tokens(self, delta: Delta) -> int:
        return len(delta.before)  # type: ignore[attr-defined]


class PromptSpec(VirtualTokensSpec):
    peft_type = "PROMPT_TUNING"

    def config(self, delta: Delta) -> dict[str, Any]:
        return {**super().config(delta), "prompt_tuning_init": "RANDOM"}

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        return config_class(n_tokens=peft["num_virtual_tokens"], init="random", position="start")


class PTuningSpec(VirtualTokensSpec):
    peft_type = "P_TUNING"

    def config(self, delta: Delta) -> dict[str, Any]:
        cfg = delta.config
        return {**super().config(delta), "encoder_hidden_size": cfg.hidden_size,
                "encoder_reparameterization_type": "LSTM" if cfg.encoder == "lstm" else "MLP"}

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        template = "[P]" * peft["num_virtual_tokens"] + " {text}"
        return config_class(template=template, encoder="none", position="start",
                       hidden_size=peft.get("encoder_hidden_size") or 128)


class PrefixSpec(PromptLearningSpec):
    """Prefix-tuning (`prefix_projection`: trained through an MLP) and P-tuning v2 (without); the tensor is
    (n, layers·2·kv width)."""

    peft_type = "PREFIX_TUNING"

    def config(self, delta: Delta) -> dict[str, Any]:
        shape, cfg = delta.shape, delta.config  # type: ignore[attr-defined]
        return {**super().config(delta), "token_dim": shape.kv_heads * shape.head_dim,
                "num_attention_heads": shape.kv_heads, "encoder_hidden_size": cfg.hidden_size}

    def delta_config(self, peft: dict[str, Any], config_class: type[DeltaConfig]) -> DeltaConfig:
        n = peft["num_virtual_tokens"]
        if peft.get("prefix_projection"):  # the MLP is not in the file: its output loads as a plain prefix
            return config_class(n_tokens=n, reparam="none", hidden_size=peft.get("encoder_hidden_size") or 512)
        return config_class(n_tokens=n)

    def inference_parameter(self, delta: Delta) -> nn.Parameter:
        return delta.carrier.prefix.weight  # type: ignore[attr-defined]  (a plain prefix after for_inference)

    def inference_tensor(self, delta: Delta) -> torch.Tensor:
        return delta.carrier.prefix()  # type: ignore[attr-defined]


SPECS: dict[str, Spec] = {spec.peft_type: spec for spec in (LoRASpec(), IA3Spec(), PromptSpec(), PTuningSpec(),
                                                               PrefixSpec())}


def supported() -> str:
    """Which methods have a PEFT form (from the registry)."""
    names = [name for name, method in methods().items() if method.delta_class.peft_type in SPECS]
    return f"PEFT formats exist for {', '.join(names)} (one of them per adapter; a task head goes along as " \
           f"{MODULES_TO_SAVE})"


def method_of_peft(peft: dict[str, Any], where: str | Path) -> Method:
    """The registered method of a PEFT adapter config: its `peft_type`, and its `peft_options` flags."""
    found = [m for m in methods().values() if m.delta_class.peft_type == peft.get("peft_type")
             and all(bool(peft.get(key)) is value for key, value in m.delta_class.peft_options.items())]
    if len(found) != 1:
        names = f" ({' or '.join(m.name for m in found)})" if found else ""
        raise CheckpointError(f"{where}: PEFT type {peft.get('peft_type')!r} matches {len(found)} deltatune methods"
                              f"{names}; set exactly one method's peft_type / peft_options for it")
    return found[0]


# ---- export ------------------------------------------------------------------------------------------------
def export_peft(delta: DeltaBase, out: str | Path, *, base_name: str | None = None, tokenizer: Any = None) -> Path:
    """Write `delta` as a PEFT adapter folder `out` (atomically), with `tokenizer` (and its chat template) when
    given. Prompt/prefix deltas are put in inference form. `base_name` is the adapter's
    `base_model_name_or_path` (default: the model's `name_or_path`)."""
    main, heads = _split(delta)
    spec = SPECS[main.peft_type]  # type: ignore[index]
    delta.for_inference()
    task_type = peft_task_type(delta.model)
    if spec.needs_task_type and task_type is None:
        raise ConfigError(f"PEFT runs {main.method} only on models of a PEFT task type (sequence classification, "
                          f"causal LM, token classification, ...); {type(delta.model).__name__} is none of them")
    keys = spec.keys(main)
    tensors = {keys[name]: t for name, t in spec.tensors(main).items()}
    head_tensors = {name: t for head in heads for name, t in head.state_dict().items()}
    tensors |= {spec.head_prefix + name: t for name, t in head_tensors.items()}
    config = {"peft_type": spec.peft_type, "task_type": task_type, "inference_mode": True,
              "base_model_name_or_path": base_name or getattr(delta.model.config, "_name_or_path", None) or None,
              "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in head_tensors}) or None, **spec.config(main),
              **main.peft_options}
    with storage.new_folder(out) as tmp:
        storage.save_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        storage.write_json(tmp / CONFIG_FILE, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _split(delta: DeltaBase) -> tuple[Delta, list[Delta]]:
    """(the one method PEFT has a format for, the task heads); anything else is one ConfigError."""
    parts = delta.parts()
    heads = [p for p in parts if p.peft_type == MODULES_TO_SAVE]
    convertible = [p for p in parts if p.peft_type in SPECS]
    if other := [p.method for p in parts if p not in heads and p not in convertible]:
        raise ConfigError(f"PEFT has no format for {', '.join(other)}. {supported()}")
    if len(convertible) != 1:
        found = " + ".join(p.method for p in convertible) or "only a task head"
        raise ConfigError(f"a PEFT adapter holds exactly one method, this delta has {found}. {supported()}")
    return convertible[0], heads


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type of a transformers model, from the Auto class that builds its class; None if no such class."""
    name = type(model).__name__
    for task_type, classes in TASK_TYPES.items():
        if any(name == c or (isinstance(c, tuple) and name in c) for c in classes.values()):
            return task_type
    return None


# ---- import ------------------------------------------------------------------------------------------------
def load_peft(model: nn.Module, folder: str | Path) -> Delta | DeltaGroup:
    """Attach the deltas equivalent to the PEFT adapter in `folder` and load its tensors (key and shape checked)."""
    folder = Path(folder)
    peft = _read_config(folder)
    spec = SPECS.get(peft.get("peft_type", ""))
    if spec is None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: PEFT type {peft.get('peft_type')!r} has no deltatune "
                              f"equivalent; supported PEFT types: {', '.join(SPECS)}")
    if peft.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{folder / CONFIG_FILE}: encoder-decoder prompt learning "
                              "(num_transformer_submodules=2) is not supported")
    config = spec.delta_config(peft, method_of_peft(peft, folder / CONFIG_FILE).config_class)
    tensors = _read_tensors(folder)
    main = attach(model, config)
    parts: list[Delta] = [main]  # type: ignore[list-item]
    try:
        keys = spec.keys(main)  # type: ignore[arg-type]
        rest = {k.removeprefix(spec.head_prefix): v for k, v in tensors.items() if k not in keys.values()}
        if rest:
            parts.append(attach(model, _head_config(model, rest, folder / CONFIG_FILE)))  # type: ignore[arg-type]
            keys |= {name: spec.head_prefix + name for name in parts[-1].trainable_parameters()}
        _check_keys(folder, set(keys.values()), set(tensors))
        for part in parts:
            part.load_state_dict({name: tensors[keys[name]] for name in part.trainable_parameters()})
    except BaseException:
        for part in reversed(parts):
            part.detach()
        raise
    return parts[0] if len(parts) == 1 else DeltaGroup(model, parts)


def _head_config(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> DeltaConfig:
    """A head owning the modules_to_save tensors: the model's known head is the output, others train along."""
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    known = [m for m in modules if m in describe(model).heads]
    output = known[-1] if known else modules[-1]
    weight = tensors.get(f"{output}.weight")
    head = method_of_peft({"peft_type": MODULES_TO_SAVE}, where).config_class
    return head(module=output, num_labels=None if weight is None else weight.shape[0],
                also_train=[m for m in modules if m != output])


def _check_keys(folder: Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the adapter its config describes on this model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}. Load it onto the base model "
                              "(and model class) it was trained with")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        peft = storage.read_json(folder / CONFIG_FILE)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / CONFIG_FILE}: {exc}") from None
    if not isinstance(peft, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: expected a JSON object")
    return peft


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        pickled = " (only adapter_model.bin, a pickle: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{file} not found{pickled}")
    return storage.load_tensors(file)
