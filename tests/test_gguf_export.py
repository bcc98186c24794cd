"""GGUF export for llama.cpp / Ollama: the merged model and the GGUF-LoRA adapter, read back with `gguf`'s reader
and with transformers' GGUF loader (the reverse direction, assets.convert_gguf)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import deltatune
from deltatune.interop.hf import TORCH_DTYPES
from deltatune.interop.llamacpp import export_gguf, export_gguf_lora, write_gguf
from deltatune.methods.lora import LoRA
from tests.tiny_lm import KV_HEADS, tiny_llama, tiny_tokenizer

PROMPTS = ["the quick brown fox", "hello world, how are"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def trained_lora(tokenizer, **lora) -> tuple[torch.nn.Module, deltatune.DeltaBase]:
    """A tiny Llama with a LoRA on every projection whose B is non-zero (the delta changes outputs)."""
    model = tiny_llama(tokenizer, seed=3)
    delta = deltatune.attach(model, LoRA(r=4, alpha=8, **lora))
    torch.manual_seed(4)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.2 * torch.randn_like(p))
    return model, delta


def lm_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def read_back(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def as_float(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of a GGUF file in float32, shaped as numpy wrote it (rows x columns)."""
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        [int(n) for n in reversed(t.shape)])


@pytest.mark.parametrize(("dtype", "atol"), [("fp32", 1e-5), ("fp16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_merged_gguf_gives_the_merged_logits(tokenizer, tmp_path, dtype, atol):
    model, delta = trained_lora(tokenizer)
    expected = lm_logits(model, tokenizer)
    path = export_gguf(delta, tokenizer, tmp_path / "model.gguf", dtype=dtype, name="tiny")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == {"fp32": 0, "fp16": 1, "bf16": 32, "q8_0": 7}[dtype]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay fp32
    assert kinds["blk.0.attn_q.weight"] == {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    merged = dict(model.named_parameters())  # export merged the delta in place
    back = read_back(path)
    for name, p in back.named_parameters():
        torch.testing.assert_close(p, merged[name].to(TORCH_DTYPES.get(dtype, torch.float32)).float(),
                                   atol=atol / 10 if dtype == "fp32" else 0.02, rtol=0.02)
    torch.testing.assert_close(lm_logits(back, tokenizer), expected, atol=atol, rtol=0)


def test_gguf_lora_layout_applies_as_llama_cpp_does(tokenizer, tmp_path):
    """W + alpha / r * lora_b @ lora_a over the base GGUF's tensors gives the merged GGUF's tensors."""
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    _, delta = trained_lora(tokenizer, targets=targets)
    adapter = export_gguf_lora(delta, tmp_path / "lora.gguf", name="tiny")
    reader = gguf.GGUFReader(adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    lora = tensors(adapter)
    assert sorted(lora) == sorted(f"blk.{i}.{m}.weight.lora_{ab}" for i in range(2) for ab in "ab"
                                  for m in ("attn_q", "attn_k", "attn_v", "ffn_down"))
    assert as_float(lora["blk.0.attn_k.weight.lora_a"]).shape == (4, 32)  # A: r x in
    assert as_float(lora["blk.0.attn_k.weight.lora_b"]).shape == (KV_HEADS * 8, 4)  # B: out x r

    base = write_gguf(tiny_llama(tokenizer, seed=3), tokenizer, tmp_path / "base.gguf", dtype="fp32")
    merged = export_gguf(delta, tokenizer, tmp_path / "merged.gguf", dtype="fp32")
    base_t, merged_t = tensors(base), tensors(merged)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        a, b = as_float(lora[name + ".lora_a"]), as_float(lora[name + ".lora_b"])
        np.testing.assert_allclose(as_float(base_t[name]) + 8 / 4 * b @ a, as_float(merged_t[name]), atol=1e-5)
    assert not np.allclose(as_float(base_t["blk.0.attn_q.weight"]), as_float(merged_t["blk.0.attn_q.weight"]))
