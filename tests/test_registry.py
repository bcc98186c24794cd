"""The registry is the only list of methods: the core imports none, and a method defined outside deltatune (here, in
this file) works everywhere that lists methods once it is registered, with no other file edited."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from pydantic import Field
from torch import nn

import deltatune
from deltatune import registry
from deltatune.runs.compare import method_config
from deltatune.config.doc import default_config_yaml
from deltatune.delta import Delta, DeltaConfig
from deltatune.errors import ConfigError
from deltatune.interop.peft import export_peft
from deltatune.methods.per_task import PerTask
from deltatune.registry import methods, register
from deltatune.schema import NonEmptyPatterns
from deltatune.targeting import MergeableWrapper, find_modules
from deltatune.train.distributed import _check_fsdp
from tests.tiny import logits, tiny_batch, tiny_model

PACKAGE = Path(deltatune.__file__).parent
CORE = ["errors", "schema", "storage", "safety", "delta", "registry", "targeting", "arch", "fingerprint", "routing"]


def imported_modules(file: Path) -> set[str]:
    """Every module an import statement of `file` names, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_method_and_no_interop_module(module):
    file = PACKAGE / f"{module}.py"
    if not file.exists():
        pytest.fail(f"core module {module} moved: update CORE")
    bad = sorted(m for m in imported_modules(file) if m.startswith(("deltatune.methods", "deltatune.interop")))
    assert bad == []


@pytest.mark.slow  # a fresh interpreter imports torch (~4 s of CPU)
def test_importing_the_core_imports_no_method_module():
    code = ("import sys, deltatune.delta, deltatune.registry; "
            "print(sorted(m for m in sys.modules if m.startswith(('deltatune.methods', 'deltatune.interop'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]"


def test_method_modules_are_one_per_name_and_shared_plumbing_registers_nothing():
    modules = {p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem != "__init__"}
    shared = {m for m in modules if m.startswith("_")}
    assert shared  # virtual tokens / prefix cache plumbing
    assert modules - shared == set(methods())
    for name, method in methods().items():
        assert method.delta_class.__module__ == f"deltatune.methods.{name}"


# ---- a method defined here -------------------------------------------------------------------------------------
class OutputScale(DeltaConfig):
    """Output-scale settings: which linear layers get a learned per-output scale."""

    targets: NonEmptyPatterns = Field(default_factory=lambda: ["all-linear"], description="module patterns")
    init: float = Field(1.0, description="initial scale")


class ScaledLinear(MergeableWrapper):
    def __init__(self, base: nn.Linear, init: float):
        super().__init__()
        self.base_layer = base
        self.scale = nn.Parameter(torch.full((base.out_features,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        merged = {"weight": self.base_layer.weight * self.scale[:, None]}
        if self.base_layer.bias is not None:
            merged["bias"] = self.base_layer.bias * self.scale
        return merged


class OutputScaleDelta(Delta[OutputScale]):
    """Output scaling: a learned scale per output feature of chosen linear layers (test-only); mergeable."""

    mergeable = True

    def build(self) -> list[nn.Parameter]:
        self.wrappers = []
        for name, module in find_modules(self.model, self.config.targets, (nn.Linear,)).items():
            self.wrappers.append(ScaledLinear(module, self.config.init))
            self.swap(name, self.wrappers[-1])
        return [w.scale for w in self.wrappers]

    def merge_weights(self) -> None:
        self.fold_wrappers(self.wrappers)

    def unmerge_weights(self) -> None:
        self.unfold_wrappers(self.wrappers)


@pytest.fixture
def scale_method():
    """Register the method for one test (the registry is restored afterwards, so other tests never see it)."""
    methods()  # the built-in methods first
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_METHODS", dict(registry._METHODS))
        register("output_scale")(OutputScaleDelta)
        yield "output_scale"


def test_a_new_method_needs_no_other_file(scale_method, tmp_path):
    assert OutputScaleDelta.config_class is OutputScale  # from Delta[OutputScale]
    assert scale_method in methods()
    assert registry.parse_delta_config({"method": scale_method, "targets": "query"}).targets == ["query"]
    model, batch = tiny_model("bert"), tiny_batch()
    before = logits(model, batch)
    delta = deltatune.attach(model, OutputScale(targets=["query", "value"], init=1.0))
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.uniform_(0.5, 1.5)
    trained = logits(model, batch)
    delta.merge()
    torch.testing.assert_close(logits(model, batch), trained, rtol=1e-5, atol=1e-6)
    delta.unmerge()
    delta.save(tmp_path / "d")
    delta.detach()
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    fresh = tiny_model("bert")
    loaded = deltatune.load(fresh, tmp_path / "d")
    assert type(loaded) is OutputScaleDelta
    torch.testing.assert_close(logits(fresh, batch), trained, rtol=0, atol=0)


def test_a_new_method_appears_in_every_list_of_methods(scale_method, tmp_path):
    assert scale_method in registry.methods()
    assert default_config_yaml(scale_method).startswith("# ")  # `deltatune config show output_scale`
    assert PerTask(tasks=["a", "b"], delta={"method": scale_method}).delta.method == scale_method
    raw = {"model": {"path": "minilm"}, "data": {"train": str(tmp_path / "train.jsonl"), "format": "classification"},
           "output_dir": str(tmp_path)}
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    run = method_config(raw, scale_method, None, where="compare.yaml")
    assert [d.method for d in run.delta] == ["head", scale_method]  # not a head: a classification head goes first
    model = tiny_model("bert")
    delta = deltatune.attach(model, OutputScale(targets=["query"]))
    with pytest.raises(ConfigError, match=f"PEFT has no format for {scale_method}. PEFT formats exist for ia3, lora"):
        export_peft(delta, tmp_path / "peft")
    with pytest.raises(ConfigError, match=f"fsdp shards full fine-tuning \\(full, head\\); {scale_method} trains"):
        _check_fsdp(delta, "adamw")


# ---- what a built-in method comes with -----------------------------------------------------------------------------
ATTACHED_BY_RUNS = {"task_heads"}  # a run with `tasks:` attaches it itself (a config may not name it)


def example_methods() -> dict[str, list[Path]]:
    """Method name -> the example configs whose delta sections name it."""
    found: dict[str, list[Path]] = {}

    def walk(node, file):
        if isinstance(node, dict):
            if isinstance(node.get("method"), str):
                found.setdefault(node["method"], []).append(file)
            for value in node.values():
                walk(value, file)
        elif isinstance(node, list):
            for value in node:
                walk(value, file)

    for file in sorted((PACKAGE.parent / "examples").glob("*.yaml")):
        walk(yaml.safe_load(file.read_text()).get("delta"), file)
    return found


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_has_an_example_config_and_a_readme_row(name):
    readme = (PACKAGE.parent / "README.md").read_text()
    assert f"\n| `{name}` |" in readme, f"README.md's methods table has no row for {name}"
    if name not in ATTACHED_BY_RUNS:
        assert example_methods().get(name), f"no examples/*.yaml names method {name}"
