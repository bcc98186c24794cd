"""A frozen base held in bf16 that computes in fp32 (model.dtype: bf16 + model.compute_dtype: fp32, the default
on CPUs without native bf16 matmuls): logits, training, save/load, merge/export, generation, config errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltatune
from deltatune.config import validate_config
from deltatune.errors import ConfigError
from deltatune.generation.generator import open_generator
from deltatune.generation.prompts import PromptRecord
from deltatune.generation.sampling import Sampling
from deltatune.interop import export
from deltatune.models.load import load_model
from deltatune.models import precision
from deltatune.models.precision import hold_in_bf16, resolve_base_precision
from deltatune.models import quantize
from deltatune.models.quantize import QuantizedLinear, Scratch, quantize_base, quantized_layers
from deltatune.runs.session import open_session, run_training
from deltatune.train import compute
from tests.test_contract import METHODS, make_config
from tests.test_families_precision import gpt2_dir  # noqa: F401 (fixture)
from tests.test_precision import AMX, lm_dir, logits, run_config  # noqa: F401 (fixture)
from tests.tiny import logits as tiny_logits
from tests.tiny import tiny_batch, tiny_config, tiny_model
from tests.tiny_lm import save_tiny_lm

BF16, FP32 = torch.bfloat16, torch.float32
# Stated tolerance: a bf16-held base computing in fp32 gives the logits of an fp32 model with the same (bf16-rounded)
# weights up to fp32 rounding (the same matmuls on the same numbers: in practice bit-equal).
SAME_WEIGHTS = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose checkpoint is stored in bf16 (as most released LLMs are)."""
    folder = save_tiny_lm(tmp_path_factory.mktemp("lm") / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=BF16)
    model.save_pretrained(folder)
    return folder


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


@pytest.mark.parametrize(("dtype", "compute", "trains_base", "native", "too_big", "expected"), [
    ("auto", "auto", False, True, False, (BF16, BF16)),  # AMX / AVX512_BF16: bf16 matmuls
    ("auto", "auto", False, False, False, (FP32, FP32)),  # AVX2, fits in RAM: fp32 as before
    ("auto", "auto", False, False, True, (BF16, FP32)),  # AVX2, fp32 weights > half the RAM: bf16 storage
    ("auto", "auto", True, False, True, (FP32, FP32)),  # full fine-tuning keeps an fp32 model
    ("auto", "bf16", False, False, False, (BF16, BF16)),  # bf16 compute asked for (emulated here)
    ("bf16", "auto", False, False, False, (BF16, FP32)),
    ("bf16", "auto", False, True, False, (BF16, BF16)),
    ("bf16", "fp32", False, True, False, (BF16, FP32)),  # fp32 activations on a bf16 CPU
    ("fp32", "auto", False, True, False, (FP32, FP32)),
    ("fp32", "fp32", False, True, False, (FP32, FP32)),
])
def test_storage_and_compute_resolution(dtype, compute, trains_base, native, too_big, expected):
    ram = 8 << 30
    resolved = resolve_base_precision(dtype, compute, trained_by="full" if trains_base else None,
                                      bf16_native=native, fp32_bytes=lambda: (5 if too_big else 3) << 30, ram_bytes=ram)
    assert resolved == expected


@pytest.mark.parametrize(("model", "message"), [
    ({"dtype": "fp32", "compute_dtype": "bf16"}, "model.compute_dtype: bf16 needs a bf16 base (model.dtype: bf16)"),
    ({"dtype": "bf16", "compute_dtype": "fp32", "delta": {"method": "full"}},
     "model.dtype: bf16 stores a frozen base in bf16, but full trains the base's own tensors"),
    ({"dtype": "bf16", "compute_dtype": "fp16"}, "model.compute_dtype"),
])
def test_impossible_precision_settings_are_config_errors(bf16_dir, tmp_path, model, message):
    config = run_config(bf16_dir, tmp_path, delta=model.pop("delta", None), **model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


def test_bf16_storage_logits_equal_fp32_on_the_same_weights(bf16_dir):
    held, _ = load_model(str(bf16_dir), "causal_lm", dtype="bf16", compute_dtype="fp32")
    reference, _ = load_model(str(bf16_dir), "causal_lm", dtype="fp32")
    linears = [n for n, m in held.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * held.config.num_hidden_layers + 1 and quantized_layers(held) == []  # exact
    assert linears[-1] == "lm_head"  # untied: held in bf16 too, multiplied in blocks of rows
    kinds = dtypes(held)
    assert {kinds[f"{n}.weight"] for n in linears} == {BF16}
    assert kinds["model.embed_tokens.weight"] == BF16  # untied: looked up in bf16, rows cast to fp32
    assert kinds["model.norm.weight"] == FP32
    out = logits(held)
    assert out.dtype == FP32
    torch.testing.assert_close(out, logits(reference), **SAME_WEIGHTS)
    stored = sum(p.nbytes for p in held.parameters())
    assert stored < 0.75 * sum(p.nbytes for p in reference.parameters())


def test_bf16_storage_input_gradient_equals_fp32():
    reference = nn.Linear(64, 96).bfloat16().float()  # fp32 layer with bf16-representable weights
    held = nn.Sequential(nn.Linear(64, 96))
    held[0].load_state_dict(reference.state_dict())
    deltatune.models.quantize.quantize_base(held, "bf16", FP32)
    assert isinstance(held[0], QuantizedLinear) and held[0].weight.dtype == BF16
    x = torch.randn(5, 64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    reference(x).square().sum().backward()
    held(y).square().sum().backward()
    torch.testing.assert_close(y.grad, x.grad, **SAME_WEIGHTS)
    assert held[0].weight.grad is None  # the frozen weight gets no gradient


def test_lora_trains_saves_merges_and_generates_on_a_bf16_held_base(bf16_dir, tmp_path):
    config = validate_config(run_config(bf16_dir, tmp_path, dtype="bf16", compute_dtype="fp32"))
    session, _ = run_training(config)
    trained = {n: p.dtype for n, p in session.delta.trainable_parameters().items()}
    assert set(trained.values()) == {FP32}  # the factors were sized from bf16 weights: attach made them fp32
    assert any(isinstance(m, QuantizedLinear) for m in session.model.modules())
    run = Path(config.output_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert max(losses[-3:]) < losses[0] - 0.05
    expected = logits(session.model)

    reopened = open_session(config, run / "best")  # save/load: the saved delta on a fresh bf16-held base
    torch.testing.assert_close(logits(reopened.model), expected, **SAME_WEIGHTS)

    merged = {dtype: transformers.AutoModelForCausalLM.from_pretrained(
        export(run, tmp_path / f"merged-{dtype}", "hf", dtype=dtype), dtype="auto") for dtype in ("fp32", "bf16", None)}
    assert {p.dtype for p in merged["fp32"].parameters()} == {FP32}
    torch.testing.assert_close(logits(merged["fp32"]), expected, atol=1e-4, rtol=1e-4)  # merged at fp32
    rounded = {name: t.to(BF16) for name, t in merged["fp32"].state_dict().items()}
    for dtype in ("bf16", None):  # default: bf16; the fp32 merge rounded, up to the bf16 rounding of B·A
        assert {p.dtype for p in merged[dtype].parameters()} == {BF16}
        torch.testing.assert_close(merged[dtype].state_dict(), rounded, atol=5e-4, rtol=2 ** -7)  # weights ~0.02

    generator = open_generator(run=run)
    text, = generator.complete([PromptRecord("t", text="hello")], Sampling(max_new_tokens=4))
    assert isinstance(text, str)


def test_a_bf16_held_gpt2_run_loads_onto_the_dense_model_and_merges_into_a_plain_checkpoint(gpt2_dir,  # noqa: F811
                                                                                               tmp_path):
    """GPT-2's Conv1D layers are held transposed ((out, in)): the base fingerprint samples them as stored (in, out)
    and the merged export writes them back that way."""
    config = validate_config(run_config(gpt2_dir, tmp_path, dtype="bf16", compute_dtype="fp32"))
    run_training(config)
    best = Path(config.output_dir) / "best"
    expected = logits(open_session(config, best).model)
    dense = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=FP32)
    deltatune.load(dense, best)  # the fingerprint's samples of the held layers are those of the Conv1D weights
    for layer in dense.modules():
        if isinstance(layer, Conv1D):  # the held base's bf16-rounded weights
            layer.weight.data = layer.weight.data.bfloat16().float()
    torch.testing.assert_close(logits(dense), expected, **SAME_WEIGHTS)
    for dtype, tolerance in (("fp32", 1e-4), (None, 0.05)):  # default bf16: the merged weights rounded to bf16
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            export(config.output_dir, tmp_path / f"merged-{dtype}", "hf", dtype=dtype), dtype=FP32)
        torch.testing.assert_close(logits(merged), expected, atol=tolerance, rtol=tolerance)


def test_forced_fp32_has_no_bf16_anywhere(monkeypatch, bf16_dir, tmp_path):
    monkeypatch.setattr(compute, "cpu_flags", lambda: AMX)  # even where bf16 would be fast
    session = open_session(validate_config(run_config(bf16_dir, tmp_path, dtype="fp32", compute_dtype="fp32")))
    assert set(dtypes(session.model).values()) == {FP32}
    assert not any(isinstance(m, QuantizedLinear) for m in session.model.modules())
    assert compute.resolve_precision("auto", session.model) is None  # the loop adds no bf16 autocast either
    auto = open_session(validate_config(run_config(bf16_dir, tmp_path, dtype="fp32", delta={"method": "full"})))
    assert compute.resolve_precision("auto", auto.model) is torch.bfloat16  # not asked for: bf16 autocast as before


def test_gpt2_conv1d_layers_are_held_in_bf16_and_compute_in_fp32():
    model = tiny_model("gpt2", head="lm")  # GPT-2's layers are Conv1D, stored (in, out)
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, Conv1D):  # the same bf16-rounded weights, in fp32
            layer.weight.data = layer.weight.data.bfloat16().float()
    assert deltatune.models.quantize.quantize_base(model, "bf16", FP32) == 4 * model.config.n_layer
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **SAME_WEIGHTS)


def test_full_fine_tuning_is_refused_on_a_bf16_held_base():
    model = tiny_model("llama")
    hold_in_bf16(model)
    with pytest.raises(ConfigError, match=r"full would train the weights of 14 layers held frozen in bf16 \(e\.g\. "
                                          r"model\.layers\.0\.self_attn\.q_proj\): load the base in fp32"):
        deltatune.attach(model, make_config("full", "llama"))
    assert deltatune.attach(model, make_config("lora", "llama")).attached  # the refused delta left nothing behind


def test_a_model_without_linear_layers_cannot_be_held_in_bf16():
    convolutions = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ConfigError, match=re.escape(
            "model.dtype: bf16 with model.compute_dtype: fp32: Sequential has no linear layers (nn.Linear or GPT-2 "
            "Conv1D) outside its task heads; use model.dtype: fp32")):
        deltatune.models.quantize.quantize_base(convolutions, "bf16", FP32)


def test_auto_holds_a_model_too_large_for_fp32_in_bf16(monkeypatch, bf16_dir, tmp_path):
    monkeypatch.setattr(compute, "cpu_flags", lambda: {"avx2", "fma"})
    size = precision.stored_fp32_bytes(bf16_dir)
    assert size == 4 * sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(bf16_dir).parameters())
    lora, full = (validate_config(run_config(bf16_dir, tmp_path, delta=d)) for d in (None, {"method": "full"}))
    monkeypatch.setattr(precision, "_ram_bytes", lambda: 4 * size)  # fits: fp32 as before
    assert lora.base_precision() == {"dtype": "fp32", "compute_dtype": "auto"}
    monkeypatch.setattr(precision, "_ram_bytes", lambda: 3 * size // 2)  # fp32 weights > half the RAM
    assert lora.base_precision() == {"dtype": "bf16", "compute_dtype": "fp32"}
    assert full.base_precision() == {"dtype": "fp32", "compute_dtype": "auto"}  # full fine-tuning: fp32 or nothing


def test_pissa_rewrites_bf16_held_weights_and_detach_restores_them(bf16_dir):
    held, _ = load_model(str(bf16_dir), "causal_lm", dtype="bf16", compute_dtype="fp32")
    original = {n: p.clone() for n, p in held.state_dict().items()}
    before = logits(held)
    delta = deltatune.attach(held, deltatune.LoRA(r=4, targets="all-linear", init="pissa"))
    assert {p.dtype for p in delta.trainable_parameters().values()} == {FP32}
    assert held.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == BF16  # the residual, held in bf16
    torch.testing.assert_close(logits(held), before, atol=0.05, rtol=0.05)  # residual rounded to bf16 once
    delta.detach()
    assert all(torch.equal(original[n], p) for n, p in held.state_dict().items())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])  # full trains the base weights
def test_every_method_trains_fp32_tensors_on_a_bf16_held_base(method, tmp_path):
    model, batch = tiny_model("llama"), tiny_batch()
    hold_in_bf16(model)
    base, original = copy.deepcopy(model), {n: t.clone() for n, t in model.state_dict().items()}
    delta = deltatune.attach(model, make_config(method, "llama"))
    params = list(delta.trainable_parameters().values())
    assert {p.dtype for p in params} == {FP32}
    torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 1, 0])).backward()
    grads = [p.grad for p in params if p.grad is not None]  # multi-task: only the first task's tensors
    assert grads and {g.dtype for g in grads} == {FP32}
    torch.optim.SGD(params, lr=0.5).step()
    delta.save(tmp_path / "delta")
    deltatune.load(base, tmp_path / "delta")
    torch.testing.assert_close(tiny_logits(base, batch), tiny_logits(model, batch), **SAME_WEIGHTS)
    delta.detach()
    assert all(torch.equal(original[n], t) for n, t in model.state_dict().items())


# ---- the output head held in bf16 ---------------------------------------------------------------------------------
class LargestFloat32(TorchDispatchMode):
    """Records the most elements of any fp32 tensor an operation returns while active (temporaries included)."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == FP32]
        self.most = max([self.most, *sizes])
        return out


def untied_lm(monkeypatch, mode: str = "bf16") -> tuple[nn.Module, nn.Module]:
    """(a tiny Llama with bf16-representable weights and a 512-entry untied head, held in `mode` with fp32 compute
    and weight blocks of at most 2,048 values (its largest body layer, 64 x 32); the same model with an fp32
    head)."""
    monkeypatch.setattr(quantize, "MIN_BLOCK_ELEMENTS", 1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=512)).bfloat16().float().eval()
    reference = copy.deepcopy(model)
    quantize_base(model, mode, FP32)
    if mode != "bf16":
        quantize_base(reference, mode)  # the same kernels, the head left as it is
    return model, reference


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_an_untied_head_is_held_in_bf16_and_multiplied_in_blocks_of_rows(monkeypatch, mode):
    model, reference = untied_lm(monkeypatch, mode)
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.mode == "bf16" and head.weight.dtype == BF16
    assert head.scratch is model.model.layers[0].mlp.down_proj.scratch and head.scratch.block_elements == 64 * 32
    assert head.block_rows() == 64 and model.deltatune_compute_dtype == FP32
    assert head.weight.checkpoint_shape == (512, 32)  # fingerprints name the checkpoint's shapes
    ids = torch.randint(3, 512, (2, 8))
    x = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_()
    y = x.detach().clone().requires_grad_()
    with LargestFloat32() as largest:
        out = head(x)
        out.square().sum().backward()
    assert largest.most < head.weight.numel()  # neither the forward nor the input gradient upcast it whole
    expected = reference.lm_head(y)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, **SAME_WEIGHTS)
    torch.testing.assert_close(x.grad, y.grad, **SAME_WEIGHTS)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, **SAME_WEIGHTS)


def test_a_tied_head_is_left_as_it_is():
    model = tiny_model("gpt2", head="lm")
    hold_in_bf16(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == FP32


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_a_head_whose_weight_the_model_reads_is_left_as_it_is(mode):
    """Mamba2 casts its hidden states to `self.lm_head.weight.dtype` before the head: a bf16-held head rounded them
    to bf16 (logits 2e-3 off the fp32 head's on the same weights)."""
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                       state_size=8, n_groups=1, expand=2, chunk_size=8)
    model = transformers.Mamba2ForCausalLM(config).bfloat16().float().eval()
    reference = copy.deepcopy(model)
    quantize_base(model, mode, FP32)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == FP32
    if mode != "bf16":
        quantize_base(reference, mode)
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, **SAME_WEIGHTS)


@pytest.mark.parametrize("bias", [False, True])
def test_the_chunked_loss_over_a_held_head_equals_the_plain_loss(monkeypatch, bias):
    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", 256)  # 4 rows of a 64-row block's logits at once
    torch.manual_seed(0)
    linear = nn.Linear(32, 500, bias=bias)  # the last block is short
    linear.weight.data = linear.weight.data.bfloat16().float()
    head = QuantizedLinear(linear, linear.weight.detach().bfloat16(), "bf16", Scratch(64 * 32), FP32)
    assert compute._held(head) and head.block_rows() == 64
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 500, (40,))
    targets[:3] = torch.tensor([0, 63, 499])  # first and last row of a block, last of the vocabulary
    with LargestFloat32() as largest:
        loss = compute.linear_cross_entropy(hidden, targets, head)
        loss.backward()
    assert largest.most < min(head.weight.numel(), len(targets) * 500)  # no fp32 head, no full logits
    reference = hidden.detach().clone().requires_grad_()
    expected = nn.functional.cross_entropy(linear(reference), targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, **SAME_WEIGHTS)
    torch.testing.assert_close(hidden.grad, reference.grad, **SAME_WEIGHTS)
    if bias:
        torch.testing.assert_close(head.bias.grad, linear.bias.grad, **SAME_WEIGHTS)
    with torch.no_grad():  # evaluation: the value only
        torch.testing.assert_close(compute.linear_cross_entropy(hidden, targets, head), expected.detach(),
                                   **SAME_WEIGHTS)


def test_the_training_loss_takes_the_chunked_path_through_a_held_head(monkeypatch):
    model, reference = untied_lm(monkeypatch)
    batch = {"input_ids": torch.randint(3, 512, (2, 8))}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :3] = -100
    loss, expected = (lm_loss(m, batch) for m in (model, reference))
    torch.testing.assert_close(loss, expected, **SAME_WEIGHTS)
    assert compute.output_head(model) == (model, "lm_head")


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The chunked training loss of `batch` and its gradients in a LoRA's factors (seeded), concatenated."""
    torch.manual_seed(0)
    delta = deltatune.attach(model, deltatune.LoRA(r=4, init="gaussian"))
    task = type("Text", (), {"kind": "text"})()
    loss = compute.TrainingLoss(model, task, precision="fp32")(batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in delta.trainable_parameters().values()])
    delta.detach()
    return torch.cat([loss[None], grads])


@pytest.mark.parametrize("quantize_to", [None, "int8"])
def test_lora_learns_over_a_held_head_in_blocks(monkeypatch, bf16_dir, lm_dir, tmp_path, quantize_to):  # noqa: F811
    monkeypatch.setattr(quantize, "MIN_BLOCK_ELEMENTS", 1024)
    model = {"dtype": "fp32", "quantize": quantize_to} if quantize_to else {"dtype": "bf16", "compute_dtype": "fp32"}
    session, _ = run_training(validate_config(run_config(lm_dir if quantize_to else bf16_dir, tmp_path, **model)))
    head = session.model.lm_head
    assert isinstance(head, QuantizedLinear) and head.mode == "bf16" and head.block_rows() < head.out_features
    assert compute.output_head(session.model) is not None  # the chunked loss, in training and evaluation
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert max(losses[-3:]) < losses[0] - 0.05
    evals = [row["loss"] for row in rows if row["kind"] == "eval"]
    assert evals[-1] < evals[0]
