"""GGUF files for llama.cpp and Ollama, written with the `gguf` package: the merged model (`export_gguf`: fp32,
fp16, bf16 or q8_0 weights, hyper-parameters and tokenizer) and a LoRA adapter in llama.cpp's GGUF-LoRA layout
(`export_gguf_lora`: general.type=adapter, adapter.type=lora, adapter.lora.alpha, `<weight>.lora_a` / `.lora_b`).

Tensor names come from the gguf package's own map (what llama.cpp's converters use). llama.cpp stores the query and
key rows of Llama models in interleaved rotary order, so those weights (and a LoRA's B factor for them) are
permuted; transformers' GGUF loader (assets.convert_gguf, the reverse direction) undoes it.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from deltatune.delta import DeltaBase
from deltatune.errors import ConfigError
from deltatune.interop.hf import merged_model
from deltatune.storage import atomic_path

ARCHS = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA}
QTYPES = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
ROTARY = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}  # rows permuted for llama.cpp


def export_gguf(delta: DeltaBase, tokenizer: Any, out: str | Path, *, dtype: str | None = None,
                name: str = "") -> Path:
    """Merge `delta` and write the model with its tokenizer (and chat template) as one GGUF file `out`;
    `dtype` as in `write_gguf`."""
    _arch(delta.model)
    if tokenizer is None:
        raise ConfigError("the base model folder has no tokenizer; a GGUF model file needs one")
    return write_gguf(merged_model(delta), tokenizer, check_new_file(out), dtype=dtype, name=name)


def write_gguf(model: nn.Module, tokenizer: Any, out: str | Path, *, dtype: str | None = None,
               name: str = "") -> Path:
    """Write a transformers Llama-family causal LM and its tokenizer as one GGUF file `out`, atomically.

    `dtype`: fp32, fp16, bf16 or q8_0 (8-bit blocks of 32; 1-D tensors stay fp32 and rows not divisible by 32
    fp16, as llama.cpp's converter does); default fp16, or bf16 for a bf16 model."""
    arch, out = _arch(model), Path(out)
    dtype = dtype or ("bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp16")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    _add_hparams(writer, model.config, name, dtype)
    _add_vocab(writer, tokenizer, model.config)
    for gguf_name, tensor in _gguf_tensors(model, arch).items():
        _add_tensor(writer, gguf_name, tensor, dtype)
    return _write(writer, out)


def export_gguf_lora(delta: DeltaBase, out: str | Path, *, dtype: str = "fp32", name: str = "") -> Path:
    """Write a LoRA delta as a llama.cpp adapter file `out` (`llama-cli -m BASE.gguf --lora out`): for every
    adapted weight W, `.lora_a` = A (r x in) and `.lora_b` = B (out x r), applied as W + alpha / r * B A."""
    arch = _arch(delta.model)
    parts = delta.parts()
    if [p.peft_type for p in parts] != ["LORA"]:  # LoRA's form: A and B factors per weight
        methods = " + ".join(p.method for p in parts)
        raise ConfigError(f"a GGUF LoRA adapter holds one LoRA delta; this one has {methods}. "
                          "Export the merged model instead (--format gguf)")
    config = parts[0].config
    if config.init != parts[0].saved_config(Path()).init:
        raise ConfigError(f"this LoRA (init {config.init}) changed its base weights: save it and export the saved "
                          "folder (the plain LoRA of the original base)")
    if config.dora or config.scaling != "standard":
        raise ConfigError("llama.cpp applies a LoRA as W + alpha / r * B A: DoRA and rsLoRA have no GGUF adapter "
                          "form. Export the merged model instead (--format gguf)")
    out = check_new_file(out)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
    if name:
        writer.add_name(name)
    table = gguf.get_tensor_name_map(arch, delta.model.config.num_hidden_layers)
    for module_name, wrapper in _lora_modules(delta).items():
        weight = table.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        tied_head = weight == "output.weight" and delta.model.config.tie_word_embeddings  # no such tensor in GGUF
        if weight is None or not isinstance(wrapper.base_layer, nn.Linear) or tied_head:
            raise ConfigError(f"LoRA on {module_name}: llama.cpp adapters hold LoRAs of the attention and MLP "
                              "projections only. Export the merged model instead (--format gguf)")
        a, b = wrapper.lora_A.weight.detach(), wrapper.lora_B.weight.detach()
        _add_tensor(writer, weight + ".lora_a", a, dtype)
        _add_tensor(writer, weight + ".lora_b", _rotary_rows(delta.model.config, module_name, b), dtype)
    return _write(writer, out)


# ---------------------------------------------------------------- pieces

def _arch(model: nn.Module) -> gguf.MODEL_ARCH:
    name = type(model).__name__
    if name not in ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(ARCHS)} models, not {name}; export a transformers "
                          "model (--format hf) or a PEFT adapter (--format peft) instead")
    return ARCHS[name]


def check_new_file(out: str | Path) -> Path:
    """A GGUF export is one new .gguf file: never an existing path (nothing of the user's is overwritten)."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: a GGUF export is one file; give a new path ending in .gguf")
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file name")
    return out


def _write(writer: gguf.GGUFWriter, out: Path) -> Path:
    """Write the file under a temporary name next to `out` and rename it into place (never half-written)."""
    with atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _name_map(model: nn.Module, arch: gguf.MODEL_ARCH) -> dict[str, str]:
    """transformers parameter name -> GGUF tensor name, for every parameter llama.cpp reads."""
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for hf_name, _ in model.named_parameters():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when there is no output.weight
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"no GGUF name for {hf_name}: this {type(model).__name__} has a tensor llama.cpp "
                              "does not know")
        names[hf_name] = gguf_name
    return names


def _gguf_tensors(model: nn.Module, arch: gguf.MODEL_ARCH) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {gguf_name: _rotary_rows(model.config, hf_name.rsplit(".", 1)[0], params[hf_name].detach())
            for hf_name, gguf_name in _name_map(model, arch).items()}


def _rotary_rows(config: Any, module_name: str, rows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's row order of a query/key projection: each head's two rotary halves interleaved."""
    heads_key = ROTARY.get(module_name.rsplit(".", 1)[-1])
    if heads_key is None:
        return rows
    heads = getattr(config, heads_key) or config.num_attention_heads
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, dtype: str) -> None:
    data = tensor.float().numpy()
    qtype = QTYPES[dtype] if data.ndim > 1 else gguf.GGMLQuantizationType.F32  # norms stay fp32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, data.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_hparams(writer: gguf.GGUFWriter, config: Any, name: str, dtype: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope scaling {rope['rope_type']!r} is not written to GGUF by deltatune yet")
    writer.add_name(name or "deltatune model")
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _add_vocab(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    """Tokens, merges, special ids and the chat template, read back from the tokenizer's saved files."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        folder = Path(tmp)
        try:
            vocab: gguf.BaseVocab = gguf.BpeVocab(folder)
        except FileNotFoundError:
            try:
                vocab = gguf.LlamaHfVocab(folder)
            except (FileNotFoundError, TypeError) as e:
                raise ConfigError(f"GGUF export needs a byte-level BPE or a Llama (byte-fallback) tokenizer: {e}") \
                    from None
        tokens, scores, types = zip(*vocab.all_tokens())
        if len(tokens) > config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokens)} tokens, more than the model's {config.vocab_size}")
        pad = config.vocab_size - len(tokens)  # embedding rows without a token (llama.cpp needs one per row)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(_pre_tokenizer(folder) if vocab.tokenizer_model == "gpt2" else "default")
        writer.add_token_list([*tokens, *(f"[PAD{i}]".encode() for i in range(pad))])
        writer.add_token_scores([*scores, *[-1000.0] * pad])
        writer.add_token_types([*types, *[gguf.TokenType.UNUSED] * pad])
        gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2",
                          n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenization (how text is split before BPE)."""
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    byte_level = steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True)
    if byte_level and len(steps) == 1:
        return "gpt-2"
    if byte_level and len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"
    warnings.warn("the tokenizer's pre-tokenizer has no known llama.cpp name; the GGUF file says 'default', so "
                  "llama.cpp may split some text differently than transformers", stacklevel=2)
    return "default"


def _lora_modules(delta: DeltaBase) -> dict[str, nn.Module]:
    from deltatune.interop.peft import wrapped_modules

    return wrapped_modules(delta.parts()[0])
