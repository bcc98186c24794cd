"""Hostile folders and configs, tried as an attacker would: every case is refused with one clear deltatune error,
runs no code (marker files stay absent), reads nothing outside the folder it was given, and changes no file on disk
(hash of every file before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny import save_tiny_model_dir
from tiny_lm import save_tiny_lm

import deltatune
from deltatune import safety, storage
from deltatune.models import load as models
from deltatune.cli import main
from deltatune.runs.compare import table_row
from deltatune.config import load_config, validate_config
from deltatune.delta import CONFIG_FILE, TENSOR_FILE
from deltatune.errors import CheckpointError, ConfigError
from deltatune.generation.generator import open_generator
from deltatune.interop import export
from deltatune.methods.fusion import Fusion
from deltatune.models.load import load_model, load_tokenizer
from deltatune.generation.prompts import PromptRecord, saved_template
from deltatune.runs.report import read_metrics
from deltatune.runs.run import Run
from deltatune.safety import MAX_YAML_NODES
from deltatune.train.checkpoint import CHECKSUMS, load_checkpoint
from tests.saved_adapters import save_adapter

REMOTE = r"would make transformers import or download code; deltatune refuses it unless you pass --trust-remote-code"
NO_SWITCH = r"model.trust_remote_code is true, but a config file cannot switch on code from the model folder; " \
            r"pass --trust-remote-code on the command line"


# ---- helpers -------------------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (symlinks by target, not followed)."""
    files = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                path = Path(folder) / name
                if path.is_symlink():
                    files[str(path)] = "-> " + os.readlink(path)
                elif path.is_file():
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@contextmanager
def refused(error: type[Exception], match: str, *roots: Path) -> Iterator[None]:
    """Expect `error` matching `match`, and no file under `roots` created, changed or removed."""
    before = snapshot(*roots)
    with pytest.raises(error, match=match):
        yield
    assert snapshot(*roots) == before


def cli_refuses(args: list[str], match: str, capsys: pytest.CaptureFixture, *roots: Path) -> None:
    """The command exits 1 with one `error:` line matching `match`, and changes nothing under `roots`."""
    before = snapshot(*roots)
    assert main([str(a) for a in args]) == 1
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "error:" in out and re.search(match, out), out
    assert "Traceback" not in out
    assert snapshot(*roots) == before


def evil_module(folder: Path, marker: Path) -> None:
    """Python code in the model folder that leaves `marker` behind if anything imports it."""
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                    "from transformers import PretrainedConfig as EvilConfig\n")


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**data, **changes}))


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "500")  # one error line, not wrapped


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A causal-LM run folder (config.yaml + best/ with a LoRA delta, as training leaves it), without training."""
    root = tmp_path_factory.mktemp("lm-run")
    lm = save_tiny_lm(root / "lm")
    data = root / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    config = validate_config({"model": {"path": str(lm)}, "data": {"train": str(data), "format": "messages"},
                              "delta": [{"method": "lora", "r": 2, "targets": ["q_proj"]}],
                              "output_dir": str(root / "run")})
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    model, _ = load_model(str(lm), "causal_lm")
    deltatune.attach(model, config.delta).save(run / "best")
    return run


@pytest.fixture
def hostile_run(lm_run, tmp_path) -> Path:
    """A copy of the run whose config.yaml asks for remote code (as a shared run folder could)."""
    run = Path(shutil.copytree(lm_run, tmp_path / "shared-run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


# ---- 1. a run folder is data, not code -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["eval", "{run}"],
    ["eval", "{run}", "--generate", "{prompts}"],
    ["merge", "{run}", "{out}"],
    ["export", "{run}", "{out}", "--format", "peft"],
    ["generate", "--run", "{run}", "--prompt", "hi"],
    ["chat", "--run", "{run}"],
])
def test_a_run_folder_cannot_switch_on_remote_code(hostile_run, tmp_path, capsys, command):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "reference": "hello"}) + "\n")
    args = [a.format(run=hostile_run, out=tmp_path / "out", prompts=prompts) for a in command]
    cli_refuses(args, rf"shared-run/config.yaml: {NO_SWITCH}", capsys, tmp_path)
    assert not (tmp_path / "out").exists()


def test_library_calls_on_a_run_folder_keep_remote_code_off(hostile_run, tmp_path):
    with refused(ConfigError, NO_SWITCH, tmp_path):
        Run.open(hostile_run)
    with refused(ConfigError, NO_SWITCH, tmp_path):
        open_generator(run=hostile_run)
    with refused(ConfigError, NO_SWITCH, tmp_path):
        export(hostile_run, tmp_path / "out", "peft")


def test_remote_code_needs_the_flag_of_this_command(hostile_run, monkeypatch):
    """With the permission given explicitly, transformers' loaders get trust_remote_code=True."""
    seen = []
    original = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors")))
        return original(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    generator = open_generator(run=hostile_run, trust_remote_code=True)
    assert generator.delta is not None and seen == [(True, True)]
    seen.clear()
    assert main(["generate", "--run", str(hostile_run), "--prompt", "hi", "--max-new-tokens", "2",
                 "--trust-remote-code"]) == 0
    assert seen == [(True, True)]
    seen.clear()
    config = yaml.safe_load((hostile_run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = False
    (hostile_run / "config.yaml").write_text(yaml.safe_dump(config))
    open_generator(run=hostile_run)
    assert seen == [(False, True)]


def test_a_training_config_asking_for_remote_code_needs_the_flag(lm_run, tmp_path, capsys):
    config = yaml.safe_load((lm_run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    config["output_dir"] = str(tmp_path / "new-run")
    file = tmp_path / "train.yaml"
    file.write_text(yaml.safe_dump(config))
    cli_refuses(["train", file], rf"train.yaml: {NO_SWITCH}", capsys, tmp_path)
    cli_refuses(["train", file, "--resume"], rf"train.yaml: {NO_SWITCH}", capsys, tmp_path)
    config["compare"] = {"methods": ["lora"]}
    file.write_text(yaml.safe_dump(config))
    cli_refuses(["compare", file], NO_SWITCH, capsys, tmp_path)
    assert not (tmp_path / "new-run").exists()
    with refused(ConfigError, NO_SWITCH, tmp_path):  # --set is part of the config, not a permission
        load_config(lm_run / "config.yaml", ["model.trust_remote_code=true"])
    assert load_config(lm_run / "config.yaml", trust_remote_code=True).model.trust_remote_code is True


# ---- 2. JSON files name only files inside their own folder ---------------------------------------------------------
@pytest.fixture
def checkpoint_dir(tmp_path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    required = [TENSOR_FILE, "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors",
                "rng.json", "state.json"]
    (tmp_path / "secret").write_text("not yours")
    return folder, {name: "0" * 64 for name in required}


@pytest.mark.parametrize("entry", ["../../../secret", "/etc/passwd", "link"])
def test_checksums_json_names_only_files_of_its_checkpoint(checkpoint_dir, tmp_path, entry):
    folder, sums = checkpoint_dir
    (folder / "link").symlink_to(tmp_path / "secret")
    (folder / CHECKSUMS).write_text(json.dumps({entry: "0" * 64, **sums}))
    with refused(CheckpointError, rf"checksums.json: entry '{entry}' points outside its folder .*step-00000001",
                 tmp_path):
        load_checkpoint(folder)


@pytest.fixture
def saved_fusion(bert_dir, tmp_path) -> Path:
    from tiny import tiny_model

    adapters = [str(save_adapter(tiny_model("bert"), tmp_path / f"a{i}", seed=i, std=0.3)) for i in range(2)]
    delta = deltatune.attach(tiny_model("bert"), Fusion(adapters=adapters))
    delta.save(tmp_path / "fusion")
    delta.detach()
    return tmp_path / "fusion"


def test_a_saved_fusion_holds_its_adapters_and_loads_without_them(saved_fusion, tmp_path):
    from tiny import tiny_model

    config = json.loads((saved_fusion / CONFIG_FILE).read_text())["deltas"][0]["config"]
    assert config["adapters"] == ["adapters/0", "adapters/1"]
    shutil.rmtree(tmp_path / "a0")
    shutil.rmtree(tmp_path / "a1")
    deltatune.load(tiny_model("bert"), saved_fusion).detach()


@pytest.mark.parametrize("entry", ["../a0", "{tmp}/a1", "adapters/link"])
def test_a_fusion_delta_json_names_only_adapters_inside_its_folder(saved_fusion, tmp_path, entry):
    from tiny import tiny_model

    (saved_fusion / "adapters" / "link").symlink_to(tmp_path / "a0")
    entry = entry.format(tmp=tmp_path)
    meta = json.loads((saved_fusion / CONFIG_FILE).read_text())
    meta["deltas"][0]["config"]["adapters"][0] = entry
    (saved_fusion / CONFIG_FILE).write_text(json.dumps(meta))
    with refused(CheckpointError, rf"fusion/delta.json: adapters: entry '{entry}' points outside its folder",
                 tmp_path):
        deltatune.load(tiny_model("bert"), saved_fusion)


def test_delta_files_that_are_symlinks_out_of_the_folder_are_refused(saved_fusion, tmp_path):
    from tiny import tiny_model

    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(saved_fusion / TENSOR_FILE, outside)
    (saved_fusion / TENSOR_FILE).symlink_to(outside)
    with refused(CheckpointError, r"entry 'delta.safetensors' points outside its folder", tmp_path):
        deltatune.load(tiny_model("bert"), saved_fusion)


@pytest.mark.parametrize("class_name", ["pipeline", "AutoConfig", "os"])
def test_a_delta_json_names_only_a_transformers_model_class(lm_run, tmp_path, class_name):
    """export of a delta folder builds the base model class named in delta.json: only a model class is accepted."""
    delta = Path(shutil.copytree(lm_run / "best", tmp_path / "delta"))
    meta = json.loads((delta / CONFIG_FILE).read_text())
    meta["base"]["class"] = class_name
    (delta / CONFIG_FILE).write_text(json.dumps(meta))
    with refused(CheckpointError, rf"the delta was trained on a '{class_name}', which is not a transformers model "
                                  r"class", tmp_path):
        export(delta, tmp_path / "out", "peft",
                                 model_path=yaml.safe_load((lm_run / "config.yaml").read_text())["model"]["path"])


def test_a_shard_index_names_only_files_in_the_model_folder(bert_dir, tmp_path):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    edit_json(folder / "model.safetensors.index.json", weight_map={"bert.pooler.dense.weight": "../x.safetensors"})
    with refused(CheckpointError, r"model.safetensors.index.json: weight_map: entry '../x.safetensors' points "
                                  r"outside its folder", tmp_path):
        load_model(str(folder), "classification", 2)


def test_a_chat_template_linked_from_outside_the_run_is_refused(lm_run, tmp_path):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    (tmp_path / "id_rsa").write_text("secret key")
    (run / "chat_template.jinja").symlink_to(tmp_path / "id_rsa")
    with refused(CheckpointError, r"entry 'chat_template.jinja' points outside its folder", tmp_path):
        saved_template(run)
    with refused(CheckpointError, r"entry 'chat_template.jinja' points outside its folder", tmp_path):
        open_generator(run=run)


def test_a_best_folder_linked_from_outside_the_run_is_refused(lm_run, tmp_path, capsys):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    shutil.move(run / "best", tmp_path / "elsewhere")
    (run / "best").symlink_to(tmp_path / "elsewhere")
    with refused(CheckpointError, r"run: entry 'best' points outside its folder", tmp_path):
        open_generator(run=run)
    cli_refuses(["eval", run], r"run: entry 'best' points outside its folder", capsys, tmp_path)


def test_a_model_file_linked_to_a_device_is_refused(bert_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in bert_dir.iterdir():  # a folder of symlinks, as in the Hugging Face cache: fine
        (folder / file.name).symlink_to(file)
    load_model(str(folder), "classification", 2)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to("/dev/zero")  # the tokenizer would read it forever
    with refused(ConfigError, r"model/tokenizer.json is not a regular file \(a device, pipe or socket\)", tmp_path):
        load_model(str(folder), "classification", 2)
    with refused(ConfigError, r"model/tokenizer.json is not a regular file", tmp_path):
        load_tokenizer(str(folder))


# ---- 3. model folders that would run or fetch code -----------------------------------------------------------------
@pytest.mark.parametrize("file, changes, key", [
    ("config.json", {"auto_map": {"AutoConfig": "evil.EvilConfig"}}, "auto_map"),
    ("config.json", {"attn_implementation": "kernels-community/flash-attn"}, "attn_implementation"),
    ("config.json", {"_attn_implementation_internal": "someone/kernel"}, "_attn_implementation_internal"),
    ("config.json", {"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ("config.json", {"text_config": {"attn_implementation": {"": "org/kernel"}}}, r"text_config.attn_implementation"),
    ("config.json", {"experts_implementation": "org/experts"}, "experts_implementation"),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}, "auto_map"),
    ("generation_config.json", {"auto_map": {"x": "evil.X"}}, "auto_map"),
    ("processor_config.json", {"auto_map": {"AutoProcessor": "evil.P"}}, "auto_map"),
    ("custom_generate", None, "custom_generate/"),
])
def test_model_folders_that_would_run_or_fetch_code_are_refused(bert_dir, tmp_path, file, changes, key):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    marker = tmp_path / "pwned"
    evil_module(folder, marker)
    if changes is None:
        (folder / file).mkdir()
        (folder / file / "generate.py").write_text((folder / "evil.py").read_text())
    else:
        edit_json(folder / file, **changes)
    with refused(ConfigError, rf"model/{file}: {key} = .* {REMOTE}", tmp_path):
        load_model(str(folder), "classification", 2)
    with refused(ConfigError, REMOTE, tmp_path):
        load_tokenizer(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("value", ["eager", "sdpa", None])
def test_built_in_attention_implementations_load(bert_dir, tmp_path, value):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    edit_json(folder / "config.json", attn_implementation=value)
    model, _ = load_model(str(folder), "classification", 2)
    assert model.config._attn_implementation in ("eager", "sdpa")


# ---- 4. bounded parsing --------------------------------------------------------------------------------------------
def billion_laughs(levels: int = 9) -> str:
    """10**levels values once expanded, from a few hundred bytes."""
    text = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text + "model: {path: minilm}\n"


@pytest.mark.parametrize("text, message", [
    (billion_laughs(), rf"line \d+: the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases"),
    ("a: &a [*a]\n", r"line 1: a YAML alias refers to a node that contains it"),
    ("[" * 3000 + "]" * 3000, r"the YAML is nested too deeply to be a config"),
    ("model: {path: minilm}\ntrain: {epochs: 1}\ntrain: {epochs: 5}\n",
     r"line 3: duplicate key 'train' \(first on line 2\)"),
    ("model:\n  path: minilm\n  path: /elsewhere\n", r"line 3: duplicate key 'path' \(first on line 2\)"),
    ("? [a, b]\n: 1\n", r"is not valid YAML: while constructing a mapping[\s\S]*found unhashable key"),
])
def test_hostile_yaml_is_one_config_error(tmp_path, text, message):
    file = tmp_path / "config.yaml"
    file.write_text(text)
    with refused(ConfigError, rf"config.yaml:? {message}", tmp_path):
        load_config(file)


def test_duplicate_keys_in_a_run_folder_and_in_set_values(lm_run, tmp_path, capsys):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    with open(run / "config.yaml", "a") as f:
        f.write("output_dir: somewhere-else\n")
    cli_refuses(["eval", run], r"run/config.yaml: line \d+: duplicate key 'output_dir' \(first on line \d+\)",
                capsys, tmp_path)
    cli_refuses(["generate", "--run", run, "--prompt", "x"], r"duplicate key 'output_dir'", capsys, tmp_path)
    with refused(ConfigError, r"--set train: the value: line 1: duplicate key 'epochs'", tmp_path):
        load_config(lm_run / "config.yaml", ["train={epochs: 1, epochs: 2}"])


def test_yaml_merge_keys_are_not_duplicates():
    from deltatune.safety import load_yaml

    assert load_yaml("b: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n", "f") == {"b": {"x": 1, "y": 2},
                                                                         "c": {"x": 3, "y": 2}}


@pytest.mark.parametrize("header, message", [
    (struct.pack("<Q", 1 << 40) + b"{}", r"states a header of 1,099,511,627,776 bytes in a 10-byte file"),
    (struct.pack("<Q", 200 << 20) + b"{" + b" " * 64, r"states a header of 209,715,200 bytes"),
    (b"\x01\x02", r"states no header length in a 2-byte file"),
    (struct.pack("<Q", 4) + b"nope", r"is not a valid safetensors file \(.*\); restore or re-save it"),
])
def test_hostile_safetensors_headers_are_refused_before_parsing(tmp_path, header, message):
    file = tmp_path / TENSOR_FILE
    file.write_bytes(header)
    with refused(CheckpointError, message, tmp_path):
        storage.load_tensors(file)


def test_a_delta_with_a_huge_header_and_a_matching_checksum_is_refused(lm_run, tmp_path):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    bomb = run / "best" / TENSOR_FILE
    bomb.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    edit_json(run / "best" / CONFIG_FILE, sha256=storage.sha256(bomb))
    with refused(CheckpointError, r"delta.safetensors is not a valid safetensors file: it states a header of "
                                  r"4,611,686,018,427,387,904 bytes", tmp_path):
        open_generator(run=run)


@pytest.mark.parametrize("override, message", [
    ("delta.0.r=100000000", r"delta.0.r: Input should be less than or equal to 65536 \(got 100000000\)"),
    ("train.num_threads=100000", r"train.num_threads: Input should be less than or equal to 1024"),
    ("train.seed=18446744073709551616", r"train.seed: Input should be less than or equal to 4294967295"),
    ("train.seed=-1", r"train.seed: Input should be greater than or equal to 0"),
    ("train.batch_size=3000000000", r"train.batch_size: Input should be less than or equal to 65536"),
    ("train.grad_accum=3000000000", r"train.grad_accum: Input should be less than or equal to 65536"),
    ("data.max_length=2000000000", r"data.max_length: Input should be less than or equal to 1048576"),
    ("train.optimizer.lr=.inf", r"train.optimizer.lr: Input should be a finite number"),
    ("train.optimizer.lr=.nan", r"train.optimizer.lr: Input should be a finite number"),
    ("train.optimizer.lr=1.0e+300", r"train.optimizer.lr: Input should be less than or equal to 10"),
    ("train.epochs=10000000000", r"train.epochs: Input should be less than or equal to 1000000000"),
    ("delta=[{method: prompt, n_tokens: 2000000000}]", r"delta.0.n_tokens: Input should be less than or equal to"),
    ("delta=[{method: prefix, hidden_size: 2000000000}]", r"delta.0.hidden_size: Input should be less than or equal"),
    ("delta=[{method: adapter, bottleneck_size: 2000000000}]", r"delta.0.bottleneck_size: Input should be less"),
    ("delta=[{method: head, num_labels: 2000000000}]", r"delta.0.num_labels: Input should be less than or equal"),
    ("delta=[{method: side, num_layers: 100000}]", r"delta.0.num_layers: Input should be less than or equal to 1024"),
    ("delta=[{method: prompt, init: text, init_token_ids: [100000000000]}]",
     r"delta.0.init_token_ids.0: Input should be less than or equal to 1000000000"),
    ("delta=[{method: ptuning, template: '" + "[P]" * 30000 + " {text}'}]",
     r"delta.0.template: String should have at most 65536 characters"),
    ("train.optimizer={name: galore_adamw, galore: {rank: 100000000}}",
     r"train.optimizer.galore.rank: Input should be less than or equal to 65536"),
])
def test_absurd_sizes_are_config_errors_before_any_allocation(lm_run, tmp_path, override, message):
    with refused(ConfigError, message, tmp_path):
        load_config(lm_run / "config.yaml", [override])


def test_absurd_sampling_and_evaluation_sizes_are_config_errors():
    from deltatune.generation.config import GenerationEval
    from deltatune.generation.sampling import Sampling

    with pytest.raises(ConfigError, match=r"max_new_tokens: Input should be less than or equal to 1048576"):
        Sampling(max_new_tokens=10**12)
    with pytest.raises(ConfigError, match=r"seed: Input should be less than or equal to 4294967295"):
        Sampling(seed=2**64)
    with pytest.raises(ConfigError, match=r"batch_size: Input should be less than or equal to 65536"):
        GenerationEval(file="x.jsonl", batch_size=10**10)


@pytest.mark.parametrize("config", [
    {"method": "lora", "targets": ["re:([a-z._0-9]+)+x"]},  # Python's re: ~10 s for 24 characters, doubling per one
    {"method": "full", "freeze": ["re:(.*)*x"]},
])
def test_a_saved_delta_with_a_backtracking_pattern_does_not_hang(lm_run, tmp_path, config):
    """delta.json is untrusted: its target patterns run on every module name, with a linear-time engine."""
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    meta = json.loads((run / "best" / CONFIG_FILE).read_text())
    meta["deltas"][0]["config"] = {**meta["deltas"][0]["config"], **config} if config["method"] == "lora" else config
    (run / "best" / CONFIG_FILE).write_text(json.dumps(meta))
    model, _ = load_model(yaml.safe_load((run / "config.yaml").read_text())["model"]["path"], "causal_lm")
    with refused(deltatune.TargetError, r"matches? (no|nothing)", tmp_path):
        deltatune.load(model, run / "best")


def test_an_invalid_pattern_is_a_config_error():
    from deltatune.safety import fullmatch

    with pytest.raises(ConfigError, match=r"pattern '\(' is not a valid regular expression: missing \)"):
        fullmatch("(", "x")


@pytest.mark.parametrize("changes", [{"vocab_size": 10**10}, {"num_hidden_layers": 10**6},
                                     {"hidden_size": 2**20, "intermediate_size": 2**20}])
def test_a_model_config_far_larger_than_its_weights_is_refused_before_allocation(bert_dir, tmp_path, changes):
    """transformers would allocate what config.json says (here 100s of GB) before reading any weight."""
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    edit_json(folder / "config.json", **changes)
    with refused(ConfigError, r"model/config.json describes a model of at least [\d,]+ parameters, but its weight "
                              r"files hold only [\d,]+ bytes; loading would allocate memory for weights that do not "
                              r"exist",
                 tmp_path):
        load_model(str(folder), "classification", 2)


# ---- 5. pickle-only weights ----------------------------------------------------------------------------------------
class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_only_weights_are_refused_and_never_unpickled(bert_dir, tmp_path, name):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    marker = tmp_path / "pwned"
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(pickle.dumps(Exploit(marker)))
    with refused(ConfigError, rf"model: the weights are pickle files only \({name}\); deltatune loads safetensors "
                              r"only, because unpickling runs code. Convert them once where you trust the file: "
                              r"AutoModel.from_pretrained\(folder\).save_pretrained\(folder, safe_serialization=True\)",
                 tmp_path):
        load_model(str(folder), "classification", 2)
    assert not marker.exists()


def test_a_pickle_next_to_safetensors_is_never_loaded(bert_dir, tmp_path):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    load_model(str(folder), "classification", 2)
    (folder / "model.safetensors").rename(folder / "other.safetensors")  # transformers would look for the .bin
    with pytest.raises(deltatune.DeltaTuneError, match=r"cannot load model from"):
        load_model(str(folder), "classification", 2)
    assert not marker.exists()


# ---- 6. other files of run / model folders -------------------------------------------------------------------------
@pytest.mark.parametrize("template, message", [
    ("{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
     r"SecurityError: access to attribute '__init__' of 'type' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ 'MARKER' }}",
     r"SecurityError: access to attribute '__class__' of 'str' object is unsafe"),
    ("{% for i in range(10000000) %}MARKER{% endfor %}",
     r"OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE \(100000\)"),
    ("{{ 1 // 0 }}MARKER", r"ZeroDivisionError: integer division or modulo by zero"),
])
def test_a_run_chat_template_renders_sandboxed(lm_run, tmp_path, template, message):
    from deltatune.generation.sampling import Sampling

    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    marker = tmp_path / "pwned"
    (run / "chat_template.jinja").write_text(template.replace("MARKER", str(marker)))
    generator = open_generator(run=run)
    with refused(ConfigError, rf"the chat template failed on the conversation: {message}", tmp_path):
        generator.complete([PromptRecord("p", text="hi")], Sampling(max_new_tokens=1), chat=True)
    assert not marker.exists()


@pytest.mark.parametrize("settings", [
    {"num_return_sequences": 3, "num_beams": 3},  # was: 3 answers per prompt, zipped with the wrong prompts
    {"dola_layers": "low"},  # was: a decoding mode that fetches code from the hub (ValueError traceback)
    {"no_repeat_ngram_size": 1, "min_new_tokens": 5, "bad_words_ids": [[5]]},
])
def test_a_model_generation_config_cannot_change_generation(lm_run, tmp_path, settings):
    from deltatune.generation.sampling import Sampling, generate

    lm = Path(yaml.safe_load((lm_run / "config.yaml").read_text())["model"]["path"])
    model, tokenizer = load_model(str(lm), "causal_lm")
    expected = generate(model, tokenizer, ["hello world", "the quick"], Sampling(max_new_tokens=5))
    folder = Path(shutil.copytree(lm, tmp_path / "lm"))
    edit_json(folder / "generation_config.json", **settings)
    model, tokenizer = load_model(str(folder), "causal_lm")
    before = snapshot(tmp_path)
    assert generate(model, tokenizer, ["hello world", "the quick"], Sampling(max_new_tokens=5)) == expected
    key, value = next(iter(settings.items()))
    assert getattr(model.generation_config, key) == value  # the model keeps its config (export saves it as it was)
    assert snapshot(tmp_path) == before


def test_a_huge_chat_template_is_refused(lm_run, tmp_path):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    (run / "chat_template.jinja").write_text("x" * (2 << 20))
    with refused(CheckpointError, r"chat_template.jinja is 2,097,152 bytes, too large for a chat template", tmp_path):
        saved_template(run)


@pytest.mark.parametrize("results, message", [
    ("[1, 2]", r"results.json: not the results of a finished run \(a JSON list, not an object\)"),
    ('{"metric": "accuracy"}', r"results.json: not the results of finished runs \(KeyError: 'trainable_params'\)"),
    ('{"metric": "accuracy", "trainable_params": 1, "total_params": 0}', r"ZeroDivisionError"),
])
def test_compare_reads_a_hostile_results_json_as_one_error(lm_run, tmp_path, results, message):
    run = Path(shutil.copytree(lm_run, tmp_path / "run"))
    (run / "results.json").write_text(results)
    config = load_config(run / "config.yaml").model_copy(update={"output_dir": str(run)})
    with refused(CheckpointError, message, tmp_path):
        table_row("lora", [config])


@pytest.mark.parametrize("lines, message", [
    ('{"step": 1}\nnot json\n', r"metrics.jsonl:2: not a JSON row"),
    ('{"step": 1}\n[1, 2]\n', r"metrics.jsonl:2: expected a JSON object, got list"),
])
def test_a_damaged_metrics_log_is_one_error(tmp_path, lines, message):
    (tmp_path / "metrics.jsonl").write_text(lines)
    with refused(CheckpointError, message, tmp_path):
        read_metrics(tmp_path / "metrics.jsonl")


def test_report_curves_skip_rows_of_the_wrong_types(tmp_path):
    from deltatune.runs.report import _curves_png

    rows = [{"kind": "train", "step": "x", "loss": 1.0}, {"kind": "train", "step": 1, "loss": "nan?"},
            {"kind": "train", "step": 2, "loss": 0.5}, {"kind": "eval", "split": "validation", "step": 2,
                                                        "loss": 0.4, "accuracy": [1]}]
    assert _curves_png({"": rows}, "accuracy").startswith(b"\x89PNG")


def test_oversized_json_in_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "MAX_JSON_BYTES", 100)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"x": "y" * 200}))
    with refused(CheckpointError, r"delta.json is 2\d\d bytes, too large for a JSON file deltatune reads \(at most 100",
                 tmp_path):
        storage.read_json(tmp_path / CONFIG_FILE)


def test_tensor_files_are_still_written_and_read(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "t.safetensors"))
    assert torch.equal(storage.load_tensors(tmp_path / "t.safetensors")["a"], torch.ones(2))
