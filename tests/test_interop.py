"""Interoperability: PEFT adapters both ways (checked with real `peft`), merged standalone models without deltatune."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

import deltatune
from deltatune.cli import main
from deltatune.config import load_config
from deltatune.errors import CheckpointError, ConfigError
from deltatune.interop.peft import CONFIG_FILE, WEIGHTS_FILE, export_peft
from deltatune.storage import load_tensors
from deltatune.methods.adapter import Adapter
from deltatune.methods.head import Head
from deltatune.methods.ia3 import IA3
from deltatune.methods.lora import LoRA
from deltatune.methods.prefix import Prefix
from deltatune.methods.prompt import Prompt
from deltatune.methods.ptuning import PTuning
from deltatune.methods.ptuning_v2 import PTuningV2
from deltatune.runs.run import Run
from deltatune.runs.session import open_session, run_session
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)
from tests.tiny import biased_tiny_model, logits, tiny_batch

peft = pytest.importorskip("peft")


def perturb(delta, seed: int = 3) -> None:
    """Move every delta tensor away from its init (B = 0, ones, ...), so the delta really changes outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.3 * torch.randn_like(p))


def peft_logits(model, batch, n_virtual: int = 0) -> torch.Tensor:
    """PEFT's logits; its causal-LM prompt learning also returns the virtual positions first: drop them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = logits(model, batch)
    return out[:, n_virtual:] if out.dim() == 3 else out


# arch, head, deltatune configs, virtual positions PEFT returns in front of LM logits
CASES = {
    "lora-bert-cls": ("bert", "classification", [LoRA(r=4, targets=["query", "value"]), Head()], 0),
    "lora-gpt2-conv1d-dora-rslora": ("gpt2", "classification",
                                     [LoRA(r=4, targets=["c_attn"], dora=True, scaling="rslora"), Head()], 0),
    "lora-llama-embedding-dora-lm": ("llama", "lm", [LoRA(r=4, alpha=8, targets=["embed_tokens", "o_proj"],
                                                          dora=True)], 0),
    "ia3-bert-cls": ("bert", "classification", [IA3(), Head()], 0),
    "ia3-gpt2-lm": ("gpt2", "lm", [IA3()], 0),
    "prompt-bert-cls": ("bert", "classification", [Prompt(n_tokens=3, position="start"), Head()], 0),
    "prompt-gpt2-lm": ("gpt2", "lm", [Prompt(n_tokens=3)], 3),
    "ptuning-lstm-bert-cls": ("bert", "classification",
                              [PTuning(template="[P][P] {text}", encoder="lstm", hidden_size=8, position="start"),
                               Head()], 0),
    "ptuning-mlp-llama-lm": ("llama", "lm", [PTuning(template="[P][P][P] {text}", encoder="mlp", hidden_size=8)], 3),
    "prefix-mlp-bert-cls": ("bert", "classification", [Prefix(n_tokens=3, hidden_size=8), Head()], 0),
    "prefix-llama-gqa-lm": ("llama", "lm", [Prefix(n_tokens=3, hidden_size=8)], 0),
    "ptuning_v2-gpt2-cls": ("gpt2", "classification", [PTuningV2(n_tokens=4), Head()], 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_gives_the_same_logits_and_loads_back(case, tmp_path):
    arch, head, configs, n_virtual = CASES[case]
    base, batch = biased_tiny_model(arch, head), tiny_batch()
    ours = copy.deepcopy(base)
    delta = deltatune.attach(ours, configs)
    perturb(delta)
    delta.for_inference()
    expected = logits(ours, batch)
    assert not torch.allclose(expected, logits(base, batch), atol=1e-3)  # the delta is visible

    export_peft(delta, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    theirs = peft_logits(reference, batch, n_virtual)
    real = batch["attention_mask"].bool() if expected.dim() == 3 else slice(None)  # LM: pads differ, as they may
    torch.testing.assert_close(theirs[real], expected[real], atol=1e-5, rtol=1e-4)

    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["task_type"] == ("SEQ_CLS" if head == "classification" else "CAUSAL_LM")
    assert config["modules_to_save"] == (["score" if arch != "bert" else "classifier"] if len(configs) > 1 else None)

    fresh = copy.deepcopy(base)
    loaded = deltatune.load(fresh, tmp_path / "adapter")  # a PEFT folder loads directly
    assert [p.method for p in loaded.parts()][-1] == ("head" if len(configs) > 1 else loaded.parts()[0].method)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=1e-4)


def test_peft_trained_adapter_loads_into_deltatune(tmp_path):
    """The other direction, from an adapter PEFT itself wrote: LoRA with rsLoRA on GPT-2 plus its classifier."""
    base, batch = biased_tiny_model("gpt2", "classification"), tiny_batch()
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], use_rslora=True, init_lora_weights=False,
        task_type="SEQ_CLS", fan_in_fan_out=True))
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    model.eval().save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    delta = deltatune.load(fresh, tmp_path)
    assert [p.method for p in delta.parts()] == ["lora", "head"]
    lora = delta.parts()[0].config
    assert lora.scaling == "rslora" and sorted(lora.targets) == ["c_attn", "mlp.c_proj"]
    torch.testing.assert_close(logits(fresh, batch), peft_logits(model, batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("configs, message", [
    ([Adapter(), Head()], ("PEFT has no format for adapter. PEFT formats exist for ia3, lora, prefix, prompt, "
                           "ptuning, ptuning_v2")),
    ([Head()], "a PEFT adapter holds exactly one method, this delta has only a task head"),
    ([LoRA(targets=["query"]), IA3()], "a PEFT adapter holds exactly one method, this delta has lora + ia3"),
    ([Prompt(n_tokens=2)], ("this delta has virtual tokens after the first token (position 'auto' keeps an "
                            "encoder's [CLS] first): it has no PEFT form")),
    ([PTuning(template="[P] {text} [P]", position="start")], "this delta has pieces after the text: it has no PEFT"),
    ([PTuning(template="[P] Review: {text}", position="start", literal_token_ids=[[5, 6]])],
     "this delta has fixed words or {mask} in the template: it has no PEFT form"),
])
def test_methods_without_a_peft_form_are_one_clear_error(configs, message, tmp_path):
    delta = deltatune.attach(biased_tiny_model("bert", "classification"), configs)
    with pytest.raises(ConfigError) as err:
        export_peft(delta, tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_peft_adapters_are_clear_errors(tmp_path):
    model = biased_tiny_model("bert", "classification")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LOHA", "r": 4}))
    with pytest.raises(CheckpointError, match="PEFT type 'LOHA' has no deltatune equivalent; supported PEFT types: "
                                              "LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING"):
        deltatune.load(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query"],
                                                    "rank_pattern": {"query": 8}}))
    with pytest.raises(ConfigError, match=r"options deltatune cannot represent: rank_pattern=\{'query': 8\}"):
        deltatune.load(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query"]}))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors not found"):
        deltatune.load(model, tmp_path)
    assert not any(n for n, _ in model.named_modules() if "lora" in n)  # nothing left attached


# ---- from a run folder, on the command line ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert_dir, reviews):  # noqa: F811
    """A run folder (config + best/ delta, LoRA + head) on the tiny BERT saved with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("run")
    config = load_config(write_config(folder, tiny_bert_dir, reviews), [f"output_dir={folder / 'run'}"])
    session = open_session(config)
    perturb(session.delta)
    session.delta.save(folder / "run" / "best")
    (folder / "run" / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return folder / "run"


SENTENCES = ["the plot was good", "a long and rather bad film"]

STANDALONE = """
import json, sys
sys.modules["deltatune"] = None  # importing deltatune now fails: the model must load without it
try:
    import deltatune
    raise SystemExit("deltatune is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
batch = AutoTokenizer.from_pretrained(sys.argv[1])(json.loads(sys.argv[2]), return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""


@pytest.mark.slow  # a fresh python process imports torch and transformers: ~5-15 s on a busy machine
def test_merged_export_loads_without_deltatune(run_dir, tmp_path, capsys):
    assert main(["export", "--format", "hf", "--merge", str(run_dir), str(tmp_path / "merged")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    session = run_session(Run.open(run_dir))
    batch = session.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    expected = logits(session.model.eval(), batch)
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(tmp_path / "merged"), json.dumps(SENTENCES)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout)), expected, atol=1e-5, rtol=1e-4)
    assert main(["export", "--format", "hf", str(run_dir), str(tmp_path / "merged")]) == 1  # never overwrites
    assert "already exists and is not empty" in " ".join(capsys.readouterr().err.split())


def test_peft_export_of_a_run_and_of_its_delta_folder(run_dir, tiny_bert_dir, tmp_path, capsys):  # noqa: F811
    assert main(["export", "--format", "peft", str(run_dir), str(tmp_path / "from-run")]) == 0
    assert main(["export", "--format", "peft", str(run_dir / "best"), str(tmp_path / "from-delta"),
                 "--model", str(tiny_bert_dir)]) == 0
    assert "PEFT adapter" in capsys.readouterr().out
    a, b = (load_tensors(tmp_path / name / WEIGHTS_FILE) for name in ("from-run", "from-delta"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.classifier.weight" in a
    session = run_session(Run.open(run_dir))
    batch = session.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "from-run").eval()
    torch.testing.assert_close(peft_logits(reference, batch), logits(session.model.eval(), batch), atol=1e-5,
                               rtol=1e-4)


def test_export_errors_on_the_command_line(run_dir, tmp_path, tiny_bert_dir, reviews, capsys):  # noqa: F811
    assert main(["export", "--format", "peft", "--merge", str(run_dir), str(tmp_path / "x")]) == 1
    assert "--merge goes with --format hf" in capsys.readouterr().err
    prompt_run = tmp_path / "prompt"
    config = load_config(write_config(tmp_path, tiny_bert_dir, reviews,
                                      delta=[{"method": "prompt", "n_tokens": 2}, {"method": "head"}]),
                         [f"output_dir={prompt_run}"])
    open_session(config).delta.save(prompt_run / "best")
    (prompt_run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert main(["export", "--format", "hf", str(prompt_run), str(tmp_path / "merged")]) == 1
    out = capsys.readouterr().err
    assert "prompt cannot be merged into the base weights, so there is no standalone model to export; " \
           "mergeable methods: bitfit, full, head, ia3, lora, mask" in " ".join(out.split())
    assert not (tmp_path / "merged").exists()
