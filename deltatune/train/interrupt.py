"""Ctrl-C and SIGTERM during training: the loop finishes its step, saves a checkpoint and stops.

`StopRequests` turns the first SIGINT / SIGTERM into a flag the loop reads at each step boundary (a second one
interrupts at once, as usual). `TrainingInterrupted` then says which checkpoint holds the state, if any.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from deltatune.errors import DeltaTuneError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(DeltaTuneError):
    """Training stopped on a signal; `checkpoint` is the state to resume from (None: nothing was saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = (f"the state after step {step} is saved in {checkpoint}" if checkpoint is not None else
                 "nothing was saved (no checkpoint was written yet)")
        super().__init__(f"training stopped by {signal.Signals(signum).name} at step {step}: {saved}")


class StopRequests:
    """While active (main thread only), SIGINT/SIGTERM set `signum` instead of stopping the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum
