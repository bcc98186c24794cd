"""Bottleneck adapters: Houlsby / Pfeiffer placement on GPT-2, Llama, BERT; sizes, layers, identity at init,
training, explicit modules on a plain PyTorch model, and the errors for models deltatune.arch does not know."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.arch import describe
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.adapter import NONLINEARITIES, Adapter, AdapterModule
from deltatune.registry import parse_delta_config
from tests.tiny import tiny_batch, tiny_model

ARCHS = ["gpt2", "llama", "bert"]
# For the shared suites (test_contract.py, ...): a random model's sublayer outputs are ~0.1 in scale: a layer-normed
# adapter input and a wider bottleneck than 32 // 16 = 2 make 8 steps lower the loss clearly (defaults: by only
# ~3e-4 on tiny BERT); exercises houlsby
CONTRACT_ARGS = {"placement": "houlsby", "bottleneck_size": 16, "layer_norm": True}
ROLES = {  # the wrapped modules of layer i, written out independently of deltatune.arch
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
}
_CACHE: dict[str, nn.Module] = {}


def model(arch: str) -> nn.Module:
    if arch not in _CACHE:
        _CACHE[arch] = tiny_model(arch)
    return copy.deepcopy(_CACHE[arch])


def adapters(m: nn.Module) -> dict[str, AdapterModule]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, AdapterModule)}


def logits(m: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).logits


class MLP(nn.Module):
    """A plain PyTorch model: no config, no layer stack deltatune.arch knows."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("arch", ARCHS)
def test_houlsby_puts_two_adapters_per_layer_and_pfeiffer_one(arch):
    attn, ffn = ROLES[arch]
    m = model(arch)
    delta = deltatune.attach(m, Adapter(placement="houlsby"))
    assert list(adapters(m)) == [attn.format(0), ffn.format(0), attn.format(1), ffn.format(1)]
    delta.detach()
    deltatune.attach(m, Adapter(placement="pfeiffer"))
    assert list(adapters(m)) == [ffn.format(0), ffn.format(1)]


@pytest.mark.parametrize("layers", ["1-1", [-1], [1]])
def test_layer_range_selects_layers(layers):
    m = model("llama")
    deltatune.attach(m, Adapter(placement="houlsby", layers=layers))
    assert list(adapters(m)) == [n.format(1) for n in ROLES["llama"]]


def test_layer_out_of_range_is_an_error():
    with pytest.raises(TargetError, match="out of range"):
        deltatune.attach(model("bert"), Adapter(layers=[5]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("extra", [{}, {"layer_norm": True, "nonlinearity": "gelu", "placement": "houlsby"}])
def test_attach_is_exactly_identity_and_counts_parameters(arch, extra):
    m, batch = model(arch), tiny_batch()
    before = logits(m, batch)
    delta = deltatune.attach(m, Adapter(**extra))
    torch.testing.assert_close(logits(m, batch), before, rtol=0, atol=0)
    hidden, size = 32, 32 // 16
    per_adapter = 2 * hidden * size + size + hidden + (2 * hidden if extra.get("layer_norm") else 0)
    n_sites = 4 if extra.get("placement") == "houlsby" else 2
    assert delta.parameter_counts()[0] == n_sites * per_adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_training_the_default_adapter_lowers_the_loss(arch):
    torch.manual_seed(0)
    m, batch, labels = model(arch), tiny_batch(), torch.tensor([0, 1, 1, 0])
    delta = deltatune.attach(m, Adapter())
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(m(**batch).logits, labels)

    first = loss().item()  # eval mode throughout: no dropout noise on a tiny random model's tiny loss changes
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first
    assert all(p.grad is not None for p in delta.trainable_parameters().values())


def test_sizes_from_reduction_factor_or_bottleneck_size():
    m = model("bert")
    delta = deltatune.attach(m, Adapter(reduction_factor=4))
    assert {a.adapter.down.out_features for a in adapters(m).values()} == {8}
    delta.detach()
    deltatune.attach(m, Adapter(bottleneck_size=5))
    assert {a.adapter.up.in_features for a in adapters(m).values()} == {5}
    with pytest.raises(ConfigError, match="either bottleneck_size or reduction_factor"):
        Adapter(bottleneck_size=4, reduction_factor=4)
    with pytest.raises(TargetError, match="leaves no bottleneck"):
        deltatune.attach(model("bert"), Adapter(reduction_factor=64))


@pytest.mark.parametrize("name", sorted(NONLINEARITIES))
def test_nonlinearity_comes_from_the_table(name):
    m = model("gpt2")
    deltatune.attach(m, Adapter(nonlinearity=name))
    assert all(type(a.adapter.act) is type(NONLINEARITIES[name]()) for a in adapters(m).values())


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="placement"):
        Adapter(placement="middle")
    with pytest.raises(ConfigError, match="nonlinearity"):
        Adapter(nonlinearity="softplus")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_delta_config({"method": "adapter", "reduction": 8})


def test_saved_config_with_bottleneck_size_loads_back(tmp_path):
    m, batch = model("gpt2"), tiny_batch()
    delta = deltatune.attach(m, Adapter(bottleneck_size=3, layer_norm=True))
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.normal_(std=0.1)
    expected = logits(m, batch)
    delta.save(tmp_path)
    fresh = model("gpt2")
    deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)


def test_adapter_output_is_the_wrapped_output_plus_the_branch():
    m = model("llama")
    deltatune.attach(m, Adapter(bottleneck_size=4))
    wrapper = adapters(m)["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        wrapper.adapter.up.weight.normal_()
        x = torch.randn(3, 64)
        h = wrapper.base_layer(x)
        expected = h + wrapper.adapter.up(torch.relu(wrapper.adapter.down(h)))
        torch.testing.assert_close(wrapper(x), expected)


def test_unknown_architecture_without_modules_is_one_clear_error():
    with pytest.raises(TargetError, match=r"name the modules to wrap with `modules: \[...\]`"):
        deltatune.attach(MLP(), Adapter())


def test_explicit_modules_on_a_plain_pytorch_model():
    torch.manual_seed(0)
    m, x, y = MLP(), torch.randn(32, 8), torch.randint(0, 2, (32,))
    original = {k: v.clone() for k, v in m.state_dict().items()}
    before = m(x).detach()
    delta = deltatune.attach(m, Adapter(modules=["fc1", "fc2"], bottleneck_size=4))
    assert list(adapters(m)) == ["fc1", "fc2"]
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    first = F.cross_entropy(m(x), y).item()
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        optimizer.step()
    assert F.cross_entropy(m(x), y).item() < first
    delta.detach()
    assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())


def test_explicit_modules_override_the_arch_roles():
    m = model("gpt2")
    deltatune.attach(m, Adapter(modules=["attn.c_attn"], placement="houlsby"))
    assert list(adapters(m)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert adapters(m)["transformer.h.0.attn.c_attn"].adapter.down.in_features == 96  # Conv1D nf = 3 * hidden
    with pytest.raises(TargetError, match="matches no module.*Candidates"):
        deltatune.attach(model("gpt2"), Adapter(modules=["no_such_module"]))


def test_modules_already_carrying_a_delta_are_refused():
    m = model("bert")
    deltatune.attach(m, deltatune.LoRA(targets=["output.dense"]))
    with pytest.raises(TargetError, match="already carries a lora delta"):
        deltatune.attach(m, Adapter())


def test_adapter_combines_with_lora_elsewhere_and_a_new_head():
    m, batch = model("bert"), tiny_batch()
    group = deltatune.attach(m, [deltatune.LoRA(targets=["query", "value"]), Adapter(), deltatune.Head(num_labels=3)])
    assert logits(m, batch).shape == (4, 3)
    assert len(adapters(m)) == 2
    group.detach()
    assert not adapters(m)


def test_arch_finds_ffn_outputs_of_t5_encoder_and_decoder_blocks():
    import transformers as T

    cfg = T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    t5 = T.T5ForConditionalGeneration(cfg)
    assert describe(t5).layer_role("ffn_output") == ["encoder.block.0.layer.1.DenseReluDense.wo",
                                                     "decoder.block.0.layer.2.DenseReluDense.wo"]
    deltatune.attach(t5, Adapter())
    assert list(adapters(t5)) == describe(t5).layer_role("ffn_output")
