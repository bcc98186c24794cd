"""The training process's heap policy (train/memory.py): glibc settings kept by the user, trims when the RSS grew,
and the same policy for `deltatune.train(...)` from Python and the `deltatune train` command."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.train import TrainConfig, memory
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)
from tests.test_loop import COLLATE, setup, task_data

M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1
SETTINGS = [("mallopt", M_MMAP_THRESHOLD, 32 << 20), ("mallopt", M_TRIM_THRESHOLD, 1 << 30)]

ALLOC_PROBE = textwrap.dedent("""
    import ctypes, json, os
    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_blocks(mib):  # while a tensor of `mib` MiB lives, and after it is freed
        before = libc.mallinfo2().hblks
        block = torch.ones(mib * 1024 * 1024 // 4)
        alive = libc.mallinfo2().hblks - before
        del block
        return [alive, libc.mallinfo2().hblks - before]

    plain = [mmapped_blocks(16), mmapped_blocks(64)]
    from deltatune.train.memory import HeapPolicy
    with HeapPolicy() as heap:
        tuned = [mmapped_blocks(16), mmapped_blocks(64)]
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
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory, "load_libc", lambda: FakeLibc(calls))
    readings = iter(range(1000, 10**6, 300))
    monkeypatch.setattr(memory, "rss_mb", lambda: next(readings))
    return calls


@pytest.mark.slow  # a subprocess importing torch: ~6 s on a loaded machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallinfo2")
def test_the_policy_keeps_blocks_below_the_threshold_and_maps_bigger_ones():
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.splitlines()[-1])
    # [mmapped while alive, after free] for a 16 MiB and a 64 MiB tensor: glibc's default (a 128 KiB threshold at
    # start) maps both; the policy keeps the 16 MiB one in the heap for reuse and maps the 64 MiB one, which goes
    # back to the kernel as soon as it is freed (a big freed block never stays behind in the heap)
    assert probe["plain"] == [[1, 0], [1, 0]]
    assert probe["tuned"] == [[0, 0], [1, 0]]
    assert probe["applied"] == memory.heap_settings() == {"MALLOC_MMAP_THRESHOLD_": 32 << 20,
                                                          "MALLOC_TRIM_THRESHOLD_": 1 << 30}
    # set in this process only (child processes that train apply it themselves); oneDNN's bound on import
    assert probe["env"] == {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None,
                            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}


def test_blocks_the_size_of_a_trainable_tensor_stay_in_the_heap(libc):
    embedding = torch.nn.Embedding(49152, 512, device="meta")  # 96 MiB in fp32: full fine-tuning's largest tensor
    assert memory.heap_settings(embedding)["MALLOC_MMAP_THRESHOLD_"] == 192 << 20  # twice that: its grad, AdamW's
    embedding.requires_grad_(False)  # frozen (LoRA on a big base): big blocks are temporaries, mapped from 32 MiB
    assert memory.heap_settings(embedding)["MALLOC_MMAP_THRESHOLD_"] == 32 << 20
    huge = torch.nn.Linear(65536, 32768, device="meta")  # 8 GiB: capped at what mallopt (an int) takes
    assert memory.heap_settings(huge)["MALLOC_MMAP_THRESHOLD_"] == 1 << 30
    with memory.HeapPolicy(embedding.requires_grad_(True)):  # the policy applies the model's settings
        assert libc == [("mallopt", M_MMAP_THRESHOLD, 192 << 20), SETTINGS[1]]


def test_the_users_own_settings_are_kept(monkeypatch, libc):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # glibc applied it at start-up
    with memory.HeapPolicy() as heap:
        assert heap.applied == {"MALLOC_MMAP_THRESHOLD_": 32 << 20}
    assert libc == [SETTINGS[0], ("malloc_trim", 0)]  # the mmap threshold only; the end gives memory back


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_MAX_", "0"), ("MALLOC_MMAP_THRESHOLD_", "1048576")])
def test_the_users_mmap_settings_keep_the_mmap_threshold(monkeypatch, libc, name, value):
    monkeypatch.setenv(name, value)  # e.g. the settings before issue 18: no mmap at all
    with memory.HeapPolicy() as heap:
        assert heap.applied == {"MALLOC_TRIM_THRESHOLD_": 1 << 30}
    assert libc == [SETTINGS[1], ("malloc_trim", 0)]


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
    assert libc == [*SETTINGS, ("malloc_trim", 0), ("malloc_trim", 0)]


def test_rss_mb_reads_this_process():
    assert 10 < memory.rss_mb() < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1


# With the RSS growing 300 MB a step: the settings, a trim at steps 3 and 6 (floors at steps 1 and 4), one at the end.
SIX_STEPS = [*SETTINGS, *[("malloc_trim", 0)] * 3]


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
