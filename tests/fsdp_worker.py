"""Run under torchrun by tests/test_distributed.py: FSDP full fine-tuning of CONFIG, once straight through into
OUT/straight, once interrupted after step STOP and resumed into OUT/resumed (one launch, so torch starts once)."""

from __future__ import annotations

import sys

from deltatune.config import load_config
from deltatune.runs.session import run_training


class Interrupt(Exception):
    pass


def stop_after(step: int):
    def on_event(kind: str, info: dict) -> None:
        if kind == "step" and info["step"] == step:
            raise Interrupt

    return on_event


def main(config_path: str, out: str, stop: int) -> None:
    run_training(load_config(config_path, [f"output_dir={out}/straight"]))
    resumed = load_config(config_path, [f"output_dir={out}/resumed"])
    try:
        run_training(resumed, on_event=stop_after(stop))
        raise AssertionError("the run was not interrupted")
    except Interrupt:
        pass
    run_training(resumed, resume=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
