"""LoRA / rsLoRA / DoRA: parity with Hugging Face PEFT, merge/unmerge/detach exactness, conv and embedding kinds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.delta import TENSOR_FILE  # noqa: E402
from deltatune.errors import ConfigError, TargetError  # noqa: E402
from deltatune.storage import load_tensors  # noqa: E402
from deltatune.methods.lora import LoRA, LoRAModule  # noqa: E402
from deltatune.registry import methods, parse_delta_config  # noqa: E402
from tests.tiny import biased_tiny_model, logits, tiny_batch, tiny_model  # noqa: E402

peft = pytest.importorskip("peft")

model = biased_tiny_model


def lm_loss(m: nn.Module, batch: dict) -> torch.Tensor:
    out = m(**batch).logits
    return F.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def lora_modules(m: nn.Module) -> dict[str, LoRAModule]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, LoRAModule)}


def randomize(delta) -> None:
    """Non-zero B (and A), so the update really changes outputs."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in delta.trainable_parameters().items():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(std=0.3)


def peft_key(ours: str, embedding: bool) -> str:
    """Our tensor name -> the same tensor's name in a PEFT model (adapter 'default')."""
    if ours.endswith(".lora_magnitude_vector"):
        return f"base_model.model.{ours}.default.weight"
    module, part, _ = ours.rsplit(".", 2)  # "<module>", "lora_A", "weight"
    if embedding:
        return f"base_model.model.{module}.lora_embedding_{part[-1]}.default"
    return f"base_model.model.{module}.{part}.default.weight"


def module_of(name: str) -> str:
    return name.removesuffix(".lora_magnitude_vector").rsplit(".lora_", 1)[0]


# ---- 1, 5: parity with PEFT --------------------------------------------------------------------------------
PARITY = [
    ("llama", ["q_proj", "v_proj"], {}),
    ("bert", ["query", "value"], {}),
    ("gpt2", ["c_attn"], {}),
    ("llama", ["q_proj", "v_proj"], {"scaling": "rslora"}),
    ("gpt2", ["c_attn"], {"scaling": "rslora"}),
    ("llama", ["q_proj", "v_proj", "down_proj"], {"dora": True}),
    ("gpt2", ["c_attn", "mlp.c_proj"], {"dora": True}),
    ("bert", ["query", "value"], {"dora": True, "scaling": "rslora"}),
    ("llama", ["embed_tokens"], {}),
    ("llama", ["embed_tokens", "o_proj"], {"dora": True}),
]


@pytest.mark.parametrize("arch,targets,opts", PARITY, ids=[f"{a}-{'+'.join(t)}-{o}" for a, t, o in PARITY])
def test_parity_with_peft(arch, targets, opts):
    batch = tiny_batch()
    r, alpha = 4, 12.0
    torch.manual_seed(0)
    reference = peft.get_peft_model(model(arch), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=(arch == "gpt2"),
        use_rslora=opts.get("scaling") == "rslora", use_dora=opts.get("dora", False), init_lora_weights=False))
    reference.eval()
    with torch.no_grad():  # PEFT starts m at ||W + s·BA||; move it so the magnitude path really matters
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    theirs = reference.state_dict()

    ours = model(arch)
    delta = deltatune.attach(ours, LoRA(r=r, alpha=alpha, targets=targets, **opts))
    embedding = {n for n, m in lora_modules(ours).items() if isinstance(m.base_layer, nn.Embedding)}
    mapped = {n: theirs[peft_key(n, module_of(n) in embedding)] for n in delta.trainable_parameters()}
    assert all(v.abs().sum() > 0 for k, v in mapped.items() if "lora_B" in k)  # a real, non-zero update
    delta.load_state_dict(mapped)
    expected = logits(reference, batch)
    assert not torch.allclose(expected, logits(model(arch), batch), atol=1e-3)  # the update is visible
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=1e-4)
    if opts.get("dora"):  # our init m = ||W + s·BA|| agrees with PEFT's init for the same A, B
        init = peft.get_peft_model(model(arch), reference.peft_config["default"]).state_dict()
        fresh = deltatune.attach(model(arch), LoRA(r=r, alpha=alpha, targets=targets, **opts))
        for name, m in lora_modules(fresh.model).items():
            m.lora_A.weight.data.copy_(init[peft_key(f"{name}.lora_A.weight", name in embedding)])
            m.lora_B.weight.data.copy_(init[peft_key(f"{name}.lora_B.weight", name in embedding)])
            torch.testing.assert_close(m.variant._norm(m), init[peft_key(f"{name}.lora_magnitude_vector", False)])


# ---- 2, 3: zero change at init; merge / unmerge / detach -----------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("dora", [False, True])
def test_init_merge_unmerge_detach(arch, dora):
    base, batch = model(arch), tiny_batch()
    original_types = [(n, type(m)) for n, m in base.named_modules()]
    original = {k: v.clone() for k, v in base.state_dict().items()}
    before = logits(base, batch)

    delta = deltatune.attach(base, LoRA(r=4, dora=dora))  # all-linear
    assert lora_modules(base)
    assert torch.equal(logits(base, batch), before)  # B = 0 (DoRA: m = ||W||) changes nothing
    randomize(delta)
    unmerged = logits(base, batch)
    assert not torch.allclose(unmerged, before, atol=1e-4)

    delta.merge()
    torch.testing.assert_close(logits(base, batch), unmerged, atol=1e-5, rtol=1e-4)
    assert not lora_modules(base)
    assert [(n, type(m)) for n, m in base.named_modules()] == original_types
    merged_weights = {k: v.clone() for k, v in base.state_dict().items()}
    assert any(not torch.equal(merged_weights[k], original[k]) for k in original)

    delta.unmerge()
    assert lora_modules(base)
    assert all(torch.equal(m.base_layer.weight, original[f"{n}.weight"]) for n, m in lora_modules(base).items())
    torch.testing.assert_close(logits(base, batch), unmerged, atol=0, rtol=0)

    delta.merge()
    delta.detach()  # detach while merged unmerges first
    assert [(n, type(m)) for n, m in base.named_modules()] == original_types
    state = base.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert torch.equal(logits(base, batch), before)


def test_merge_refuses_tied_weights():
    tied = tiny_model("llama", head="lm")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    delta = deltatune.attach(tied, LoRA(targets=["embed_tokens"]))
    with pytest.raises(ConfigError, match="shared with another module"):
        delta.merge()
    assert not delta.merged and lora_modules(tied)


# ---- 4: Conv2d on a plain PyTorch CNN -------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1, groups=groups)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def test_conv2d_trains_and_merges():
    torch.manual_seed(0)
    net, x, y = CNN(), torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    before = net(x).detach()
    delta = deltatune.attach(net, LoRA(r=2, alpha=4, targets="type:Conv2d"))
    assert set(lora_modules(net)) == {"conv1", "conv2"}
    assert net.conv1.lora_A.weight.shape == (2, 3, 3, 3) and net.conv1.lora_B.weight.shape == (8, 2, 1, 1)
    assert torch.equal(net(x).detach(), before)
    opt = torch.optim.SGD(list(delta.trainable_parameters().values()), lr=0.1)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        unmerged = net(x)
        delta.merge()
        assert type(net.conv1) is nn.Conv2d
        torch.testing.assert_close(net(x), unmerged, atol=1e-5, rtol=1e-5)
    delta.detach()


@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_dora_merge(dora):
    torch.manual_seed(0)
    net, x = CNN(), torch.randn(4, 3, 8, 8)
    before = net(x).detach()
    delta = deltatune.attach(net, LoRA(r=2, targets=["conv1", "conv2"], dora=dora))
    assert torch.equal(net(x).detach(), before)
    randomize(delta)
    with torch.no_grad():
        unmerged = net(x)
        delta.merge()
        torch.testing.assert_close(net(x), unmerged, atol=1e-5, rtol=1e-5)


def test_grouped_conv2d_is_a_target_error():
    net = CNN(groups=2)
    with pytest.raises(TargetError, match="grouped Conv2d"):
        deltatune.attach(net, LoRA(targets=["conv1", "conv2"]))
    assert type(net.conv1) is nn.Conv2d  # nothing was half-attached


# ---- 6: errors and layer selection ------------------------------------------------------------------------------
def test_unknown_target_lists_candidates():
    with pytest.raises(TargetError) as err:
        deltatune.attach(model("llama"), LoRA(targets=["q_projj"]))
    assert "q_proj" in str(err.value) and "Candidates" in str(err.value)


@pytest.mark.parametrize("bad", [{"r": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"scaling": "huge"}, {"rank": 8}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        LoRA(**bad)
    with pytest.raises(ConfigError, match=next(iter(bad))):
        parse_delta_config({"method": "lora", **bad})


def test_attaching_twice_is_an_error():
    m = model("bert")
    deltatune.attach(m, LoRA(targets=["query", "value"]))
    with pytest.raises(TargetError, match="already carries"):
        deltatune.attach(m, LoRA(targets=["query"]))
    assert len(lora_modules(m)) == 4  # the failed attach left the first one intact


def test_layers_restrict_injection():
    m = model("llama")
    deltatune.attach(m, LoRA(targets=["q_proj", "v_proj"], layers=[0]))
    assert sorted(lora_modules(m)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    m2 = model("gpt2")
    deltatune.attach(m2, LoRA(targets="c_attn", layers="1-1"))
    assert list(lora_modules(m2)) == ["transformer.h.1.attn.c_attn"]


def test_all_linear_skips_heads_and_embeddings():
    m = model("llama", head="classification")
    deltatune.attach(m, LoRA(exclude=["o_proj"]))
    found = lora_modules(m)
    assert len(found) == 2 * 6  # q k v gate up down per layer
    assert not any("score" in n or "embed" in n or "o_proj" in n for n in found)


def test_registered_with_description():
    method = methods()["lora"]
    assert method.config_class is LoRA and "LoRA" in method.description


# ---- 7, 8: save / load, trainable tensors, training ------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_save_load_roundtrip(tmp_path, dora):
    batch = tiny_batch()
    m = model("gpt2")
    delta = deltatune.attach(m, LoRA(r=4, targets=["c_attn", "wte"], dora=dora, scaling="rslora"))
    randomize(delta)
    expected = logits(m, batch)
    delta.save(tmp_path)
    saved = load_tensors(tmp_path / TENSOR_FILE)
    assert saved and all("lora_" in k for k in saved)
    assert set(saved) == set(delta.trainable_parameters())

    loaded = deltatune.load(model("gpt2"), tmp_path)
    assert loaded.config == delta.config
    assert torch.equal(logits(loaded.model, batch), expected)


def test_only_lora_trains_and_loss_drops():
    m, batch = model("llama"), tiny_batch()
    delta = deltatune.attach(m, LoRA(r=4, targets=["q_proj", "v_proj", "down_proj"], dropout=0.1))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(delta.trainable_parameters()) and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2
    m.train()
    opt = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(6):
        loss = lm_loss(m, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_update_matches_the_plain_sum(arch, autocast):
    """Linear / Conv1D add the update through one autograd function (its own backward, rank-r matmuls transposed):
    same outputs and gradients (A, B, input) as out + s·B(A(x)), also under bf16 autocast (the output in bf16, the
    gradients of A and B in fp32 like their weights)."""
    m = model(arch)
    delta = deltatune.attach(m, LoRA(r=4, targets=["all-linear"]))
    randomize(delta)
    wrapper = next(iter(lora_modules(m).values()))
    n_in = wrapper.lora_A.weight.shape[1]
    torch.manual_seed(0)
    x = torch.randn(2, 5, n_in)
    results = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = wrapper.base_layer(xi)
            plain = out + wrapper.kind.apply(wrapper, xi) * wrapper.scaling
            y = wrapper.kind.add_scaled(wrapper, xi, out) if fused else plain
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append((y.detach(), xi.grad, wrapper.lora_A.weight.grad.clone(), wrapper.lora_B.weight.grad.clone()))
        wrapper.lora_A.weight.grad = wrapper.lora_B.weight.grad = None
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for fused, plain in zip(*results):
        assert fused.dtype == plain.dtype
        torch.testing.assert_close(fused, plain, **tolerance)
    assert results[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert results[0][2].dtype == results[0][3].dtype == torch.float32
    assert results[0][0].shape == (2, 5, wrapper.base_layer(x).shape[-1])
