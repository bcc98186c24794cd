"""Loading never holds a full copy of the model in another dtype, nor the checkpoint's pages beside the converted
weights: the peak RSS of a load (in a fresh process) stays within 1.2x the loaded tensors and the RSS they take
(issue 18), for bf16 and fp32 shards loaded as fp32, bf16, int8 and int4. Before the loader converted tensor by
tensor, the unquantized loads here peaked at 1.5x (bf16 shards as fp32) and 3.0x (fp32 shards as bf16).

SLACK_MB: costs that do not grow with the model, large beside a 44M-parameter one: the first forward's per-layer
temporaries (glibc's heap grows by 10-25 MB under them) and the loader's bookkeeping; and the scratch buffer that
bf16-held and quantized layers share for their fp32 matmuls (at least 16 MB, filled by the load's causality probe),
counted as the worker measures it. At 1B the measured peak is
<= 1.1x with nothing added (bench/load_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

import deltatune.models.quantize as quantize
from deltatune.models.load import load_model
from deltatune.models.precision import DTYPES
from tiny_lm import save_tiny_lm, tiny_tokenizer

WORKER = Path(__file__).with_name("load_memory_worker.py")
SLACK_MB = 24
LINUX_ONLY = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 44M-parameter Llama (8 layers of width 512, a 16k vocabulary: embeddings and head are 2/5 of it,
    as in a 1B model) saved in bf16 and in fp32 safetensors shards of 40 MB."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    folders = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        folders[name] = tmp_path_factory.mktemp(f"llama-{name}")
        model.to(dtype).save_pretrained(folders[name], max_shard_size="40MB")
        tokenizer.save_pretrained(folders[name])
    return folders


@LINUX_ONLY
@pytest.mark.slow
@pytest.mark.parametrize(("stored", "dtype", "mode"), [
    ("bf16", "fp32", "none"), ("fp32", "bf16", "none"), ("bf16", "fp32", "int8"), ("fp32", "bf16", "int4")])
def test_load_peak_stays_within_1_2x_the_loaded_weights(shards, stored, dtype, mode, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    warm_up = save_tiny_lm(tmp_path / "warm-up")
    loads = []
    for _ in range(2):  # the lower peak of two loads: its noise (pages read ahead, heap growth) only ever adds
        proc = subprocess.run([sys.executable, str(WORKER), str(warm_up), str(shards[stored]), dtype, mode],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loads.append(json.loads(proc.stdout.splitlines()[-1]))
    load = min(loads, key=lambda run: run["peak_mb"])
    assert load["peak_mb"] <= 1.2 * load["tensors_mb"] + load["scratch_mb"] + SLACK_MB, load
    assert load["peak_mb"] <= 1.2 * load["after_mb"] + SLACK_MB, load


@pytest.mark.parametrize(("stored", "dtype"), [(torch.bfloat16, "fp32"), (torch.float32, "bf16")])
def test_converted_load_equals_transformers_own_conversion(tmp_path, monkeypatch, stored, dtype):
    """Same tensors as from_pretrained(dtype=...), converted in several chunks; inv_freq stays fp32, ties stay."""
    monkeypatch.setattr(quantize, "COPY_CHUNK_BYTES", 1000)  # odd-sized chunks, many per tensor
    folder = save_tiny_lm(tmp_path / "lm")
    AutoModelForCausalLM.from_pretrained(folder).to(stored).save_pretrained(folder)
    # compute_dtype bf16: a plain bf16 model (on a CPU without native bf16, auto would hold it for fp32 compute)
    model, _ = load_model(str(folder), "causal_lm", dtype=dtype, compute_dtype="bf16" if dtype == "bf16" else "auto")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32 and model.config.dtype == DTYPES[dtype]


def test_convert_loaded_converts_a_tied_table_once():
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    before = model.transformer.wte.weight.float()
    quantize.convert_loaded(model, torch.float32, quantize.CheckpointPages())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.float32 and torch.equal(model.lm_head.weight, before)
