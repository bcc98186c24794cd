"""LoRA initialisations: PiSSA / pissa_niter_N / OLoRA against PEFT; residual base restored bit for bit on detach;
saved as the plain rank-2r LoRA of the untouched base (PEFT's path_initial_model_for_weight_conversion)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import deltatune  # noqa: E402
from deltatune.delta import Delta, read_delta_config  # noqa: E402
from deltatune.errors import ConfigError, TargetError  # noqa: E402
from deltatune.interop.peft import export_peft  # noqa: E402
from deltatune.storage import load_tensors  # noqa: E402
from deltatune.methods.lora import LoRA, LoRAModule  # noqa: E402
from tests.tiny import biased_tiny_model, logits, tiny_batch  # noqa: E402

R, ALPHA = 4, 8.0
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def wrappers(m: nn.Module) -> dict[str, LoRAModule]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, LoRAModule)}


def peft_model(arch: str, init: str, **extra):
    return peft.get_peft_model(biased_tiny_model(arch), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], init_lora_weights=init, fan_in_fan_out=arch == "gpt2",
        **extra)).eval()


def train_a_little(delta) -> None:
    """Move A and B away from their init, as training would."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)


CASES = [("llama", "pissa", {}), ("llama", "pissa_niter_2", {}), ("llama", "olora", {}),
         ("gpt2", "pissa", {}), ("llama", "pissa", {"use_rslora": True}), ("llama", "olora", {"use_dora": True})]


@pytest.mark.parametrize("arch,init,extra", CASES, ids=[f"{a}-{i}-{'+'.join(e)}" for a, i, e in CASES])
def test_factors_residual_and_logits_match_peft(arch, init, extra):
    batch = tiny_batch()
    torch.manual_seed(0)  # pissa_niter draws its random projection from torch's generator, in module order
    reference = peft_model(arch, init, **extra)
    torch.manual_seed(0)
    ours = biased_tiny_model(arch)
    deltatune.attach(ours, LoRA(r=R, alpha=ALPHA, targets=TARGETS[arch], init=init,
                                scaling="rslora" if extra.get("use_rslora") else "standard",
                                dora=extra.get("use_dora", False)))
    theirs = reference.state_dict()
    for name, w in wrappers(ours).items():
        key = f"base_model.model.{name}"
        torch.testing.assert_close(w.lora_A.weight, theirs[f"{key}.lora_A.default.weight"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.lora_B.weight, theirs[f"{key}.lora_B.default.weight"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.base_layer.weight, theirs[f"{key}.base_layer.weight"], atol=1e-6, rtol=1e-5)
        assert w.lora_B.weight.abs().sum() > 0  # a real principal-factor init, not B = 0
    torch.testing.assert_close(logits(ours, batch), logits(reference, batch), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(ours, batch), logits(biased_tiny_model(arch), batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_form_equals_peft_weight_conversion(init, tmp_path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes [A ; A0], [B | -B0]: so do we."""
    torch.manual_seed(0)
    reference = peft_model("llama", init)
    reference.peft_config["default"].init_lora_weights = True  # as PEFT's docs say, before saving the initial state
    reference.save_pretrained(tmp_path / "initial")
    reference.peft_config["default"].init_lora_weights = init
    ours = biased_tiny_model("llama")
    delta = deltatune.attach(ours, LoRA(r=R, alpha=ALPHA, targets=TARGETS["llama"], init=init))
    train_a_little(delta)
    with torch.no_grad():  # the same trained A, B in both
        for name, w in wrappers(ours).items():
            theirs = reference.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(w.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(w.lora_B.weight)
    initial = str(tmp_path / "initial")
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=initial)
    converted = peft.PeftModel.from_pretrained(biased_tiny_model("llama"), tmp_path / "converted").eval()
    config = converted.peft_config["default"]
    saved = read_delta_config(delta.save(tmp_path / "ours"))["deltas"][0]["config"]
    assert (saved["r"], saved["alpha"], saved["init"]) == (config.r, config.lora_alpha, "kaiming")
    assert (config.r, config.lora_alpha) == (8, 16.0)
    theirs = converted.state_dict()
    for name, tensor in delta.state_dict().items():
        module, part, _ = name.rsplit(".", 2)
        torch.testing.assert_close(tensor, theirs[f"base_model.model.{module}.{part}.default.weight"])
    batch = tiny_batch()
    torch.testing.assert_close(logits(ours, batch), logits(converted, batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,init,opts", [("llama", "pissa", {}), ("gpt2", "olora", {}),
                                            ("llama", "pissa_niter_4", {"dora": True}),
                                            ("gpt2", "pissa", {"scaling": "rslora"})])
def test_detach_merge_save_load(arch, init, opts, tmp_path):
    batch = tiny_batch()
    base = biased_tiny_model(arch)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    delta = deltatune.attach(base, LoRA(r=R, alpha=ALPHA, targets=TARGETS[arch], init=init, **opts))
    assert any(not torch.equal(w.base_layer.weight, original[f"{n}.weight"]) for n, w in wrappers(base).items())
    train_a_little(delta)
    trained = logits(base, batch)
    assert not torch.allclose(trained, logits(biased_tiny_model(arch), batch), atol=1e-3)

    residual = {n: w.base_layer.weight.clone() for n, w in wrappers(base).items()}
    delta.merge()
    torch.testing.assert_close(logits(base, batch), trained, atol=1e-5, rtol=1e-4)
    delta.unmerge()
    assert all(torch.equal(w.base_layer.weight, residual[n]) for n, w in wrappers(base).items())

    # save: the plain LoRA of rank 2r on the untouched base; loading it there gives the trained outputs
    delta.save(tmp_path / "d")
    fresh = biased_tiny_model(arch)
    loaded = deltatune.load(fresh, tmp_path / "d")
    assert loaded.config.r == 2 * R and loaded.config.init == "kaiming"
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-5, rtol=1e-4)
    if not opts:  # exported for PEFT (in the same plain form), it loads there with the same outputs
        export_peft(delta, tmp_path / "peft")
        reference = peft.PeftModel.from_pretrained(biased_tiny_model(arch), tmp_path / "peft").eval()
        torch.testing.assert_close(logits(reference, batch), trained, atol=1e-5, rtol=1e-4)

    # the saved form loads back into the live (residual) delta: what resuming and the best-delta reload do
    saved = {k: v.clone() for k, v in delta.state_dict().items()}
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.zero_()
    delta.load_state_dict(saved)
    torch.testing.assert_close(logits(base, batch), trained, atol=0, rtol=0)

    delta.merge()
    delta.detach()  # merged -> unmerged -> original base, bit for bit
    state = base.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_loading_another_init_rebases_the_residual(tmp_path):
    """Saved A0, B0 that differ from this delta's own (another machine's SVD) become its init: same outputs as the
    saved delta on the untouched base."""
    batch = tiny_batch()
    first = biased_tiny_model("llama")
    trained = deltatune.attach(first, LoRA(r=R, targets=["q_proj"], init="pissa_niter_1"))
    train_a_little(trained)
    trained.save(tmp_path / "d")
    torch.manual_seed(123)  # another random projection: other A0, B0
    live = deltatune.attach(biased_tiny_model("llama"), LoRA(r=R, targets=["q_proj"], init="pissa_niter_1"))
    before = {n: w.initial.a.clone() for n, w in wrappers(live.model).items()}
    live.load_state_dict(load_tensors(tmp_path / "d" / "delta.safetensors"))
    assert any(not torch.equal(w.initial.a, before[n]) for n, w in wrappers(live.model).items())
    torch.testing.assert_close(logits(live.model, batch), logits(first, batch), atol=1e-5, rtol=1e-4)


def test_init_names_and_bounds():
    assert LoRA(init="default").init == "kaiming"
    assert LoRA(init="pissa_niter_16").init == "pissa_niter_16"
    for bad in ("PiSSA", "pissa_niter_", "pissa_niter_1000", "pissa_niter_-1", "eva", "loftq"):
        with pytest.raises(ConfigError, match=r"unknown init .*choose kaiming \(or default\), gaussian, pissa, "
                                              r"pissa_niter_N \(N = 0\.\.999, e\.g\. pissa_niter_4\) or olora"):
            LoRA(init=bad)
    with pytest.raises(ConfigError, match="init olora saves a plain LoRA of rank 2r and alpha 2·alpha: r must be at "
                                          "most 32768"):
        LoRA(init="olora", r=40_000)
    LoRA(init="gaussian", r=40_000)  # random inits save as they are


def test_residual_init_refuses_embeddings_and_tied_weights():
    base = biased_tiny_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(TargetError, match="init pissa supports Linear and GPT-2 Conv1D layers with float weights; "
                                          "'model.embed_tokens' is a Embedding: exclude it, or use init kaiming"):
        deltatune.attach(base, LoRA(targets=["embed_tokens", "q_proj"], init="pissa"))
    tied = biased_tiny_model("gpt2")  # GPT-2 ties lm_head to the token embeddings
    with pytest.raises(ConfigError, match="init olora would change the weight of 'lm_head', which another module "
                                          r"shares \(tied weights\)"):
        deltatune.attach(tied, LoRA(targets=["lm_head"], init="olora"))
    state = base.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert not wrappers(base) and not wrappers(tied)


def test_failed_attach_restores_the_residual_base(monkeypatch):
    base = biased_tiny_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    swap, calls = Delta.swap, []

    def fail_on_third(self, name, new):  # a failure after two wrappers changed their base weights
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        swap(self, name, new)

    monkeypatch.setattr(Delta, "swap", fail_on_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        deltatune.attach(base, LoRA(targets=["q_proj", "v_proj"], init="pissa"))
    state = base.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_unconverted_peft_pissa_adapter_is_refused(tmp_path):
    peft_model("llama", "pissa").save_pretrained(tmp_path / "pissa")  # tensors of PEFT's residual base
    base = biased_tiny_model("llama")
    with pytest.raises(ConfigError, match="PEFT LORA adapter with init_lora_weights='pissa': its tensors fit only the "
                                          "residual base model PEFT changed at init"):
        deltatune.load(base, tmp_path / "pissa")
    assert not wrappers(base)


def test_training_run_with_pissa_saves_a_delta_for_the_untouched_base(tmp_path):
    """The loop's checkpoints and best-delta reload go through the saved (plain) form and back into the live delta."""
    from tests.test_loop import COLLATE, task_data
    from deltatune.train import TrainConfig, train

    model = biased_tiny_model("gpt2")
    delta = deltatune.attach(model, LoRA(r=R, targets=TARGETS["gpt2"], init="pissa"))
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer={"lr": 1e-2})
    result = train(model, delta, task_data("text", n_train=32), cfg, tmp_path, collate=COLLATE)
    assert result.best_step is not None
    batch = tiny_batch()
    fresh = biased_tiny_model("gpt2")
    deltatune.load(fresh, tmp_path / "best")
    model.eval()
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(fresh, batch), logits(biased_tiny_model("gpt2"), batch), atol=1e-3)
