"""The delta contract (DESIGN.md), checked for every registered method on tiny GPT-2, Llama and BERT models."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.delta import CONFIG_FILE, FORMAT_VERSION, TENSOR_FILE
from deltatune.storage import load_tensors
from deltatune.registry import methods
from deltatune.targeting import DeltaModule
from tests.saved_adapters import fusion_config_args
from tests.tiny import logits, tiny_batch, tiny_model

ARCHS = ["gpt2", "llama", "bert"]
METHODS = sorted(methods())
# Methods whose defaults need a nudge to apply to a tiny classification model. A method's own test file may give
# them instead, as CONTRACT_ARGS in tests/test_<method>.py (so a new method needs no edit here).
CONFIG_ARGS: dict[str, dict] = {
    # multi-task: calls without a `task` keyword compute the first task (a: the 2 labels loss_of uses)
    "task_heads": {"tasks": [{"name": "a", "num_labels": 2}, {"name": "b", "kind": "regression"}]},
    "per_task": {"tasks": ["a", "b"], "delta": {"method": "lora", "r": 2}},
}


# Methods whose config depends on the base model (fusion fuses adapters saved for it): arch -> config args.
CONFIG_FACTORIES: dict[str, Callable[[str], dict]] = {"fusion": fusion_config_args}


def contract_args(method: str) -> dict:
    """The config arguments the shared suites use for `method`: CONFIG_ARGS, else its test file's CONTRACT_ARGS."""
    if method in CONFIG_ARGS:
        return CONFIG_ARGS[method]
    try:
        own_tests = importlib.import_module(f"tests.test_{method}")
    except ModuleNotFoundError:
        return {}
    return getattr(own_tests, "CONTRACT_ARGS", {})


def make_config(method: str, arch: str = "llama", **overrides):
    args = CONFIG_FACTORIES[method](arch) if method in CONFIG_FACTORIES else contract_args(method)
    return methods()[method].config_class(**{**args, **overrides})


def loss_of(model, batch, labels):
    return F.cross_entropy(model(**batch).logits, labels)


def module_tree(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


cases = pytest.mark.parametrize("arch", ARCHS)
every_method = pytest.mark.parametrize("method", METHODS)


def test_registry_lists_the_foundation_methods():
    assert {"full", "head", "lora"} <= set(METHODS)
    for name, method in methods().items():
        assert method.description, f"{name} has no one-line description"


@every_method
@cases
def test_attach_keeps_outputs_and_trains_only_delta(method, arch):
    model, batch = tiny_model(arch), tiny_batch()
    before = logits(model, batch)
    delta = deltatune.attach(model, make_config(method, arch))
    if delta.preserves_output:
        torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=1e-6)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.trainable_parameters().values()}
    n_trainable, n_total = delta.parameter_counts()
    assert 0 < n_trainable <= n_total


@every_method
@cases
def test_a_few_steps_lower_the_loss(method, arch):
    # Without dropout: a fixed batch must then show the delta's effect, not dropout noise.
    model, batch = tiny_model(arch, dropout=0.0), tiny_batch()
    labels = torch.tensor([0, 1, 1, 0])
    delta = deltatune.attach(model, make_config(method, arch))
    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters().values(), lr=1e-2)
    first = loss_of(model, batch, labels).item()
    for _ in range(8):
        optimizer.zero_grad()
        loss_of(model, batch, labels).backward()
        optimizer.step()
    assert loss_of(model, batch, labels).item() < first


@every_method
@cases
def test_save_writes_only_delta_tensors_and_load_reproduces(method, arch, tmp_path):
    model, batch = tiny_model(arch), tiny_batch()
    delta = deltatune.attach(model, make_config(method, arch))
    with torch.no_grad():  # move away from the initial values so the round trip is meaningful
        for p in delta.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    expected = logits(model, batch)
    delta.save(tmp_path)
    saved = load_tensors(tmp_path / TENSOR_FILE)
    assert set(saved) == set(delta.trainable_parameters())
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["deltas"][0]["config"]["method"] == method and meta["version"] == FORMAT_VERSION

    fresh = tiny_model(arch)
    deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)


@every_method
@cases
def test_detach_restores_model_exactly(method, arch):
    model = tiny_model(arch)
    tree, original = module_tree(model), weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    delta = deltatune.attach(model, make_config(method, arch))
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.05)
    delta.detach()
    assert module_tree(model) == tree
    after = model.state_dict()
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@every_method
@cases
def test_merge_matches_unmerged_and_leaves_no_extra_modules(method, arch):
    model, batch = tiny_model(arch), tiny_batch()
    delta = deltatune.attach(model, make_config(method, arch))
    if not delta.mergeable:
        with pytest.raises(deltatune.ConfigError, match="cannot be merged"):
            delta.merge()
        return
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    unmerged = logits(model, batch)
    delta.merge()
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    delta.unmerge()
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=0)


@every_method
def test_delta_loaded_onto_the_wrong_base_is_one_clear_error(method, tmp_path):
    delta = deltatune.attach(tiny_model("llama"), make_config(method))
    delta.save(tmp_path)
    with pytest.raises(deltatune.CheckpointError, match="saved for another base model"):
        deltatune.load(tiny_model("bert"), tmp_path)


@pytest.mark.parametrize("method", [m for m in METHODS if "targets" in methods()[m].config_class.model_fields])
def test_target_matching_nothing_is_one_clear_error(method):
    with pytest.raises(deltatune.TargetError, match="matches no module.*Candidates"):
        deltatune.attach(tiny_model("bert"), make_config(method, targets=["no_such_module"]))


@every_method
def test_attaching_the_same_delta_twice_is_an_error(method):
    model = tiny_model("llama")
    delta = deltatune.attach(model, make_config(method))
    with pytest.raises(deltatune.ConfigError, match="already attached"):
        delta.attach()


@every_method
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_trains_the_delta(method, arch):
    model, batch = tiny_model(arch), tiny_batch()
    delta = deltatune.attach(model, make_config(method, arch))
    model.gradient_checkpointing_enable()
    model.train()
    loss_of(model, batch, torch.tensor([0, 1, 1, 0])).backward()
    grads = [p.grad for p in delta.trainable_parameters().values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="module")
def minilm_inputs():
    from transformers import AutoTokenizer

    from deltatune.models.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    return tokenizer(["a gripping, well acted film", "dull and far too long"], return_tensors="pt", padding=True)


@every_method
def test_contract_on_the_real_packaged_model(method, minilm_inputs, tmp_path):
    """Attach, save, reload into a fresh copy, detach: on the real MiniLM encoder, not only on tiny models."""
    from deltatune.models.load import load_model

    model = load_model("minilm", "classification", 2)[0].eval()
    before, original = logits(model, minilm_inputs), weights(model)
    delta = deltatune.attach(model, make_config(method, "minilm"))
    if delta.preserves_output:
        torch.testing.assert_close(logits(model, minilm_inputs), before, rtol=0, atol=1e-6)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    tuned = logits(model, minilm_inputs)
    delta.save(tmp_path)
    fresh = load_model("minilm", "classification", 2)[0].eval()
    with torch.no_grad():  # the same base: copy the random head, which load_model initialises afresh
        fresh.load_state_dict(original)
    deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, minilm_inputs), tuned, rtol=0, atol=0)
    delta.detach()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@every_method
def test_for_inference_keeps_outputs_and_saves_what_reloads(method, tmp_path):
    model, batch = tiny_model("llama"), tiny_batch()
    delta = deltatune.attach(model, make_config(method))
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    expected = logits(model, batch)
    delta.for_inference()
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-6, atol=1e-6)
    delta.save(tmp_path)
    fresh = tiny_model("llama")
    deltatune.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=1e-6, atol=1e-6)
