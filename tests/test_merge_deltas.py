"""merge-deltas: LoRA deltas combined as PEFT's `add_weighted_adapter` does (checked against real `peft`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.cli import main
from deltatune.errors import CheckpointError, ConfigError
from deltatune.interop.merge import HOWS, _prune, _random, merge_deltas
from deltatune.interop.peft import export_peft
from deltatune.storage import load_tensors
from deltatune.methods.ia3 import IA3
from deltatune.methods.lora import LoRA
from tests.tiny import logits
from tests.test_generation_cli import held_out, run  # noqa: F401  (fixtures)
from tests.tiny_lm import save_tiny_lm

peft = pytest.importorskip("peft")
WEIGHTS = [0.7, -0.4]
BATCH = {"input_ids": torch.tensor([[5, 9, 30, 41, 7, 12], [3, 8, 60, 2, 90, 11]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def base(lm_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(lm_dir).eval()


def save_lora(lm_dir: Path, folder: Path, seed: int, **config) -> Path:
    """A LoRA delta with random A and B (trained-looking: B is not zero), saved as deltatune and as PEFT."""
    model = base(lm_dir)
    delta = deltatune.attach(model, LoRA(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.copy_(0.3 * torch.randn_like(p))
    delta.save(folder)
    export_peft(delta, folder.with_name(folder.name + "-peft"))
    return folder


@pytest.fixture(scope="module")
def pair(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA deltas of equal rank on overlapping modules (an embedding among them), different alphas."""
    root = tmp_path_factory.mktemp("pair")
    return [save_lora(lm_dir, root / "a", 1, r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]),
            save_lora(lm_dir, root / "b", 2, r=4, alpha=16, targets=["q_proj", "o_proj"], scaling="rslora")]


@pytest.fixture(scope="module")
def linear_pair(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA deltas on Linear layers only, ranks 4 and 2."""
    root = tmp_path_factory.mktemp("linear-pair")
    return [save_lora(lm_dir, root / "a", 3, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
            save_lora(lm_dir, root / "b", 4, r=2, alpha=4, targets=["q_proj", "o_proj"])]


def peft_merge(lm_dir: Path, folders: list[Path], monkeypatch: pytest.MonkeyPatch, seed: int = 0, **kwargs):
    """PEFT's add_weighted_adapter on the same adapters; the RNG is seeded where the combination starts (after
    PEFT initialised the new adapter's weights), so dare draws the masks deltatune draws."""
    import peft.tuners.lora.model as lora_model

    freeze = lora_model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(seed)

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base(lm_dir), f"{folders[0]}-peft", adapter_name="a0")
        for i, folder in enumerate(folders[1:], 1):
            model.load_adapter(f"{folder}-peft", adapter_name=f"a{i}")
        model.add_weighted_adapter([f"a{i}" for i in range(len(folders))], WEIGHTS[:len(folders)], "merged", **kwargs)
    model.set_adapter("merged")
    return model


def ours(lm_dir: Path, folder: Path, tmp: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The merged delta loaded on the base, and its tensors under PEFT's keys."""
    model = base(lm_dir)
    delta = deltatune.load(model, folder)
    export_peft(delta, tmp / "export")
    return model, load_tensors(tmp / "export" / "adapter_model.safetensors")


def products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·A of every module (what the adapter adds to its weight)."""
    return {key.replace("_A", "_·"): tensors[key.replace("_A", "_B")] @ t for key, t in tensors.items() if "_A" in key}


def options(how: str) -> dict:
    return dict(density=0.5) if "ties" in how or "dare" in how or "magnitude" in how else {}


@pytest.mark.parametrize("how", HOWS)
def test_matches_peft_add_weighted_adapter(how, lm_dir, pair, linear_pair, tmp_path, monkeypatch):
    # different ranks for cat; PEFT draws dare's masks of an embedding's update in the embedding's layout, ours in
    # B·A's: dare_*_svd is compared on Linear layers
    folders = linear_pair if how == "cat" or how.startswith("dare") and how.endswith("svd") else pair
    merge_deltas(folders, WEIGHTS, tmp_path / "merged", how=how, seed=11, **options(how))
    model, tensors = ours(lm_dir, tmp_path / "merged", tmp_path)
    reference = peft_merge(lm_dir, folders, monkeypatch, seed=11, combination_type=how, **options(how))
    expected = peft.get_peft_model_state_dict(reference, adapter_name="merged", save_embedding_layers=False)
    assert tensors.keys() == expected.keys()
    if how.endswith("svd"):  # the SVD's factors are unique up to signs: compare the updates B·A
        ours_ba, peft_ba = products(tensors), products(expected)
        for key in ours_ba:
            torch.testing.assert_close(ours_ba[key], peft_ba[key], atol=1e-5, rtol=1e-4)
    else:
        for key in tensors:
            torch.testing.assert_close(tensors[key], expected[key], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(model, BATCH), logits(reference, BATCH), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(how="ties_svd", density=0.3, majority_sign="frequency", svd_rank=3,
                                         svd_clamp=0.9),
                                    dict(how="dare_ties", density=0.7, majority_sign="frequency")])
def test_peft_options(kwargs, lm_dir, pair, tmp_path, monkeypatch):
    merge_deltas(pair, WEIGHTS, tmp_path / "merged", seed=5, **kwargs)
    model, _ = ours(lm_dir, tmp_path / "merged", tmp_path)
    peft_kwargs = dict(combination_type=kwargs["how"], density=kwargs["density"],
                       majority_sign_method=kwargs["majority_sign"], svd_rank=kwargs.get("svd_rank"),
                       svd_clamp=kwargs.get("svd_clamp"))
    reference = peft_merge(lm_dir, pair, monkeypatch, seed=5, **peft_kwargs)
    torch.testing.assert_close(logits(model, BATCH), logits(reference, BATCH), atol=1e-5, rtol=1e-4)


def test_cat_is_the_exact_weighted_sum(lm_dir, linear_pair, tmp_path):
    """cat with different ranks: rank 6, and the model equals the weighted sum of both updates."""
    merge_deltas(linear_pair, WEIGHTS, tmp_path / "merged", how="cat")
    meta = json.loads((tmp_path / "merged" / "delta.json").read_text())
    assert meta["deltas"][0]["config"]["r"] == 6 and meta["deltas"][0]["config"]["alpha"] == 6
    merged = base(lm_dir)
    deltatune.load(merged, tmp_path / "merged").merge()
    expected = base(lm_dir)
    for folder, weight in zip(linear_pair, WEIGHTS):
        delta = deltatune.load(base(lm_dir), folder)
        for wrapper in delta.wrappers:
            name = next(n for n, m in delta.model.named_modules() if m is wrapper)
            expected.get_submodule(name).weight.data += weight * wrapper.delta_weight().detach()
    for (name, p), q in zip(merged.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_dare_pruning_keeps_density_and_rescales():
    torch.manual_seed(0)
    pruned = _prune([torch.ones(100_000)], 0.3, _random)[0]
    assert pruned.unique().tolist() == pytest.approx([0.0, 1 / 0.3])
    assert (pruned != 0).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_dare_depends_on_seed_only(pair, tmp_path):
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        merge_deltas(pair, WEIGHTS, tmp_path / name, how="dare_linear", density=0.5, seed=seed)
    one, again, other = (load_tensors(tmp_path / n / "delta.safetensors") for n in ("one", "again", "other"))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)


def test_merged_folder_records_how_and_keeps_targets(pair, tmp_path):
    merge_deltas(pair, WEIGHTS, tmp_path / "merged", how="ties", density=0.5)
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["how"] == "ties" and record["weights"] == WEIGHTS and record["density"] == 0.5
    config = json.loads((tmp_path / "merged" / "delta.json").read_text())["deltas"][0]["config"]
    assert config["targets"] == ["model.embed_tokens"] + [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                                          for m in ("q_proj", "v_proj", "o_proj")]


# ---- refusals -------------------------------------------------------------------------------------------------
def test_refuses_other_bases(lm_dir, pair, tmp_path):
    other_dir = save_tiny_lm(tmp_path / "other-lm", seed=1)
    other = save_lora(other_dir, tmp_path / "other", 1, r=4)
    with pytest.raises(ConfigError, match=r"and .*other were trained on different base models"):
        merge_deltas([pair[0], other], WEIGHTS, tmp_path / "out", how="linear")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how, kwargs, message", [
    ("linear", {}, r"linear combines the factors A and B entry by entry, which needs equal ranks; the deltas have "
                   r"r = 4 \(.*\), 2 \(.*\). Use cat"),
    ("ties", {}, r"ties prunes each delta: give the fraction of values it keeps, --density"),
    ("svd", dict(density=0.5), r"--density applies to ties, dare_linear, dare_ties, magnitude_prune"),
    ("cat", dict(svd_rank=2), r"--svd-rank and --svd-clamp apply to svd"),
    ("dare", {}, r"unknown combination 'dare'; choose one of: linear, ties, dare_linear"),
    ("ties", dict(density=1.5), r"--density must be in \(0, 1\], got 1.5"),
])
def test_refuses_bad_settings(how, kwargs, message, linear_pair, tmp_path):
    with pytest.raises(ConfigError, match=message):
        merge_deltas(linear_pair, WEIGHTS, tmp_path / "out", how=how, **kwargs)


def test_refuses_weight_count_and_used_output(pair, tmp_path):
    with pytest.raises(ConfigError, match=r"1 weight\(s\) for 2 deltas: give one weight per delta"):
        merge_deltas(pair, [1.0], tmp_path / "out", how="linear")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        merge_deltas(pair, WEIGHTS, tmp_path / "used", how="linear")


@pytest.mark.parametrize("config, message", [(IA3(), r"holds ia3: merge-deltas combines LoRA deltas only"),
                                             (LoRA(r=4, dora=True), r"is a DoRA delta")])
def test_refuses_other_methods(config, message, lm_dir, pair, tmp_path):
    model = base(lm_dir)
    deltatune.attach(model, config).save(tmp_path / "other")
    with pytest.raises(ConfigError, match=message):
        merge_deltas([pair[0], tmp_path / "other"], WEIGHTS, tmp_path / "out", how="cat")


def test_refuses_damaged_tensors(pair, tmp_path):
    import shutil

    shutil.copytree(pair[0], tmp_path / "bad")
    (tmp_path / "bad" / "delta.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="missing or corrupted"):
        merge_deltas([tmp_path / "bad", pair[1]], WEIGHTS, tmp_path / "out", how="cat")


# ---- CLI -----------------------------------------------------------------------------------------------------
def test_cli_merges_and_the_result_exports_to_peft(lm_dir, pair, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge-deltas", str(pair[0]), str(pair[1]), "--weights", "0.7,-0.4", "--how", "dare_ties",
                 "--density", "0.5", "--seed", "3", "--output", str(out)])
    assert code == 0, capsys.readouterr()
    assert "merged 2 LoRA deltas (dare_ties, rank 4)" in capsys.readouterr().out
    assert main(["export", str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0
    reference = peft.PeftModel.from_pretrained(base(lm_dir), tmp_path / "peft")
    model = base(lm_dir)
    deltatune.load(model, out)
    torch.testing.assert_close(logits(model, BATCH), logits(reference, BATCH), atol=1e-5, rtol=1e-4)


def test_cli_error(pair, tmp_path, capsys):
    assert main(["merge-deltas", str(pair[0]), str(pair[1]), "--weights", "0.7", "--how", "linear",
                 "--output", str(tmp_path / "o")]) == 1
    assert "error: 1 weight(s) for 2 deltas" in capsys.readouterr().err
    assert main(["merge-deltas", str(pair[0]), "--weights", "0.7,x", "--how", "linear",
                 "--output", str(tmp_path / "o")]) == 1
    assert "--weights: 'x' is not a number" in capsys.readouterr().err


def test_merged_run_deltas_evaluate_and_generate(run, lm_dir, tmp_path, capsys):
    """Run folders merge (their best/); cat of a delta with itself at 0.5 + 0.5 is that delta: `eval --delta` gives
    the run's own validation loss, generate the same text, and the run's chat template goes along."""
    out = tmp_path / "merged"
    merge_deltas([run, run / "best"], [0.5, 0.5], out, how="cat")
    assert (out / "chat_template.jinja").read_bytes() == (run / "best" / "chat_template.jinja").read_bytes()
    printed = []
    for extra in ([], ["--delta", str(out)]):
        assert main(["eval", str(run), "--split", "validation", *extra]) == 0
        printed.append(capsys.readouterr().out)
    loss = [next(line.split()[-2] for line in text.splitlines() if " loss " in line) for text in printed]
    assert loss[0] == loss[1] and float(loss[0]) > 0
    assert f"delta {out}" in printed[1]
    answers = []
    for delta in (run / "best", out):
        assert main(["generate", "--model", str(lm_dir), "--delta", str(delta), "--prompt", "hello world",
                     "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
