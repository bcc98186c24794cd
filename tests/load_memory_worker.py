"""The peak RSS of one `load_model` in a fresh process (run by tests/test_load_memory.py):
`python load_memory_worker.py WARM_UP FOLDER DTYPE QUANTIZE` prints one JSON line: MB above the RSS before the load
at its peak (VmHWM, reset just before) and after it, the MB of the loaded model's tensors, and the MB of the
scratch buffer its bf16-held / quantized layers share for their fp32 matmuls (filled by the load's causality probe:
at least 16 MB whatever the model's size, so not a cost that grows with the weights).

A tiny model of the same architecture (WARM_UP) is loaded the same way first, so that the baseline holds the code
of every step (~30 MB, a third of the model measured) and only the weights are left to count; the conversion chunk
is scaled down with the model (16 MB would be a fifth of it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import deltatune.models.quantize as quantize
from deltatune.models.quantize import QuantizedLinear, stored_bytes
from deltatune.models.load import Pretrained, load_model


def status_mb(field: str) -> float:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) / 1024 for line in lines if line.startswith(field + ":"))


def main(warm_up: str, folder: str, dtype: str, mode: str) -> dict[str, float]:
    torch.set_num_threads(1)
    quantize.COPY_CHUNK_BYTES = 1 << 20
    options = {"dtype": dtype, "quantize": None if mode == "none" else mode}
    load_model(warm_up, "causal_lm", **options)
    pretrained = Pretrained.open(folder)
    tokenizer = pretrained.tokenizer()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = status_mb("VmRSS")
    model, _ = pretrained.load("causal_lm", tokenizer=tokenizer, **options)
    return {"peak_mb": status_mb("VmHWM") - before, "after_mb": status_mb("VmRSS") - before,
            "tensors_mb": stored_bytes(model) / 2**20, "scratch_mb": scratch_bytes(model) / 2**20}


def scratch_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct scratch buffers of `model`'s QuantizedLinear layers."""
    buffers = {id(m.scratch.buffer): m.scratch.buffer for m in model.modules() if isinstance(m, QuantizedLinear)}
    return sum(b.nbytes for b in buffers.values())


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
