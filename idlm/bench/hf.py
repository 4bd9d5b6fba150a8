"""The outside baseline: HF transformers `generate` on the same weights, static KV cache, with or without
`torch.compile`.

Why it exists: idlm's speed claims are ratios to what a user already has; the strongest plain
PyTorch baseline is transformers' `generate` with a static cache, whose decode forward transformers
compiles (`torch.compile`, CUDA graphs) when `cache_implementation="static"` on a GPU. The model is
written with `idlm.models.loader.save_pretrained` (HF layout) and loaded back by transformers, so both
sides run exactly the same weights and dtype. Greedy, EOS ignored, one request at a time (per-request
tokens/s at concurrency 1).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch


def load_hf(model, tokenizer):
    """A transformers AutoModelForCausalLM with `model`'s weights, on its device and in its dtype."""
    from transformers import AutoModelForCausalLM

    from idlm.models.loader import save_pretrained

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, tokenizer=tokenizer)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=model.dtype)
    return hf.to(model.device).eval()


@torch.no_grad()
def hf_generate_speed(hf, prompts: list[list[int]], max_new_tokens: int = 128, compile: bool = True,
                      reps: int = 3) -> dict:
    """Per-request decode speed of `hf.generate` (greedy, static cache, `compile` on or off): prompts run one
    at a time, each `reps` times after one warm-up generation (which also compiles); median tokens/s,
    and the generated ids of the last run of each prompt (to check they equal idlm's greedy AR)."""
    device = next(hf.parameters()).device
    # EOS ignored by stopping on no token (not by min_new_tokens, which would also forbid choosing it), as
    # idlm's ignore_eos: both sides then generate exactly the same max_new_tokens tokens
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
              disable_compile=not compile, eos_token_id=[], pad_token_id=0)
    speeds, outputs = [], []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        hf.generate(ids, **kw)  # warm-up (compiles the decode step on the first prompt)
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            speeds.append(max_new_tokens / (time.perf_counter() - t0))
        outputs.append(out[0, len(p):].tolist())
    return {"per_request_tok_s": round(statistics.median(speeds), 1), "reps_tok_s": [round(s, 1) for s in speeds],
            "compile": compile, "cache": "static", "max_new_tokens": max_new_tokens, "outputs": outputs}
