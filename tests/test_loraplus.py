"""LoRA+ (optimizer.loraplus_lr_ratio): the same per-tensor learning rates as PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

import deltatune  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402
from deltatune.methods.head import Head  # noqa: E402
from deltatune.methods.ia3 import IA3  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.optim import OptimizerConfig, build_optimizer  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

LR, RATIO = 2e-4, 16.0


def lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def peft_name(ours: str, embedding: bool) -> str:
    if ours.endswith(".lora_magnitude_vector"):
        return f"base_model.model.{ours}.default.weight"
    module, part, _ = ours.rsplit(".", 2)
    return f"base_model.model.{module}.lora_embedding_{part[-1]}.default" if embedding else \
        f"base_model.model.{module}.{part}.default.weight"


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("embedding_lr", [None, 3e-5])
def test_learning_rates_match_peft_create_loraplus_optimizer(dora, embedding_lr):
    targets = ["embed_tokens", "q_proj", "v_proj", "down_proj"]
    reference = peft.get_peft_model(tiny_model("llama", head="lm"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=dora))
    extra = {} if embedding_lr is None else {"loraplus_lr_embedding": embedding_lr}
    theirs = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, **extra)
    their_lr = {n: lr_of(theirs)[id(p)] for n, p in reference.named_parameters() if p.requires_grad}

    model = tiny_model("llama", head="lm")
    delta = deltatune.attach(model, LoRA(r=4, alpha=8, targets=targets, dora=dora))
    ours = build_optimizer(model, delta, OptimizerConfig(lr=LR, loraplus_lr_ratio=RATIO, **extra))
    our_lr = {peft_name(n, "embed_tokens" in n): lr_of(ours)[id(p)] for n, p in delta.trainable_parameters().items()}
    assert our_lr == their_lr
    assert sorted(set(our_lr.values())) == sorted({embedding_lr or 1e-6, LR, LR * RATIO})
    names = {g["name"] for g in ours.param_groups}
    assert names == {"default", "default, LoRA+ B", "LoRA+ embedding"}


def test_loraplus_multiplies_layer_decay_and_leaves_lr_groups_and_heads():
    model = tiny_model("bert")
    delta = deltatune.attach(model, [LoRA(r=2, targets=["query", "value"]), Head()])
    cfg = OptimizerConfig(lr=1e-3, layer_decay=0.5, head_lr=5e-3, loraplus_lr_ratio=4,
                          lr_groups={r"layer\.1\.attention\.self\.value\.lora_B": 7e-4})
    lrs = lr_of(build_optimizer(model, delta, cfg))
    params = delta.trainable_parameters()
    a0 = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    b0 = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert lrs[id(params[a0])] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lrs[id(params[b0])] == pytest.approx(4 * 1e-3 * 0.5 ** 2)
    assert lrs[id(params["bert.encoder.layer.1.attention.self.value.lora_B.weight"])] == 7e-4  # lr_groups wins
    assert {lrs[id(p)] for n, p in params.items() if n.startswith("classifier")} == {5e-3}


def test_loraplus_needs_lora_and_a_ratio():
    model = tiny_model("bert")
    delta = deltatune.attach(model, IA3())
    with pytest.raises(ConfigError, match="optimizer.loraplus_lr_ratio \\(LoRA\\+\\) sets the LR of LoRA's B factors, "
                                          "and this delta has no LoRA: use method lora, or remove loraplus_lr_ratio"):
        build_optimizer(model, delta, OptimizerConfig(loraplus_lr_ratio=16))
    with pytest.raises(ConfigError, match="loraplus_lr_embedding is a LoRA\\+ setting: set loraplus_lr_ratio too"):
        OptimizerConfig(loraplus_lr_embedding=1e-5)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        OptimizerConfig(loraplus_lr_ratio=0.5)
    with pytest.raises(ConfigError, match="loraplus_ratio"):
        OptimizerConfig(loraplus_ratio=16)
