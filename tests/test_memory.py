"""The training process's heap policy (train/memory.py): glibc settings kept by the user, trims when the RSS grew,
and the same policy for `deltatune.train(...)` from Python and the `deltatune train` command."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest

import deltatune
from deltatune.cli import main
from deltatune.train import TrainConfig, memory
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)
from tests.test_loop import COLLATE, setup, task_data

M_MMAP_MAX, M_TRIM_THRESHOLD = -4, -1

ALLOC_PROBE = textwrap.dedent("""
    import ctypes, json, os
    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_blocks_for_64_mib():
        before = libc.mallinfo2().hblks
        block = torch.ones(16 * 1024 * 1024)
        return libc.mallinfo2().hblks - before

    plain = mmapped_blocks_for_64_mib()
    from deltatune.train.memory import HeapPolicy
    with HeapPolicy() as heap:
        tuned = mmapped_blocks_for_64_mib()
    print(json.dumps({"plain": plain, "tuned": tuned, "applied": heap.applied,
                      "env": {k: os.environ.get(k) for k in [*heap.applied, "ONEDNN_PRIMITIVE_CACHE_CAPACITY"]}}))
""")


class FakeLibc:
    """glibc's mallopt / malloc_trim, recorded."""

    def __init__(self, calls: list[tuple]):
        self.calls = calls

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> None:
        self.calls.append(("malloc_trim", pad))


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """What the heap policy asks of glibc, with a fake libc and an RSS that grows by 300 MB a reading."""
    calls: list[tuple] = []
    for name in memory.HEAP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory, "load_libc", lambda: FakeLibc(calls))
    readings = iter(range(1000, 10**6, 300))
    monkeypatch.setattr(memory, "rss_mb", lambda: next(readings))
    return calls


@pytest.mark.slow  # a subprocess importing torch: ~6 s on a loaded machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallinfo2")
def test_the_policy_keeps_big_blocks_out_of_mmap():
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.splitlines()[-1])
    assert (probe["plain"], probe["tuned"]) == (1, 0)  # glibc's default mmaps a 64 MiB block; tuned it does not
    assert probe["applied"] == memory.HEAP_SETTINGS
    # set in this process only (child processes that train apply it themselves); oneDNN's bound on import
    assert probe["env"] == {"MALLOC_MMAP_MAX_": None, "MALLOC_TRIM_THRESHOLD_": None,
                            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}


def test_the_users_own_settings_are_kept(monkeypatch, libc):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # glibc applied it at start-up
    with memory.HeapPolicy() as heap:
        assert heap.applied == {"MALLOC_MMAP_MAX_": 0}
    assert libc == [("mallopt", M_MMAP_MAX, 0), ("malloc_trim", 0)]  # M_MMAP_MAX only; the end gives memory back


def test_glibc_defaults_in_the_environment_opt_out(monkeypatch, libc):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with memory.HeapPolicy() as heap:
        assert [heap.after_step() for _ in range(5)] == [False] * 5
    assert libc == []


def test_the_heap_is_trimmed_only_when_the_rss_grew_by_the_slack(monkeypatch, libc):
    readings = iter([1000, 1200, 1000 + memory.HEAP_SLACK_MB + 1, 1100, 1300])
    monkeypatch.setattr(memory, "rss_mb", lambda: next(readings))
    with memory.HeapPolicy() as heap:
        assert [heap.after_step() for _ in range(3)] == [False, False, True]  # floor 1000; 1200; 1513
        assert heap.after_step() is False and heap.floor_mb == 1100  # the step after a trim: the new floor
        assert heap.after_step() is False  # 1300: within the slack of 1100
    assert libc == [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, 1 << 30), ("malloc_trim", 0),
                    ("malloc_trim", 0)]


def test_rss_mb_reads_this_process():
    assert 10 < memory.rss_mb() < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1


# With the RSS growing 300 MB a step: the settings, a trim at steps 3 and 6 (floors at steps 1 and 4), one at the end.
SIX_STEPS = [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, 1 << 30), *[("malloc_trim", 0)] * 3]


def test_the_library_trains_under_the_same_heap_policy_as_the_command(
        libc, tmp_path, tiny_bert_dir, reviews, monkeypatch):  # noqa: F811  (fixtures)
    model, delta = setup()
    cfg = TrainConfig(epochs=1, max_steps=6, batch_size=8, eval_baseline=False)
    deltatune.train(model, delta, task_data("classification"), cfg, tmp_path / "lib", collate=COLLATE)
    assert libc == SIX_STEPS

    for argv in (["deltatune", "train"], None):  # a `deltatune` process, and main() called from Python code
        libc.clear()
        config = write_config(tmp_path, tiny_bert_dir, reviews, output_dir=str(tmp_path / f"cli-{argv is None}"))
        command = ["train", str(config), "--set", "train.max_steps=6", "--set", "train.eval_baseline=false"]
        if argv is None:
            assert main(command) == 0
        else:
            monkeypatch.setattr(sys, "argv", [*argv, *command[1:]])
            assert main() == 0
        assert libc == SIX_STEPS
