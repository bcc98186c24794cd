"""Security: no pickle anywhere (tensors only via safetensors), remote code only when asked for, YAML without
object tags, and fuzzed parsers that fail only with deltatune's own errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import save_tiny_model_dir

import deltatune
from deltatune.models import load as models
from deltatune.config import load_config, validate_config
from deltatune.data import read_table
from deltatune.errors import ConfigError, DataError
from deltatune.runs.session import open_session

PACKAGE = Path(deltatune.__file__).parent
FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Ways to run code or unpickle while loading; `torch.load` is allowed only with weights_only=True.
FORBIDDEN = {
    r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|marshal|shelve)\b": "a pickle-based module",
    r"\byaml\.(load|unsafe_load|full_load|load_all)\(": "a YAML loader that builds Python objects",
    r"allow_pickle\s*=\s*True": "numpy pickle loading",
    r"(?<![.\w])(eval|exec)\(": "eval/exec",
    r"trust_remote_code\s*=\s*True": "remote code switched on in the library",
}


def test_package_source_never_unpickles_or_runs_loaded_code():
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            offenders += [f"{file.relative_to(PACKAGE)}:{n}: {why}" for pattern, why in FORBIDDEN.items()
                          if re.search(pattern, line)]
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{file.relative_to(PACKAGE)}:{n}: torch.load without weights_only=True")
    assert offenders == []


def test_yaml_object_tags_are_rejected_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "config.yaml"
    config.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: could not determine a constructor for the tag "
                                          r"'tag:yaml.org,2002:python/object/apply:os.system'"):
        load_config(config)
    config.write_text("model: {path: minilm}\n")
    with pytest.raises(ConfigError, match=r"--set model.path: the value is not valid YAML: could not determine"):
        load_config(config, [f"model.path=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("remote-code")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(10)))
    return save_tiny_model_dir(tmp / "model"), data


@pytest.mark.parametrize("allowed", [False, True])
def test_trust_remote_code_is_only_the_callers_explicit_argument(run_dirs, monkeypatch, allowed):
    """Every transformers loader the run calls gets the caller's permission (False unless given)."""
    seen: dict[str, list[bool]] = {}
    for loader in (models.AutoConfig, models.AutoTokenizer, models.AutoModelForSequenceClassification):
        def spy(*args, original=loader.from_pretrained, name=loader.__name__, **kwargs):
            seen.setdefault(name, []).append(kwargs.get("trust_remote_code"))
            return original(*args, **kwargs)

        monkeypatch.setattr(loader, "from_pretrained", spy)
    model, data = run_dirs
    config = validate_config({"model": {"path": str(model)}, "data": {"train": str(data)},
                              "delta": [{"method": "head"}]}, trust_remote_code=allowed)
    assert config.model.trust_remote_code is allowed
    open_session(config)
    assert set(seen) == {"AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(flags == [allowed] * len(flags) for flags in seen.values()), seen


def test_a_config_file_cannot_switch_on_remote_code(run_dirs):
    model, data = run_dirs
    raw = {"model": {"path": str(model), "trust_remote_code": True}, "data": {"train": str(data)},
           "delta": [{"method": "head"}]}
    with pytest.raises(ConfigError, match=r"cfg.yaml: model.trust_remote_code is true, but a config file cannot "
                                          r"switch on code from the model folder; pass --trust-remote-code"):
        validate_config(raw, where="cfg.yaml")
    assert validate_config(raw, trust_remote_code=True).model.trust_remote_code is True


# ---- fuzzing: only our own errors ----------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=10)
RECORDS = st.lists(st.dictionaries(st.sampled_from(["text", "label", "x", ""]), JSON, max_size=3), min_size=1,
                   max_size=5)
CELLS = st.text(alphabet=st.sampled_from('ab1,"\n\r; \t\\x'), max_size=40)


def reads_or_data_error(path: Path) -> None:
    try:
        read_table(path)
    except DataError:
        pass


@FUZZ
@given(records=RECORDS, noise=st.text(max_size=20), where=st.integers(0, 200))
def test_fuzz_jsonl_and_json_readers(tmp_path, records, noise, where):
    lines = "".join(json.dumps(r) + "\n" for r in records)
    for name, text in (("a.jsonl", lines), ("b.json", json.dumps(records)), ("c.jsonl", lines[:where] + noise),
                       ("d.json", json.dumps(records)[:where] + noise)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        reads_or_data_error(tmp_path / name)


@FUZZ
@given(text=CELLS, header=st.sampled_from(["text,label\n", "", "a\n", '"x",\n']))
def test_fuzz_csv_reader(tmp_path, text, header):
    (tmp_path / "a.csv").write_text(header + text, encoding="utf-8")
    reads_or_data_error(tmp_path / "a.csv")


KEYS = st.sampled_from(["model", "data", "delta", "train", "path", "train", "format", "method", "r", "targets", "lr",
                        "optimizer", "epochs", "batch_size", "split", "labels", "dtype", "trust_remote_code",
                        "output_dir", "max_length", "truncation", "bogus"])
CONFIGS = st.recursive(JSON, lambda inner: st.dictionaries(KEYS | st.integers(0, 3), inner, max_size=4), max_leaves=12)
BASE = {"model": {"path": "minilm"}, "data": {"train": "rotten_tomatoes"}, "delta": [{"method": "lora"}]}


@FUZZ
@given(raw=st.dictionaries(KEYS, CONFIGS, max_size=5), section=st.sampled_from(["model", "data", "delta", "train"]),
       value=CONFIGS)
def test_fuzz_config_validation(raw, section, value):
    for candidate in (raw, {**BASE, **raw}, {**BASE, section: value}):
        try:
            validate_config(candidate)
        except ConfigError:
            pass


@FUZZ
@given(text=st.text(alphabet=st.sampled_from("ab:- \n[]{},!&*|>'\"#%@`?0.1"), max_size=60), raw=CONFIGS,
       overrides=st.lists(st.text(alphabet=st.sampled_from("ab.=0[]{}!:-, "), max_size=12), max_size=3))
def test_fuzz_config_files_and_overrides(tmp_path, text, raw, overrides):
    path = tmp_path / "config.yaml"
    for content in (text, yaml.safe_dump(raw), yaml.safe_dump(BASE)):
        path.write_text(content, encoding="utf-8")
        try:
            load_config(path, overrides)
        except ConfigError:
            pass
