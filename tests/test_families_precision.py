"""Reduced-precision (bf16) and quantized (int8 / int4) frozen bases across model families and methods.

Classes of inputs: GPT-2 (Conv1D, tied head), Falcon (an nn.Linear subclass, multi-query attention), T5 / BART
(encoder-decoders), BERT / RoBERTa / DistilBERT (encoder classifiers with biases), Gemma (tied, scaled embedding),
Llama-likes (Qwen2, Mistral, Phi, Phi3), GPT-NeoX, OPT, Bloom, a plain torch MLP and CNN. Every case either works
(logits within the stated tolerance, the delta learns, reloads exactly) or is one clear deltatune error.
The support matrix is docs/precision.md.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as T
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.arch import describe
from deltatune.cli import main
from deltatune.config import validate_config
from deltatune.errors import ConfigError
from deltatune.generation.generator import open_generator
from deltatune.models.load import load_model
from deltatune.models.precision import compute_in
from deltatune.models.quantize import QuantizedLinear, dequantize_base, quantize_base, quantized_layers
from deltatune.registry import methods, parse_delta_config
from deltatune.runs.session import open_session, run_training
from deltatune.storage import load_tensors
from deltatune.train import compute
from deltatune.train.compute import fp32_master_weights
from tests import test_architectures as arch_suite
from tests.saved_adapters import save_adapter
from tests.test_precision import run_config as precision_run_config
from tests.tiny_lm import tiny_tokenizer

MODES = ["int8", "int4", "bf16"]  # int8 / int4 compute in fp32 (model.dtype auto on this CPU)
BF16_COMPUTE = ["int8-bf16", "int4-bf16"]  # quantized under model.dtype bf16 (auto on an AMX CPU)
FAMILIES_EXTRA = {
    "phi": (T.AutoModelForCausalLM, "phi", {k: v for k, v in arch_suite.DECODER.items() if "key_value" not in k}),
    "falcon": (T.AutoModelForCausalLM, "falcon", {"hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4}),
    "bloom": (T.AutoModelForCausalLM, "bloom", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
}
FAMILIES = {**arch_suite.ARCHITECTURES, **FAMILIES_EXTRA}
ALL = [*FAMILIES, "mlp", "cnn"]
QUANTIZABLE = [f for f in ALL if f != "cnn"]
# one family per class of input, for the every-method matrix
CLASSES = ["gpt2", "falcon", "t5", "bert", "gemma", "mlp"]  # Llama-likes: test_quantize.py and the LoRA matrix

# Stated tolerances of the base's logits against the fp32 model (tiny random models, one 2x8 batch): the largest
# error relative to the largest logit, and the cosine similarity of the flattened logits. Measured worst cases over
# all families (torch 2.13, torchao 0.18): int8 0.012 (qwen3) / 0.99996 (t5), int4 0.133 / 0.9924 (t5),
# bf16 0.011 (roberta) / 0.99997 (t5); with bf16 compute int8 0.014 / 0.9999, int4 0.132 / 0.9906 (t5).
TOLERANCE = {"int8": (0.03, 0.9995), "int4": (0.2, 0.985), "bf16": (0.02, 0.9995)}

DENSE_ONLY = {  # method -> the refusal on a quantized base (exact message start)
    "full": r"full trains the base weights, which cannot be quantized \(\d+ int8/int4 layers, e\.g\. ",
    "bitfit": r"bitfit trains the base weights, which cannot be quantized \(\d+ int8/int4 layers",
    "mask": r"mask computes with the base weights themselves, which a quantized layer does not hold \(\d+ int8/int4",
}
FP32_ONLY = {m: rf"{m} trains the base's own tensors \(in fp32\), but this base computes in torch\.bfloat16 "
                r"\(model\.dtype\): load it in fp32 \(model\.dtype: auto or fp32\)" for m in ("full", "bitfit")}


class TinyMLP(nn.Module):
    """A plain torch model: Linear layers with biases, no config, no embeddings; `classifier` is its head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU())
        self.classifier = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


@functools.cache
def _pristine(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "mlp":
        return TinyMLP().eval()
    if family in arch_suite.ARCHITECTURES or family == "cnn":
        return arch_suite._pristine(family)
    auto, model_type, args = FAMILIES[family]
    return auto.from_config(T.AutoConfig.for_model(model_type, **{**arch_suite.SIZES, **args})).eval()


def build(family: str) -> nn.Module:
    return copy.deepcopy(_pristine(family))


def batch_for(family: str) -> dict[str, torch.Tensor]:
    if family == "mlp":
        return {"x": torch.randn(4, 64, generator=torch.Generator().manual_seed(1))}
    return arch_suite.batch_for("llama" if family in FAMILIES_EXTRA else family)


def reduced(family: str, mode: str) -> nn.Module:
    """The tiny `family` model as deltatune loads a base: bf16 storage under bf16 autocast, or int8 / int4
    weight-only layers computing in fp32 (this CPU has no native bf16: model.dtype auto = fp32) or, with a
    `-bf16` suffix, in bf16 under bf16 autocast."""
    model = build(family)
    quantized = mode.partition("-")[0]
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    if quantized == "bf16":
        model.to(dtype)
    else:
        quantize_base(model, quantized, dtype)
    compute_in(model, dtype)
    return model


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return arch_suite.logits(model, batch).float()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    return error, torch.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()


def method_config(method: str, family: str, root: Path):
    """The registry's default config of `method` (the contract suite's arguments where a field has no default;
    fusion: two adapters saved for `family`)."""
    config_class = methods()[method].config_class
    if method == "fusion":
        return config_class(adapters=[str(save_adapter(build(family), root / family / f"a{i}", seed=i,
                                                       layer_norm=True)) for i in range(2)])
    required = any(field.is_required() for field in config_class.model_fields.values())
    return config_class(**(arch_suite.contract_args(method) if required else {}))


# ---- the base alone ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [*MODES, *BF16_COMPUTE])
@pytest.mark.parametrize("family", ALL)
def test_reduced_base_logits_are_within_the_stated_tolerance(family, mode):
    if family == "cnn" and mode != "bf16":  # convolutions have no weight-only CPU kernel; its one Linear is the head
        with pytest.raises(ConfigError, match=r"model\.quantize: TinyCNN has no linear layers \(nn\.Linear or "
                                              r"GPT-2 Conv1D\) outside its task heads; remove model\.quantize"):
            reduced(family, mode)
        return
    batch = batch_for(family)
    reference = logits(build(family), batch)
    model = reduced(family, mode)
    max_error, min_cosine = TOLERANCE[mode.partition("-")[0]]
    error, cosine = relative_error(logits(model, batch), reference)
    assert error <= max_error and cosine >= min_cosine, (error, cosine)
    if mode == "bf16":
        return
    mode = mode.partition("-")[0]
    heads = describe(model).heads

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    assert quantized_layers(model), "no layer was quantized"
    assert not [n for n in quantized_layers(model) if in_head(n)]  # heads stay dense (as in QLoRA)
    fits = (lambda m: True) if mode == "int8" else (lambda m: m.out_features % 16 == 0 and m.in_features % 32 == 0)
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear and not in_head(n) and fits(m)] == []


def test_quantizing_twice_is_refused():
    model = reduced("falcon", "int8")
    with pytest.raises(ConfigError, match=r"model\.quantize: FalconForCausalLM is already quantized \(8 int8/int4 "
                                          r"layers, e\.g\. transformer\.h\.0\.self_attention\.query_key_value\)"):
        quantize_base(model, "int4")


def test_gpt2_conv1d_layers_are_quantized_and_dequantize_back_to_conv1d():
    model = reduced("gpt2", "int8")
    conv1d = [n for n, m in build("gpt2").named_modules() if isinstance(m, Conv1D)]
    assert quantized_layers(model) == conv1d  # all 8: c_attn, c_proj, c_fc, mlp.c_proj of 2 layers
    layer = model.get_submodule(conv1d[0])
    assert (layer.in_features, layer.out_features, layer.weight.checkpoint_shape) == (32, 96, (32, 96))
    assert dequantize_base(model) == 8
    assert [n for n, m in model.named_modules() if type(m) is Conv1D] == conv1d
    batch = batch_for("gpt2")
    error, _ = relative_error(logits(model, batch), logits(build("gpt2"), batch))
    assert error <= TOLERANCE["int8"][0]


def test_falcon_linear_subclass_is_quantized_but_a_subclass_computing_otherwise_is_not():
    model = build("falcon")
    assert {type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)} == {"FalconLinear", "Linear"}

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model.transformer.h[0].mlp.dense_4h_to_h.__class__ = Doubled
    quantize_base(model, "int8", torch.float32)
    assert type(model.transformer.h[0].mlp.dense_4h_to_h) is Doubled  # would lose its factor 2: left dense
    assert len(quantized_layers(model)) == 7  # 4 FalconLinear per layer, one left alone


@pytest.mark.parametrize("variant", [{}, {"multi_query": False}, {"new_decoder_architecture": True,
                                                                   "num_kv_heads": 2}])
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_prefixes_fit_each_falcon_attention_variant(variant, method, tmp_path):
    """Falcon caches 1 key/value head (multi-query, the default), every head (multi_query false, or the new
    decoder architecture, whatever num_kv_heads says): the prefixes must have the cache's shape."""
    torch.manual_seed(0)
    config = T.AutoConfig.for_model("falcon", **{**arch_suite.SIZES, **FAMILIES["falcon"][2], **variant})
    model = T.AutoModelForCausalLM.from_config(config).eval()
    quantize_base(model, "int8", torch.float32)
    delta = deltatune.attach(model, parse_delta_config({"method": method}))
    before, after = train_steps(model, delta, batch_for("falcon"))
    assert after < before


@pytest.mark.parametrize(("in_features", "out_features", "group"), [
    (128, 64, 128), (192, 48, 64), (96, 32, 32), (48, 64, None), (64, 40, None), (64, 8, None)])
def test_int4_takes_the_largest_group_that_divides_and_leaves_unfit_shapes_dense(in_features, out_features, group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(), nn.Linear(out_features, 16))
    reference = copy.deepcopy(model)
    x = torch.randn(5, in_features)
    quantize_base(model, "int4")
    if group is None:
        assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, reference[0].weight)
        return
    assert isinstance(model[0], QuantizedLinear) and list(model[0].weight.block_size) == [1, group]
    error, cosine = relative_error(model[0](x).detach(), reference[0](x).detach())
    assert error <= TOLERANCE["int4"][0] and cosine >= 0.99


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_tied_embeddings_stay_tied_and_dense(family):
    model = reduced(family, "int4")
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head) is nn.Linear and head.weight is table.weight and head.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_biases_survive_quantization_as_registered_parameters(mode):
    model = reduced("bert", mode)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantizedLinear) and "bias" in dict(layer.named_parameters())
    dense = copy.deepcopy(model)
    dequantize_base(dense)
    batch = batch_for("bert")
    torch.testing.assert_close(logits(model, batch), logits(dense, batch), atol=1e-4, rtol=1e-4)
    no_bias = reduced("llama", mode).model.layers[0].self_attn.q_proj
    assert no_bias.bias is None and "bias" in no_bias._parameters  # a slot, as nn.Linear has (BitFit adds there)


# ---- methods on top ------------------------------------------------------------------------------------------
def objective(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy towards class 0 at every output position (the architecture suite's), any logits shape."""
    return arch_suite.loss_of(model, batch) if "x" not in batch else model(**batch).logsumexp(-1).mean()


def train_steps(model: nn.Module, delta, batch: dict, steps: int = 4) -> tuple[float, float]:
    """The objective in eval mode (no dropout) before and after `steps` AdamW steps on fp32 master weights."""
    trained = delta.trainable_parameters()
    fp32_master_weights(trained.values())
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    with torch.no_grad():
        before = objective(model, batch).item()

    def step() -> float:
        optimizer.zero_grad()
        loss = objective(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    assert all(math.isfinite(step()) for _ in range(steps))
    model.eval()
    with torch.no_grad():
        return before, objective(model, batch).item()


def check_method(family: str, mode: str, method: str, config, tmp_path: Path, reload_atol: float = 0.0) -> None:
    """Attach on the reduced base, train (it learns), save -> load on a fresh reduced base -> the same logits
    (within `reload_atol`); merge: refused on a quantized base, equal within bf16 rounding on a bf16 one."""
    model, batch = reduced(family, mode), batch_for(family)
    delta = deltatune.attach(model, config)
    before, after = train_steps(model, delta, batch)
    assert after < before, (before, after)
    assert {p.dtype for p in delta.trainable_parameters().values()} == {torch.float32}
    expected = logits(model, batch)
    delta.save(tmp_path)
    fresh = reduced(family, mode)
    deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=reload_atol, rtol=0)  # saved fp32 loads as fp32
    if not delta.mergeable:
        return
    if mode == "bf16":
        delta.merge()
        torch.testing.assert_close(logits(model, batch), expected, atol=0.05, rtol=0.05)  # merged in bf16
    else:
        with pytest.raises(ConfigError, match=rf"cannot merge {method} into a quantized base \(\d+ int8/int4 layers"):
            delta.merge()


@pytest.mark.parametrize("mode", [*MODES, *BF16_COMPUTE])
@pytest.mark.parametrize("family", QUANTIZABLE)
def test_lora_on_every_family(family, mode, tmp_path):
    check_method(family, mode, "lora", deltatune.LoRA(r=4), tmp_path)


METHOD_CASES = [m for m in sorted(methods()) if m not in ("lora", *DENSE_ONLY)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("family", "method"), [(f, m) for f in CLASSES for m in METHOD_CASES
                                                if (f, m) != ("mlp", "fusion")])  # no adapters to fuse on an MLP
def test_method_on_a_reduced_base(family, method, mode, tmp_path):
    config = method_config(method, family, tmp_path / "adapters")
    if refused := arch_suite.REFUSED.get((method, family if family != "mlp" else "cnn")):  # needs token ids/layers
        with pytest.raises(refused[0], match=refused[1].replace("TinyCNN", "TinyMLP")):
            deltatune.attach(reduced(family, mode), config)
        return
    check_method(family, mode, method, config, tmp_path / "delta")


@pytest.mark.parametrize("variant", [{"method": "lora", "r": 4, "dora": True}, {"method": "lora", "r": 4,
                                     "scaling": "rslora"}, {"method": "adapter", "placement": "pfeiffer"},
                                     {"method": "ptuning", "encoder": "lstm"}, {"method": "ptuning", "encoder": "mlp"}])
@pytest.mark.parametrize("mode", MODES)
def test_variants_on_a_reduced_base(variant, mode, tmp_path):
    check_method("gpt2", mode, variant["method"], parse_delta_config(dict(variant)), tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("method", [*DENSE_ONLY, "pissa", "olora"])
def test_methods_needing_real_weights_are_refused_on_a_quantized_base(method, mode, family):
    model = reduced(family, mode)
    tree = [(n, type(m)) for n, m in model.named_modules()]
    if method in ("pissa", "olora"):
        config, message = deltatune.LoRA(r=4, init=method), rf"lora init {method} writes the residual W - BA"
    else:
        config, message = methods()[method].config_class(), DENSE_ONLY[method]
    with pytest.raises(ConfigError, match=message + r".*load the base without model\.quantize \(model\.dtype: bf16"):
        deltatune.attach(model, config)
    assert [(n, type(m)) for n, m in model.named_modules()] == tree  # nothing changed


@pytest.mark.parametrize(("inner", "message"), [
    ({"method": "full"}, r"per_task \(of full\) trains the base weights, which cannot be quantized \(13 int8/int4"),
    ({"method": "mask"}, r"per_task \(of mask\) computes with the base weights themselves"),
    ({"method": "lora", "init": "olora"}, r"per_task \(of lora\) init olora writes the residual W - BA"),
])
def test_per_task_copies_of_such_methods_are_refused_too(inner, message):
    config = parse_delta_config({"method": "per_task", "tasks": ["a", "b"], "delta": inner})
    with pytest.raises(ConfigError, match=message):
        deltatune.attach(reduced("bert", "int8"), config)
    assert config.trains_base is (inner["method"] == "full")  # model.dtype auto keeps such runs fp32


@pytest.mark.parametrize("method", [*FP32_ONLY])
def test_methods_training_the_base_are_refused_on_a_bf16_base(method):
    with pytest.raises(ConfigError, match=FP32_ONLY[method]):
        deltatune.attach(reduced("bert", "bf16"), methods()[method].config_class())


def test_pissa_and_mask_work_on_a_bf16_base(tmp_path):
    # reloaded, the residual is computed again from the bf16 weights: equal up to bf16 rounding
    check_method("llama", "bf16", "lora", deltatune.LoRA(r=4, init="pissa_niter_2"), tmp_path / "pissa", 1e-2)
    check_method("gpt2", "bf16", "mask", methods()["mask"].config_class(), tmp_path / "mask")


def test_merge_of_a_quantized_gpt2_delta_goes_through_the_dequantized_base(tmp_path):
    model, batch = reduced("gpt2", "int8"), batch_for("gpt2")
    delta = deltatune.attach(model, deltatune.LoRA(r=4))
    train_steps(model, delta, batch)
    delta.save(tmp_path)
    dense = reduced("gpt2", "int8")
    dequantize_base(dense)
    merged = deltatune.load(dense, tmp_path)
    merged.merge()
    assert not any("lora" in n for n, _ in dense.named_modules())
    torch.testing.assert_close(logits(dense, batch), logits(model, batch), atol=1e-4, rtol=1e-4)
    original = build("gpt2")  # the checkpoint's own Conv1D weights: the fingerprint names the same shapes
    deltatune.load(original, tmp_path).merge()
    error, _ = relative_error(logits(original, batch), logits(model, batch))
    assert error <= TOLERANCE["int8"][0]


# ---- runs: config checks, loading, CLI on a quantized run ----------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (Conv1D, tied head, biases) saved in fp16, with a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    T.AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model_dir: Path, tmp_path: Path, delta: dict | None = None, **model) -> dict:
    """test_precision's text run with a test split and a checkpoint every 2 steps."""
    config = precision_run_config(model_dir, tmp_path, delta=delta, **model)
    config["data"]["split"] = [0.5, 0.25, 0.25]
    config["train"] |= {"epochs": 4, "batch_size": 4, "checkpoint_every": 2}
    return config


@pytest.mark.parametrize(("delta", "model", "message"), [
    ({"method": "bitfit"}, {"quantize": "int8"}, "model.quantize: bitfit trains the base weights, which cannot be "
                                                 "quantized; remove model.quantize"),
    ({"method": "mask"}, {"quantize": "int4"}, "model.quantize: mask computes with the base weights themselves"),
    ({"method": "lora", "init": "olora"}, {"quantize": "int8"}, "model.quantize: lora init olora writes the "
                                                                "residual W - BA into the base weights"),
    ({"method": "full"}, {"dtype": "bf16"}, "model.dtype: bf16 stores a frozen base in bf16, but full trains the "
                                            "base's own tensors"),
    ({"method": "bitfit"}, {"dtype": "bfloat16"}, "model.dtype: bf16 stores a frozen base in bf16, but bitfit"),
])
def test_configs_that_cannot_work_are_refused_before_loading(delta, model, message, gpt2_dir, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(run_config(gpt2_dir, tmp_path, delta, **model))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_an_fp16_checkpoint_loads_quantized_with_fp32_compute(mode, gpt2_dir):
    reference = T.AutoModelForCausalLM.from_pretrained(gpt2_dir).float().eval()
    model, _ = load_model(str(gpt2_dir), "causal_lm", dtype="fp32", quantize=mode)
    assert len(quantized_layers(model)) == 8
    assert {m.compute_dtype for m in model.modules() if isinstance(m, QuantizedLinear)} == {torch.float32}
    assert model.get_input_embeddings().weight.dtype == torch.float32  # tied to the head: converted with it
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        error, cosine = relative_error(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    max_error, min_cosine = TOLERANCE[mode]
    assert error <= max_error and cosine >= min_cosine


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


@pytest.fixture(scope="module")
def quantized_run(gpt2_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qrun")
    run_training(validate_config(run_config(gpt2_dir, root, quantize="int8")))
    return root / "run"


def cli(capsys, *args: str) -> str:
    """Run the command line in this process; its exit code must be 0; returns what it printed."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_a_quantized_run_learns_and_reopens_for_eval_and_generate(quantized_run, capsys):
    losses = train_losses(quantized_run)
    assert max(losses[-2:]) < losses[0] - 0.05, losses
    printed = cli(capsys, "eval", str(quantized_run), "--split", "test")
    results = json.loads((quantized_run / "results.json").read_text())
    assert f"{results['test']['loss']:.4f}" in printed  # the same quantized base as in training
    generated = cli(capsys, "generate", "--run", str(quantized_run), "--prompt", "hello", "--max-new-tokens", "4")
    assert generated.strip()
    assert cli(capsys, "generate", "--run", str(quantized_run), "--prompt", "hello", "--max-new-tokens", "4",
               "--merge").strip()
    merged = open_generator(run=quantized_run, merge=True)  # merging loads the checkpoint's weights, unquantized
    assert not quantized_layers(merged.model) and not any("lora" in n for n, _ in merged.model.named_modules())
    assert len(quantized_layers(open_generator(run=quantized_run).model)) == 8


def test_a_quantized_run_exports_peft_and_merges_into_the_checkpoint_weights(quantized_run, gpt2_dir, tmp_path,
                                                                              capsys):
    peft_out, merged_out = tmp_path / "peft", tmp_path / "merged"
    cli(capsys, "export", str(quantized_run), str(peft_out), "--format", "peft")
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["fan_in_fan_out"]) == ("LORA", 4, True)  # GPT-2's Conv1D
    cli(capsys, "merge", str(quantized_run), str(merged_out))
    merged = T.AutoModelForCausalLM.from_pretrained(merged_out).float().eval()
    base = T.AutoModelForCausalLM.from_pretrained(gpt2_dir).float().eval()  # unquantized + the delta, unmerged
    deltatune.load(base, quantized_run / "best")
    peft_model = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(gpt2_dir).float(), peft_out).eval()
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)  # merged in fp32
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    quantized = load_model(str(gpt2_dir), "causal_lm", dtype="fp32", quantize="int8")[0]
    with pytest.raises(ConfigError, match=r"cannot merge lora into a quantized base \(8 int8/int4 layers"):
        deltatune.load(quantized, quantized_run / "best").merge()  # the library's merge stays explicit


def test_a_quantized_run_resumes_exactly(gpt2_dir, quantized_run, tmp_path):
    class Interrupt(Exception):
        pass

    def stop(kind, info):
        if kind == "step" and info["step"] == 3:
            raise Interrupt

    config = validate_config(run_config(gpt2_dir, tmp_path, quantize="int8"))
    with pytest.raises(Interrupt):
        run_training(config, on_event=stop)
    run_training(config, resume=True)
    assert train_losses(tmp_path / "run") == train_losses(quantized_run)
    saved = [load_tensors(run / "best" / "delta.safetensors") for run in (tmp_path / "run", quantized_run)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[1])


NO_BF16, AMX = {"avx2", "fma"}, {"avx512f", "amx_bf16", "amx_tile"}


@pytest.mark.slow
def test_auto_on_a_cpu_without_bf16_is_exactly_the_fp32_path(gpt2_dir, tmp_path, monkeypatch):
    losses = {}
    for name, flags, dtype in (("forced", NO_BF16, "auto"), ("fp32", AMX, "fp32"), ("amx", AMX, "auto")):
        monkeypatch.setattr(compute, "cpu_flags", lambda flags=flags: flags)
        config = run_config(gpt2_dir, tmp_path / name, quantize="int8", dtype=dtype)
        config["train"]["precision"] = "fp32" if name == "fp32" else "auto"  # the reference: fp32 everywhere
        config = validate_config(config)
        session, _ = run_training(config)
        compute_dtypes = {m.compute_dtype for m in session.model.modules() if isinstance(m, QuantizedLinear)}
        assert compute_dtypes == {torch.bfloat16 if name == "amx" else torch.float32}
        losses[name] = train_losses(tmp_path / name / "run")
    assert losses["forced"] == losses["fp32"]  # the fallback is the fp32 path, bit for bit
    assert losses["amx"] == pytest.approx(losses["fp32"], rel=0.03)  # bf16 compute, as on an AMX machine


@pytest.mark.slow
def test_a_bf16_run_of_a_classifier_with_ia3_evaluates_as_trained(tmp_path, monkeypatch):
    """IA3 vectors train fp32 on a bf16 base; reopened for eval they load fp32 again (not rounded to bf16)."""
    from tests.tiny import save_tiny_model_dir

    folder = save_tiny_model_dir(tmp_path / "bert", "bert")
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} movie {i}", "label": int(w == "good")}) + "\n"
                            for i in range(12) for w in ("good", "bad")))
    config = {"model": {"path": str(folder), "dtype": "bf16"},
              "data": {"train": str(data), "format": "classification", "split": [0.5, 0.25, 0.25]},
              "delta": [{"method": "ia3"}, {"method": "head"}],
              "train": {"epochs": 2, "batch_size": 4, "optimizer": {"lr": 5e-2}, "eval_baseline": False},
              "output_dir": str(tmp_path / "run")}
    run_training(validate_config(config))
    reopened = open_session(validate_config(config), delta_dir=tmp_path / "run" / "best")
    saved = load_tensors(tmp_path / "run" / "best" / "delta.safetensors")
    trained = reopened.delta.trainable_parameters()
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert saved.keys() == trained.keys() and all(torch.equal(trained[k], saved[k]) for k in saved)
    assert any(p.dtype == torch.bfloat16 for p in reopened.model.parameters())  # the base stays bf16
