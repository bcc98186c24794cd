"""The README's Python code runs as written, and so does the own-training-loop example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow  # loads the packaged MiniLM twice
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)  # the snippets write relative paths (my-delta/)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102  (our own README)
    assert (tmp_path / "my-delta" / "delta.safetensors").is_file()
    assert "(74498, " in capsys.readouterr().out  # delta.parameter_counts() as printed


@pytest.mark.slow  # a fresh python process: loads MiniLM twice and trains 5 steps
def test_own_loop_example_trains_saves_reloads_and_merges(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), "--steps", "5",
                           "--out", str(tmp_path / "delta")], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, check=False, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                          "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                          "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "trainable parameters: 74,498 of 22,787,714"
    assert lines[1].startswith("step    5  loss ")
    accuracy = float(lines[2].split()[2])
    assert lines[2] == f"test accuracy: {accuracy:.3f} on 200 reviews" and 0 <= accuracy <= 1
    assert lines[-1] == f"saved to {tmp_path / 'delta'}; reloaded and merged: same predictions"
    assert (tmp_path / "delta" / "delta.json").is_file()
