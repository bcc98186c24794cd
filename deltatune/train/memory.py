"""The training process's memory policy: how glibc's heap and oneDNN's cache behave while `train()` runs.

`train()` opens one `HeapPolicy` per call, whoever calls it (the `deltatune` command or Python code), and calls
`after_step()` once per optimizer step; bench/README.md records what each setting measured.

* glibc keeps freed blocks below a fixed mmap threshold in the heap for reuse, and maps bigger ones, which go
  back to the kernel as soon as they are freed: M_MMAP_THRESHOLD = 32 MiB, or twice the model's largest
  trainable tensor when that is bigger (heap_settings()), and a 1 GiB M_TRIM_THRESHOLD, set with mallopt in the
  running process. glibc's default maps blocks from 128 KiB up to a threshold that adapts only over time and
  trims often (page faults and zeroing every step: 10-45% of a small model's CPU step); with the fixed threshold
  a small model's per-step tensors (the chunked loss's logits are at most 32 MiB) and full fine-tuning's gradients
  and optimizer temporaries stay in the heap. Nothing mapped at all (M_MMAP_MAX=0, the policy before issue 18)
  was as fast, but a large model's big temporaries (an 8B int8 layer dequantized for its matmul: 64-235 MB), once
  freed and split by the small allocations after them, fragmented the heap: an 8B int8 LoRA step passed 20 GB;
  mapped, it peaks at glibc's default memory. Values the user exported are kept: MALLOC_MMAP_MAX_ or
  MALLOC_MMAP_THRESHOLD_ leave the mmap behaviour, MALLOC_TRIM_THRESHOLD_ the trim threshold as set (glibc
  applied them at start-up; e.g. glibc's defaults there opt out).
* Batches whose shapes change every step fragment that heap (a full fine-tuning run's RSS grew by ~50 MB a step
  without bound): once the RSS has grown by HEAP_SLACK_MB past the step after the last trim, `malloc_trim` gives
  the free pages back. LoRA runs, whose RSS stays flat, never pay for it. The end of training trims once, so a
  longer-lived caller (a notebook) gets the memory back.
* oneDNN keeps a compiled primitive (with its buffers) per matmul shape it has seen, up to 1,024 by default: with
  packed or padded batches every step brings new shapes and a bf16 run's memory grew by ~30 MB a step; 16 bounds
  it at no measured speed cost. oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY when it builds its first primitive,
  so importing this module sets it (unless set), before the model is loaded and run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

MMAP_THRESHOLD = 32 << 20  # glibc's mmap threshold while training: at least this, see heap_settings()
TRIM_THRESHOLD = 1 << 30
_MALLOPT = {"MALLOC_MMAP_MAX_": -4, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}  # glibc M_* params
# a setting is left to the user who exported any of these (glibc applied them at start-up)
_KEPT_BY = {"MALLOC_MMAP_MAX_": ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_"),
            "MALLOC_MMAP_THRESHOLD_": ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_"),
            "MALLOC_TRIM_THRESHOLD_": ("MALLOC_TRIM_THRESHOLD_",)}
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", 16)
HEAP_SLACK_MB = 512

os.environ.setdefault(ONEDNN_CACHE[0], str(ONEDNN_CACHE[1]))


def heap_settings(model: nn.Module | None = None) -> dict[str, int]:
    """glibc's settings for training `model`: blocks below MMAP_THRESHOLD, or below twice the model's largest
    trainable tensor (its gradient and optimizer temporaries come back every step; full fine-tuning), stay in the
    heap; bigger ones are mapped and go back to the kernel when freed. A trim threshold of TRIM_THRESHOLD."""
    trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    return {"MALLOC_MMAP_THRESHOLD_": min(max(MMAP_THRESHOLD, 2 * largest), 1 << 30),  # mallopt takes an int
            "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


class HeapPolicy:
    """The heap settings for training `model` (heap_settings()): `with HeapPolicy(model) as heap:` applies them
    (process-wide), `heap.after_step()` trims a grown heap, leaving gives the free pages back."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.settings = heap_settings(model)
        self.libc = load_libc()
        self.applied: dict[str, int] = {}
        self.floor_mb: float | None = None  # the RSS of the first step after the last trim

    def __enter__(self) -> HeapPolicy:
        if hasattr(self.libc, "malloc_trim"):  # without a way to give memory back, glibc is left as it is
            self.applied = {name: value for name, value in self.settings.items()
                            if not any(kept in os.environ for kept in _KEPT_BY[name])
                            and _mallopt(self.libc, _MALLOPT[name], value)}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.applied:
            self.libc.malloc_trim(0)

    def after_step(self) -> bool:
        """After an optimizer step: malloc_trim when the settings apply and the RSS grew by more than
        HEAP_SLACK_MB since the first step after the last trim (or the first call). Returns whether it trimmed."""
        if not self.applied:
            return False
        rss = rss_mb()
        if self.floor_mb is None:
            self.floor_mb = rss
        if rss - self.floor_mb <= HEAP_SLACK_MB:
            return False
        self.libc.malloc_trim(0)
        self.floor_mb = None  # the next step's RSS (its working set faulted in again) is the new floor
        return True


def load_libc() -> ctypes.CDLL | None:
    """The C library (glibc on Linux), or None where there is none."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _mallopt(libc: ctypes.CDLL | None, param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where there is no glibc or it refuses."""
    return libc is not None and hasattr(libc, "mallopt") and libc.mallopt(param, value) == 1
