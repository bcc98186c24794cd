"""Generality matrix: every registered method on many transformers architectures and on a plain CNN.

For each (method, architecture): attach, 3 optimizer steps (finite loss, trained tensors change), save -> load into
a fresh copy of the base -> the same logits, merge = unmerged (mergeable methods), detach restores the model bit for
bit. A pair may only be refused as one clear TargetError / ConfigError, listed in REFUSED with the reason the
message must give; README's method table ("works on") lists the same refusals.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import deltatune
from deltatune.arch import describe, short_name
from deltatune.methods._prefix_cache import PrefixCacheDelta
from deltatune.registry import methods
from deltatune.targeting import DeltaModule
from tests.saved_adapters import save_adapter
from tests.test_contract import contract_args

VOCAB = 96
SIZES = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64}
ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 64}

# architecture -> (Auto class, model_type, config arguments)
ARCHITECTURES: dict[str, tuple[type, str, dict]] = {
    "gpt_neox": (T.AutoModelForCausalLM, "gpt_neox", {k: v for k, v in DECODER.items() if "key_value" not in k}),
    "qwen2": (T.AutoModelForCausalLM, "qwen2", DECODER),
    "qwen3": (T.AutoModelForCausalLM, "qwen3", {**DECODER, "head_dim": 8}),
    "mistral": (T.AutoModelForCausalLM, "mistral", DECODER),
    "phi3": (T.AutoModelForCausalLM, "phi3", DECODER),
    "opt": (T.AutoModelForCausalLM, "opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "word_embed_proj_dim": 32,
                                             "max_position_embeddings": 64}),
    "gemma": (T.AutoModelForCausalLM, "gemma", {**DECODER, "head_dim": 8}),
    "llama": (T.AutoModelForCausalLM, "llama", DECODER),
    "gpt2": (T.AutoModelForCausalLM, "gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "t5": (T.AutoModelForSeq2SeqLM, "t5", {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4,
                                           "decoder_start_token_id": 0}),
    "bart": (T.AutoModelForSeq2SeqLM, "bart", {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                                               "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                               "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                               "max_position_embeddings": 64}),
    "distilbert": (T.AutoModelForSequenceClassification, "distilbert",
                   {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64}),
    "roberta": (T.AutoModelForSequenceClassification, "roberta", {**ENCODER, "pad_token_id": 1}),
    "bert": (T.AutoModelForSequenceClassification, "bert", ENCODER),
}
ARCHS = [*ARCHITECTURES, "cnn"]
METHODS = sorted(methods())
INPUT_METHODS = [m for m in METHODS if methods()[m].delta_class.rewrites_inputs]  # virtual tokens, prefixes
CACHE_METHODS = [m for m in METHODS if issubclass(methods()[m].delta_class, PrefixCacheDelta)]  # prefixes

# Pairs refused by design: (method, arch) -> (error class, what the message must say).
NOT_TOKENS = "needs a model that takes token ids"
REFUSED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    **{(m, "cnn"): (deltatune.TargetError, NOT_TOKENS) for m in INPUT_METHODS},
    **{(m, "cnn"): (deltatune.TargetError, "adapter places .* no transformer layers") for m in ("adapter", "fusion")},
    ("ia3", "cnn"): (deltatune.TargetError, "ia3 found no attention layers"),
    ("side", "cnn"): (deltatune.TargetError, "TinyCNN has no layer stack"),
    **{(m, "distilbert"): (deltatune.ConfigError, "attention layers of DistilBert.* take no cache.*use prompt")
       for m in CACHE_METHODS},
    ("task_heads", "bart"): (deltatune.TargetError, "adds 'final_logits_bias' .* load the model for sequence "
                                                    "classification"),
}


class TinyCNN(nn.Module):
    """A plain image classifier: no `config`, no embeddings, no layer list; Conv2d, BatchNorm and Linear modules."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Linear(32, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixel_values).flatten(1))


@functools.cache
def _pristine(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "cnn":
        return TinyCNN().eval()
    auto, model_type, args = ARCHITECTURES[arch]
    config = T.AutoConfig.for_model(model_type, **{**SIZES, **args})
    if auto is T.AutoModelForSequenceClassification:
        config.num_labels = 2
    return auto.from_config(config).eval()


def build(arch: str) -> nn.Module:
    """A fresh copy of the tiny random `arch` model (built once per architecture)."""
    return copy.deepcopy(_pristine(arch))


def batch_for(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if arch == "cnn":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    ids[0, -2:], mask[0, -2:] = SIZES["pad_token_id"] if arch != "roberta" else 1, 0  # one padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    if ARCHITECTURES[arch][0] is T.AutoModelForSeq2SeqLM:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return batch


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return getattr(out, "logits", out)


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy towards class 0 at every output position: defined for any logits shape."""
    out = model(**batch)
    scores = getattr(out, "logits", out)
    flat = scores.flatten(0, -2).float()
    return F.cross_entropy(flat, torch.zeros(len(flat), dtype=torch.long))


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arch-adapters")


def method_config(method: str, arch: str, adapter_root: Path):
    """The registry's default config of `method`; a config with fields without a default gets the contract suite's
    arguments (fusion: adapters saved for this architecture)."""
    config_class = methods()[method].config_class
    if method == "fusion":
        return config_class(adapters=[str(save_adapter(build(arch), adapter_root / arch / f"a{i}", seed=i,
                                                       layer_norm=True)) for i in range(2)])
    required = any(field.is_required() for field in config_class.model_fields.values())
    return config_class(**(contract_args(method) if required else {}))


def module_tree(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_method_on_architecture(method, arch, adapter_root, tmp_path):
    model, batch = build(arch), batch_for(arch)
    tree, original = module_tree(model), {k: v.clone() for k, v in model.state_dict().items()}
    if (method, arch) in REFUSED:
        error, reason = REFUSED[method, arch]
        with pytest.raises(error, match=reason):
            deltatune.attach(model, method_config(method, arch, adapter_root))
        assert module_tree(model) == tree
        return
    delta = deltatune.attach(model, method_config(method, arch, adapter_root))

    trained = delta.trainable_parameters()
    before = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = loss_of(model, batch)
        assert math.isfinite(loss.item())
        loss.backward()
        optimizer.step()
    model.eval()
    reached = [n for n, p in trained.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, "no trained tensor got a gradient"
    assert [n for n in reached if torch.equal(trained[n], before[n])] == []

    expected = logits(model, batch)
    delta.save(tmp_path)
    fresh = build(arch)
    loaded = deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)
    loaded.detach()

    if delta.mergeable:
        delta.merge()
        assert not any(isinstance(m, DeltaModule) for m in model.modules())
        torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
        delta.unmerge()
    delta.detach()
    assert module_tree(model) == tree
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def greedy_by_full_forwards(model: nn.Module, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding of an encoder-decoder without cache or generate(): one full forward per new token."""
    start = torch.full((len(batch["input_ids"]), 1), model.config.decoder_start_token_id)
    out = start
    for _ in range(steps):
        with torch.no_grad():
            scores = model(**batch, decoder_input_ids=out, use_cache=False).logits[:, -1]
        out = torch.cat([out, scores.argmax(-1, keepdim=True)], 1)
    return out


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", [*INPUT_METHODS, "lora", "side"])
def test_generate_on_encoder_decoders_matches_full_forwards(method, arch, adapter_root):
    """generate() (which runs the encoder on its own, then decodes with the cache) sees the same delta."""
    model, batch = build(arch), batch_for(arch)
    model.generation_config.eos_token_id = model.generation_config.forced_eos_token_id = None  # 4 tokens always
    base = logits(model, batch)
    del batch["decoder_input_ids"]
    delta = deltatune.attach(model, method_config(method, arch, adapter_root))
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.5 * torch.randn_like(p))
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, greedy_by_full_forwards(model, batch, 4))
    assert not torch.equal(logits(model, batch_for(arch)), base)  # the delta is used


@pytest.mark.parametrize("arch, heads, attention_output, key_value, ffn_output", [
    ("gpt_neox", ["lm_head"], "attention.dense", ["attention.query_key_value"], "mlp.dense_4h_to_h"),
    ("phi3", ["lm_head"], "self_attn.o_proj", ["self_attn.qkv_proj"], "mlp.down_proj"),  # o_proj registered first
    ("opt", ["lm_head"], "self_attn.out_proj", ["self_attn.k_proj", "self_attn.v_proj"], "fc2"),
    ("gpt2", ["lm_head"], "attn.c_proj", ["attn.c_attn"], "mlp.c_proj"),
    ("distilbert", ["pre_classifier", "classifier"], "attention.out_lin", ["attention.k_lin", "attention.v_lin"],
     "ffn.lin2"),
    ("bert", ["classifier"], "attention.output.dense", ["attention.self.key", "attention.self.value"],
     "output.dense"),
])
def test_architecture_facts_are_read_off_the_model(arch, heads, attention_output, key_value, ffn_output):
    facts = describe(build(arch))
    assert facts.heads == heads
    assert len(facts.layers) == 2
    assert [short_name(n) for n in facts.layer_role("attention_output")] == [attention_output] * 2
    assert [short_name(n) for n in facts.layer_role("key_value")] == key_value * 2
    assert [short_name(n) for n in facts.layer_role("ffn_output")] == [ffn_output] * 2


def test_encoder_decoder_layers_are_both_stacks_and_roles_are_per_block():
    facts = describe(build("t5"))
    assert facts.layer_lists == ["encoder.block", "decoder.block"]
    assert facts.layer_role("ffn_output") == [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)] + \
        [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (0, 1)]  # after the decoder's cross-attention
    assert facts.layer_role("attention_output")[-1] == "decoder.block.1.layer.0.SelfAttention.o"
    assert describe(TinyCNN()).heads == ["classifier"] and describe(TinyCNN()).layers == []
