"""Quantized frozen base (model.quantize: int8 | int4, torchao CPU kernels): accuracy, training, merge rules."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import transformers
from torch import nn

import deltatune
from deltatune.config import validate_config
from deltatune.errors import ConfigError
from deltatune.models import quantize
from deltatune.models.quantize import dequantize_base, quantize_base, quantized_layers
from deltatune.models.load import load_model
from deltatune.runs.session import run_training
from tests.test_precision import base_dtypes, lm_dir, logits, run_config  # noqa: F401 (fixture)
from tests.tiny import tiny_model
from tests.tiny_lm import tiny_tokenizer

# Stated tolerances (tiny random Llama, logits of a 2x16 batch): the largest logit error relative to the largest
# logit, and the cosine similarity of the logit vectors. int8 per-channel is near exact; int4 per-group is coarse.
TOLERANCE = {"int8": (0.03, 0.9995), "int4": (0.2, 0.99)}


def lm(dtype: torch.dtype = torch.float32) -> nn.Module:
    return tiny_model("llama", head="lm").to(dtype).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_logits_are_within_the_stated_tolerance(mode, dtype):
    model = lm(dtype)
    reference = logits(model)
    count = quantize_base(model, mode)
    assert count == len(quantized_layers(model)) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert type(model.lm_head) is nn.Linear  # the output head stays as it was (QLoRA)
    quantized = logits(model)
    max_error, min_cosine = TOLERANCE[mode]
    assert not torch.equal(quantized, reference)
    assert (quantized - reference).abs().max() <= max_error * reference.abs().max()
    assert torch.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) >= min_cosine


@pytest.mark.parametrize(("mode", "bits"), [("int8", 8), ("int4", 4)])
def test_quantized_weights_take_a_fraction_of_the_memory(mode, bits):
    layer = nn.Linear(256, 512, bias=False)
    model = nn.Sequential(layer)
    quantize_base(model, mode)
    weight = model[0].weight
    stored = sum(getattr(weight, name).nbytes for name in weight.tensor_data_names)
    assert stored <= 1.15 * layer.weight.numel() * bits / 8  # + scales (and int4 zero points)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_input_gradient_equals_the_dequantized_layers(mode):
    model = nn.Sequential(nn.Linear(64, 96))
    quantize_base(model, mode)
    dense = copy.deepcopy(model)
    dequantize_base(dense)
    assert type(dense[0]) is nn.Linear and not quantized_layers(dense)
    x = torch.randn(3, 64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    torch.testing.assert_close(model(x), dense(x_dense), atol=1e-4, rtol=1e-4)
    (model(x) ** 2).sum().backward()
    (dense(x_dense) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-3, rtol=1e-3)
    assert model[0].weight.grad is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_run_on_a_quantized_base_learns(mode, lm_dir, tmp_path):  # noqa: F811
    session, result = run_training(validate_config(run_config(lm_dir, tmp_path, dtype="fp32", quantize=mode)))
    assert len(quantized_layers(session.model)) == 14
    assert {p.dtype for p in session.delta.trainable_parameters().values()} == {torch.float32}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert max(losses[-3:]) < losses[0] - 0.05
    fresh = load_model(str(lm_dir), "causal_lm", dtype="fp32", quantize=mode)[0].eval()
    deltatune.load(fresh, tmp_path / "run" / "best")  # a saved delta goes back onto a quantized base
    torch.testing.assert_close(logits(fresh), logits(session.model.eval()))


@pytest.mark.parametrize("method", [{"method": "ia3"}, {"method": "adapter"}, {"method": "lora", "r": 4}])
def test_deltas_train_on_top_of_a_quantized_base(method):
    model = lm()
    quantize_base(model, "int8")
    delta = deltatune.attach(model, [deltatune.registry.parse_delta_config(method)])
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    ids = torch.arange(3, 35).reshape(2, 16)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_merge_into_a_quantized_base_is_explicit(tmp_path):
    model = lm()
    quantize_base(model, "int8")
    fresh = copy.deepcopy(model)
    delta = deltatune.attach(model, deltatune.LoRA(r=4))
    for p in delta.trainable_parameters().values():
        nn.init.normal_(p, std=0.1)
    with pytest.raises(ConfigError, match=r"cannot merge lora into a quantized base \(14 int8/int4 layers, e\.g\. "
                                          r"model\.layers\.0\.self_attn\.q_proj\.base_layer\).*dequantize_base\(model\) before"):
        delta.merge()
    with pytest.raises(ConfigError, match=r"dequantize_base: a delta is attached \(model\.layers\.0\.self_attn"):
        dequantize_base(model)
    delta.save(tmp_path)
    assert dequantize_base(fresh) == 14 and not quantized_layers(fresh)
    merged = deltatune.load(fresh, tmp_path)
    merged.merge()
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in fresh.named_modules())


def test_quantize_with_full_fine_tuning_is_a_config_error(lm_dir, tmp_path):  # noqa: F811
    config = run_config(lm_dir, tmp_path, quantize="int8", delta={"method": "full"})
    with pytest.raises(ConfigError, match="model.quantize: full trains the base weights, which cannot be quantized"):
        validate_config(config)
    with pytest.raises(ConfigError, match="model.quantize"):
        validate_config(run_config(lm_dir, tmp_path, quantize="int3"))


def test_quantize_without_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "torchao.prototype.quantization.int4", None)
    with pytest.raises(ConfigError, match=r"model.quantize needs torchao .*pip install 'deltatune\[quantize\]'"):
        quantize_base(lm(), "int8")


def test_int4_unpacking_reads_the_cpu_kernels_layout():
    from deltatune.models.quantize import _int4_by_matmul, _int4_layout_known

    model = nn.Sequential(nn.Linear(128, 96))
    quantize_base(model, "int4")
    assert _int4_layout_known()  # torch 2.13's CPU packing; other builds fall back to the exact slow path
    layer = model[0]
    torch.testing.assert_close(layer.dequantized_weight(), _int4_by_matmul(layer.weight, 128, torch.float32),
                               atol=1e-5, rtol=1e-5)


def test_the_int4_layout_check_leaves_the_global_rng_alone(monkeypatch):
    """It runs on a run's first int4 forward: drawing from the global RNG there shifted every later draw (data
    order), so a run resumed in a new process (the check again, after the RNG is restored) did not match."""
    monkeypatch.setattr(quantize, "_LAYOUT_KNOWN", [])
    before = torch.get_rng_state()
    assert quantize._int4_layout_known()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_matmul_weights_are_unpacked_into_one_shared_scratch_buffer(mode):
    model = lm()
    quantize_base(model, mode)
    layers = [model.get_submodule(name) for name in quantized_layers(model)]
    assert len({id(layer.scratch) for layer in layers}) == 1
    for layer in layers:
        dense = layer.weight_for_matmul()
        assert torch.equal(dense, layer.dequantized_weight())
        if mode == "int8" or layer.out_features % 32 == 0:  # other int4 shapes take the kernel's slow exact path
            assert dense.untyped_storage().data_ptr() == layer.scratch.buffer.untyped_storage().data_ptr()


def test_a_16_bit_embedding_table_stays_as_stored_under_fp32_compute():
    stored = lm(torch.bfloat16)
    model, reference = copy.deepcopy(stored), copy.deepcopy(stored).float()
    quantize_base(model, "int8", torch.float32)
    quantize_base(reference, "int8", torch.float32)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # half the memory of an fp32 table
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16  # an untied head is held in bf16 too
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32
    assert torch.equal(logits(model), logits(reference))  # bf16 -> fp32 is exact


def test_a_tied_embedding_table_is_converted_with_the_head():
    model = lm(torch.bfloat16)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_base(model, "int8", torch.float32)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("options", [{"quantize": "int8"}, {"dtype": "bf16", "compute_dtype": "fp32"}])
def test_a_model_whose_code_uses_a_layer_weight_itself_is_refused_at_load(tmp_path, options):
    """Mamba's mixer multiplies `self.dt_proj.weight` itself: with int8 or bf16-held layers its forward failed inside
    torch at the first step; the load's probe names the setting and the fix instead."""
    tokenizer = tiny_tokenizer()
    config = transformers.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2,
                                      intermediate_size=64, tie_word_embeddings=False)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    setting = "model.quantize: int8" if "quantize" in options else "model.dtype: bf16 with model.compute_dtype: fp32"
    with pytest.raises(ConfigError, match=rf"^{setting}: MambaForCausalLM does not run with its linear layers held "
                                          r"that way \((NotImplementedError|RuntimeError): .*Load it with model\.dtype: "
                                          "fp32 and without model.quantize$"):
        load_model(str(tmp_path), "causal_lm", **options)
    model, _ = load_model(str(tmp_path), "causal_lm")  # as dense fp32 it loads and runs
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tokenizer))
