"""GGUF export on the packaged SmolLM2-135M: a LoRA (perturbed, r=8 on q/k/v/o) exported as a GGUF-LoRA adapter
and merged into fp16 and q8_0 GGUF files, which transformers' GGUF loader reads back; prints sizes, export times,
whether the tokenizer gives the same ids, and whether greedy answers equal deltatune's.

    python bench/gguf_roundtrip.py /tmp/gguf-check
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune
from deltatune.generation.sampling import Sampling, generate
from deltatune.interop.llamacpp import export_gguf, export_gguf_lora
from deltatune.models.load import load_model

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?"]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m", "causal_lm")
    delta = deltatune.attach(model, deltatune.LoRA(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in delta.trainable_parameters().values():
            p.add_(0.02 * torch.randn_like(p))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    sampling = Sampling(max_new_tokens=24)
    start = time.perf_counter()
    adapter = export_gguf_lora(delta, out / "lora.gguf")
    print(f"gguf-lora: {adapter.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    ours = generate(model, tokenizer, prompts, sampling, add_special_tokens=False)
    for dtype in ("fp16", "q8_0"):
        start = time.perf_counter()
        path = export_gguf(delta, tokenizer, out / f"model-{dtype}.gguf", dtype=dtype, name="smollm2-lora")
        print(f"{dtype}: {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")
        back = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        back_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
        same_ids = all(back_tokenizer(p, add_special_tokens=False)["input_ids"] ==
                       tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts)
        theirs = generate(back, tokenizer, prompts, sampling, add_special_tokens=False)
        print(f"  same token ids: {same_ids}; same greedy answers: {sum(a == b for a, b in zip(ours, theirs))}"
              f" of {len(prompts)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
