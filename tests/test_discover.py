"""Discoverability on the command line: `config show` / `config schema`, `models`, `data`, `--version`, defaults
in `--help`, and a `--help` that imports neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from deltatune import __version__
from deltatune.models.assets import DATA_CARDS, MODEL_CARDS, PACKAGED_DATASETS, PACKAGED_MODELS
from deltatune.cli import main
from deltatune.config import RunConfig, validate_config
from deltatune.registry import methods
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "pandas", "numpy")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def run_cli(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("method", list(methods()))
def test_config_show_is_a_complete_commented_config_that_loads_back(capsys, method):
    text = run_cli(capsys, "config", "show", method)
    raw = yaml.safe_load(text)
    assert raw["delta"][0]["method"] == method
    if method == "fusion":  # its example adapter folders do not exist here: the one error says so
        with pytest.raises(Exception, match="adapter folders .* not found"):
            validate_config(raw)
    else:
        config = validate_config(raw)
        assert config.train == RunConfig.model_fields["train"].default  # every train key at its default
    # every key of the method's config is there with a comment
    lines = text.splitlines()
    lines = lines[lines.index(next(ln for ln in lines if ln.startswith(f"  - method: {method}"))):]
    for key, field in methods()[method].config_class.model_fields.items():
        line = next(line for line in lines if line.strip().startswith(f"{key}:"))
        assert "#" in line and field.description.split(";")[0][:30] in line


def test_config_show_comments_give_descriptions_allowed_values_and_bounds(capsys):
    lines = run_cli(capsys, "config", "show").splitlines()  # default method: lora
    line = {ln.split(":")[0].strip(): ln for ln in lines if not ln.lstrip().startswith("#")}
    assert line["patience"].split("#", 1)[1].strip() == ("early stopping: stop after N validations without "
                                                         "improvement of `metric`; null: never stop early; >= 1, <= 1000000000")
    assert "allowed: standard | rslora" in line["scaling"] and line["scaling"].startswith("    scaling: standard")
    assert "required" in line["path"] and line["path"].startswith("  path: minilm")
    assert any(ln.startswith("# eval_generation:") for ln in lines)  # optional sections: commented out
    assert any(ln.lstrip().startswith("#   rank: 128") for ln in lines)  # train.optimizer.galore, commented out


def test_config_show_unknown_method_is_one_error(capsys):
    assert main(["config", "show", "lorra"]) == 1
    assert "unknown method 'lorra'. Did you mean 'lora'?" in capsys.readouterr().err


def test_config_schema_validates_every_example_and_catches_mistakes(capsys):
    schema = json.loads(run_cli(capsys, "config", "schema"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    bad = json.loads(json.dumps(demo))
    bad["train"]["epochs"] = 0
    bad["delta"][0]["rank"] = 8
    bad["train"]["optimizer"]["name"] = "adam"
    errors = sorted(e.message for e in validator.iter_errors(bad))
    assert len(errors) == 3 and "0 is less than the minimum of 1" in errors
    assert any("'adam' is not one of ['adamw', 'sgd', 'galore_adamw', 'galore_adamw8bit']" in e for e in errors)
    del demo["data"]
    assert list(validator.iter_errors(demo))  # data or tasks is required


def test_models_and_data_list_the_packaged_aliases(capsys):
    assert MODEL_CARDS.keys() == PACKAGED_MODELS.keys() and DATA_CARDS.keys() == PACKAGED_DATASETS.keys()
    out = run_cli(capsys, "models")
    assert "22.7M parameters" in out and "135M parameters" in out
    assert all(alias in out for alias in PACKAGED_MODELS)
    out = run_cli(capsys, "data")
    assert all(alias in out for alias in PACKAGED_DATASETS) and "4,866 reviews" in out


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"deltatune {__version__}\n"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--split {train,validation,test} the split to evaluate (default: test)" in text
    assert "run run folder written by `deltatune train`" in text
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "RUN_OR_DELTA run folder, or a saved delta folder" in " ".join(capsys.readouterr().out.split())


def test_help_imports_no_heavy_library():
    code = ("import sys, runpy\nsys.argv = ['deltatune', '--help']\n"
            "try:\n    runpy.run_module('deltatune', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "config" in done.stdout  # the help was printed
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_train_prints_the_galore_settings(tmp_path, tiny_bert_dir, reviews, capsys):  # noqa: F811
    config = write_config(tmp_path, tiny_bert_dir, reviews, delta=[{"method": "head"}, {"method": "full"}],
                          train={"max_steps": 1, "batch_size": 8, "eval_baseline": False,
                                 "optimizer": {"name": "galore_adamw8bit", "lr": 1e-3,
                                               "galore": {"rank": 4, "update_proj_gap": 50}}})
    assert main(["train", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("optimizer galore_adamw8bit: GaLore rank 4, projection updated every 50 steps, scale 0.25, proj_type std, "
            "8-bit moments yes, per-layer updates no, targets all-linear") in out


def test_the_public_train_function_survives_importing_the_train_subpackage():
    """With the lazy public API, loading the subpackage deltatune.train must not replace deltatune.train()."""
    code = ("import deltatune.train.loop, deltatune, inspect; "
            "print(inspect.isfunction(deltatune.train), deltatune.train is deltatune.train.__globals__['train'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
