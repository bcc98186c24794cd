"""(IA)^3: parity with Hugging Face PEFT, PEFT's layout and defaults, merge/unmerge/detach exactness, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.ia3 import DEFAULTS, IA3, IA3Module
from deltatune.registry import parse_delta_config
from tests.tiny import biased_tiny_model, logits, tiny_batch

peft = pytest.importorskip("peft")

model = biased_tiny_model


def wrappers(m: nn.Module) -> dict[str, IA3Module]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, IA3Module)}


def randomize(delta, seed: int = 3) -> None:
    """Vectors away from ones, so the scaling really changes outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.copy_(1 + 0.5 * torch.randn_like(p))


# ---- parity with PEFT: same vectors -> same logits -------------------------------------------------------
PARITY = [
    ("llama", None, None),  # defaults: k_proj, v_proj, down_proj (input-scaled)
    ("bert", None, None),  # defaults: key, value, output.dense (input-scaled; also attention.output.dense)
    ("gpt2", None, None),  # defaults: c_attn, mlp.c_proj (input-scaled) — GPT-2 Conv1D, PEFT's fan_in_fan_out
    ("llama", ["q_proj", "o_proj", "up_proj"], ["up_proj"]),
    ("gpt2", ["c_attn", "c_fc", "attn.c_proj"], ["attn.c_proj"]),
]


@pytest.mark.parametrize("arch,targets,feedforward", PARITY, ids=[f"{a}-{t}" for a, t, _ in PARITY])
def test_parity_with_peft(arch, targets, feedforward):
    batch = tiny_batch()
    peft_targets, peft_ff = (targets, feedforward) if targets else DEFAULTS[arch]
    torch.manual_seed(0)
    reference = peft.get_peft_model(model(arch), peft.IA3Config(
        target_modules=peft_targets, feedforward_modules=peft_ff, fan_in_fan_out=(arch == "gpt2"),
        init_ia3_weights=False))  # PEFT draws randn vectors: a non-trivial scaling
    reference.eval()
    theirs = reference.state_dict()

    ours = model(arch)
    delta = deltatune.attach(ours, IA3(targets=targets, feedforward=feedforward))
    names = delta.trainable_parameters()
    # the same modules, vectors of the same shapes: an export to PEFT is a rename
    assert {f"base_model.model.{n}.default" for n in names} == {k for k in theirs if ".ia3_l." in k}
    mapped = {n: theirs[f"base_model.model.{n}.default"] for n in names}
    assert all(mapped[n].shape == p.shape for n, p in names.items())
    delta.load_state_dict(mapped)
    expected = logits(reference, batch)
    assert not torch.allclose(expected, logits(model(arch), batch), atol=1e-3)  # the scaling is visible
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=1e-4)
    # input vs output scaling agrees with PEFT's is_feedforward, module by module
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules()
                   if hasattr(m, "is_feedforward") and hasattr(m, "ia3_l")}
    assert {n: w.is_feedforward for n, w in wrappers(ours).items()} == {n: m.is_feedforward
                                                                        for n, m in peft_layers.items()}


# ---- attach, merge, unmerge, detach ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_ones_at_attach_then_merge_unmerge_detach(arch):
    base, batch = model(arch), tiny_batch()
    tree = [(n, type(m)) for n, m in base.named_modules()]
    original = {k: v.clone() for k, v in base.state_dict().items()}
    before = logits(base, batch)

    delta = deltatune.attach(base, IA3())
    assert torch.equal(logits(base, batch), before)  # vectors of ones change nothing
    assert all(p.requires_grad == n.endswith(".ia3_l") for n, p in base.named_parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in delta.trainable_parameters().values())
    randomize(delta)
    unmerged = logits(base, batch)
    assert not torch.allclose(unmerged, before, atol=1e-4)

    delta.merge()
    torch.testing.assert_close(logits(base, batch), unmerged, atol=1e-5, rtol=1e-4)
    assert not wrappers(base) and [(n, type(m)) for n, m in base.named_modules()] == tree
    merged = base.state_dict()
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    # every targeted weight changed; biases only where the output is scaled
    for w in delta.wrappers:
        name = next(n for n, m in base.named_modules() if m is w.base_layer)
        assert f"{name}.weight" in changed
        if w.base_layer.bias is not None:
            assert (f"{name}.bias" in changed) != w.is_feedforward

    delta.unmerge()
    assert torch.equal(logits(base, batch), unmerged)
    assert all(torch.equal(w.base_layer.weight, original[f"{n}.weight"]) for n, w in wrappers(base).items())
    delta.detach()
    assert [(n, type(m)) for n, m in base.named_modules()] == tree
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


def test_merge_folds_rows_columns_and_bias_as_the_paper_says():
    """Output scaling = rows of W (and b); input scaling = columns of W (Linear layout); Conv1D transposed."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4))
    conv = Conv1D(4, 5)  # (nf=out, nx=in): weight (in=5, out=4)
    for layer, ff in ((lin[0], False), (lin[1], True), (conv, False), (conv, True)):
        w = IA3Module(copy.deepcopy(layer), feedforward=ff)
        with torch.no_grad():
            w.ia3_l.uniform_(0.5, 1.5)
        x = torch.randn(2, w.base_layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features)
        expected = w(x)
        with torch.no_grad():
            w.merge()
        torch.testing.assert_close(w.base_layer(x), expected)
        with torch.no_grad():
            w.unmerge()
        assert torch.equal(w.base_layer.weight, layer.weight) and torch.equal(w.base_layer.bias, layer.bias)


def test_tied_weight_cannot_be_merged():
    m = model("gpt2")  # lm_head is tied to the input embeddings
    delta = deltatune.attach(m, IA3(targets=["lm_head"]))
    with pytest.raises(ConfigError, match="shared with another module"):
        delta.merge()
    assert not delta.merged and wrappers(m)


# ---- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_vectors_train_and_the_lm_loss_falls(arch):
    m, batch = model(arch), tiny_batch()
    delta = deltatune.attach(m, IA3())
    assert set(delta.trainable_parameters()) == {f"{n}.ia3_l" for n in wrappers(m)}
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=3e-2)

    def loss() -> torch.Tensor:
        out = m(**batch).logits
        return F.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    m.eval()  # no dropout: the comparison measures training, not noise
    first = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first - 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)


# ---- configuration and errors ---------------------------------------------------------------------------
def test_defaults_follow_the_model_type_and_explicit_targets_keep_feedforward_defaults():
    m = model("llama")
    deltatune.attach(m, IA3(targets=["v_proj", "down_proj"]))  # no feedforward given: the family's down_proj
    kinds = {n.rsplit(".", 1)[-1]: w.is_feedforward for n, w in wrappers(m).items()}
    assert kinds == {"v_proj": False, "down_proj": True}
    assert wrappers(m)["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 64)  # (1, in) as in PEFT
    assert wrappers(m)["model.layers.0.self_attn.v_proj"].ia3_l.shape == (16, 1)  # (out, 1)

    m = model("llama")
    deltatune.attach(m, IA3(targets=["down_proj"], feedforward=[], layers=[1]))  # output scaling, one layer
    assert {n: w.is_feedforward for n, w in wrappers(m).items()} == {"model.layers.1.mlp.down_proj": False}
    m = model("llama")
    deltatune.attach(m, IA3(exclude=["down_proj"]))  # defaults minus the FFN: no feedforward left, no error
    assert {n.rsplit(".", 1)[-1] for n in wrappers(m)} == {"k_proj", "v_proj"}
    assert not any(w.is_feedforward for w in wrappers(m).values())
    cfg = parse_delta_config({"method": "ia3", "targets": "k_proj", "feedforward": "down_proj"})
    assert cfg.targets == ["k_proj"] and cfg.feedforward == ["down_proj"]


def test_feedforward_outside_targets_is_an_error():
    with pytest.raises(TargetError, match="feedforward pattern 'up_proj' matches none of the targeted"):
        deltatune.attach(model("llama"), IA3(targets=["k_proj", "v_proj"], feedforward=["up_proj"]))
    with pytest.raises(TargetError, match="matches no module.*Candidates"):
        deltatune.attach(model("llama"), IA3(feedforward=["no_such_module"]))


def test_other_model_types_get_keys_values_and_ffn_output_from_their_structure():
    import transformers as T

    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                       num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    delta = deltatune.attach(opt, IA3())
    wrapped = {n.split("layers.")[1]: w.is_feedforward for n, w in zip(delta.trainable_parameters(), delta.wrappers)}
    assert wrapped == {f"{i}.{m}.ia3_l": m == "fc2" for i in (0, 1) for m in ("self_attn.k_proj", "self_attn.v_proj",
                                                                               "fc2")}


def test_model_without_attention_needs_targets():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TargetError, match="found no attention layers .* in Sequential.*Candidates: 0, 2"):
        deltatune.attach(m, IA3())
    delta = deltatune.attach(m, IA3(targets=["0", "2"], feedforward=["2"]))
    assert [w.is_feedforward for w in delta.wrappers] == [False, True]


def test_unsupported_module_type_and_double_attach_are_errors():
    with pytest.raises(TargetError, match="supported type"):
        deltatune.attach(model("llama"), IA3(targets=["embed_tokens"]))
    m = model("bert")
    deltatune.attach(m, IA3())
    with pytest.raises(TargetError, match="already carries a ia3 delta"):
        deltatune.attach(m, IA3(targets=["key"]))
