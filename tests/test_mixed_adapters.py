"""Mixed-adapter batches: several LoRA deltas attached at once, every row computed with its own delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.errors import ConfigError, DataError
from deltatune.generation.mixed import attach_mixed
from deltatune.generation.generator import named_deltas, open_generator
from deltatune.methods.ia3 import IA3
from deltatune.generation.prompts import PromptRecord
from deltatune.generation.sampling import Sampling
from tests.test_merge_deltas import base, lm_dir, save_lora  # noqa: F401  (lm_dir: fixture)
from tests.tiny import logits

PROMPTS = ["the quick brown", "hello world, how", "I am fine", "what is your", "a question and"]


@pytest.fixture(scope="module")
def deltas(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three LoRA deltas on different modules, with different ranks; one DoRA."""
    root = tmp_path_factory.mktemp("deltas")
    return {"a": save_lora(lm_dir, root / "a", 1, r=4, targets=["q_proj", "v_proj", "embed_tokens"]),
            "b": save_lora(lm_dir, root / "b", 2, r=2, targets=["o_proj", "down_proj"], dora=True),
            "c": save_lora(lm_dir, root / "c", 3, r=8, alpha=4, targets=["all-linear"], scaling="rslora")}


def test_each_row_gets_its_delta(lm_dir, deltas):
    batch = {"input_ids": torch.tensor([[5, 9, 30, 41], [3, 8, 60, 2], [7, 7, 19, 44], [1, 50, 12, 9]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])}
    rows = ["b", "a", "c", "b"]
    model = base(lm_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mixed = attach_mixed(model, deltas)
    mixed.route(rows)
    got = logits(model, batch)
    for i, name in enumerate(rows):
        alone = base(lm_dir)
        deltatune.load(alone, deltas[name])
        torch.testing.assert_close(got[i], logits(alone, batch)[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], logits(base(lm_dir), batch)[0], atol=1e-3)  # the deltas do change outputs
    mixed.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_mixed_batch_generates_what_each_prompt_alone_does(lm_dir, deltas, tmp_path):
    """Greedy generation of a mixed batch (CLI) equals each prompt generated alone with its delta."""
    names = ["a", "b", "c", "a", "b"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "adapter": n}) + "\n" for p, n in zip(PROMPTS, names)))
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(lm_dir), *[f"--delta={n}={f}" for n, f in deltas.items()],
                 "--prompts-file", str(prompts), "--max-new-tokens", "8", "--batch-size", "5", "--output", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["adapter"] for r in rows] == names
    alone = {}
    for name, folder in deltas.items():
        generator = open_generator(model=str(lm_dir), delta=folder)
        records = [PromptRecord("x", text=p) for p, n in zip(PROMPTS, names) if n == name]
        alone |= dict(zip([r.text for r in records], generator.complete(records, Sampling(max_new_tokens=8),
                                                                         batch_size=1)))
    assert [r["output"] for r in rows] == [alone[p] for p in PROMPTS]
    assert len({alone[p] for p in PROMPTS}) > 2  # the deltas generate different texts


def test_names_from_folders(tmp_path):
    assert named_deltas([tmp_path / "legal", f"chat={tmp_path / 'x'}", tmp_path / "run" / "best"]) == {
        "legal": tmp_path / "legal", "chat": tmp_path / "x", "run": tmp_path / "run" / "best"}
    with pytest.raises(ConfigError, match=r"two deltas are named 'best'|two deltas are named 'r'"):
        named_deltas([tmp_path / "r" / "best", tmp_path / "r"])


# ---- refusals -------------------------------------------------------------------------------------------------
def test_refuses_other_methods(lm_dir, deltas, tmp_path):
    model = base(lm_dir)
    deltatune.attach(model, IA3()).save(tmp_path / "ia3")
    model = base(lm_dir)
    with pytest.raises(ConfigError, match=r"adapter 'x' \(.*ia3\) holds ia3: mixed batches route LoRA deltas only"):
        attach_mixed(model, {"a": deltas["a"], "x": tmp_path / "ia3"})
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing left attached


def test_refuses_wrong_batch_and_unknown_names(lm_dir, deltas):
    model = base(lm_dir)
    mixed = attach_mixed(model, deltas)
    with pytest.raises(ConfigError, match="unknown adapter 'z'; the attached deltas are: a, b, c"):
        mixed.route(["a", "z"])
    mixed.route(["a", "b"])
    with pytest.raises(ConfigError, match="this batch has 1 rows but adapters were routed for 2"):
        logits(model, {"input_ids": torch.tensor([[4, 5]])})


def test_records_must_name_known_deltas(lm_dir, deltas, tmp_path):
    generator = open_generator(model=str(lm_dir), delta=[deltas["a"], deltas["b"]])
    with pytest.raises(DataError, match=r"f:2: the prompt names no adapter; with several --delta every prompt names "
                                        r"its delta in an 'adapter' field \(one of: a, b\)"):
        generator.complete([PromptRecord("f:1", text="x", adapter="a"), PromptRecord("f:2", text="y")], Sampling())
    with pytest.raises(DataError, match=r"f:1: unknown adapter 'c'; the deltas given are: a, b"):
        generator.complete([PromptRecord("f:1", text="x", adapter="c")], Sampling())
    single = open_generator(model=str(lm_dir), delta=f"legal={deltas['a']}")
    with pytest.raises(DataError, match=r"unknown adapter 'b'; the deltas given are: legal"):
        single.complete([PromptRecord("f:1", text="x", adapter="b")], Sampling())


def test_cli_refusals(lm_dir, deltas, capsys):
    delta_args = [f"--delta={deltas['a']}", f"--delta={deltas['b']}"]
    assert main(["generate", "--model", str(lm_dir), *delta_args, "--prompt", "hi", "--merge"]) == 1
    assert "--merge folds one delta into the base weights, but with several --delta" in capsys.readouterr().err
    assert main(["generate", "--model", str(lm_dir), *delta_args, "--prompt", "hi"]) == 1
    assert "--prompt 1: the prompt names no adapter" in capsys.readouterr().err
    assert main(["chat", "--model", str(lm_dir), *delta_args]) == 1
    assert "chat takes one --delta" in capsys.readouterr().err
