"""The introspective acceptance rate α (SPEC §7): does a model agree with what it generates?

Decode each prompt with the model's own decoder, recording for every emitted token x_k the
probability q_k(x_k) of the distribution it was drawn from (a draft's q̃, the clean p̃, or a
correction's residual: `GenerationOutput.token_probs`). Then score the finished sequence once as
clean context, giving p_k(x_k):
- AR / ISD / R-ISD: the causal logits at k−1 (R-ISD: of the base model, which the clean positions are),
- SDAR-style: a single MASK at k after the clean prefix (no logit shift),
both through the same p̃ filter (temperature, top-k, top-p). α = mean_k min(1, p_k(x_k) / q_k(x_k)).
AR gives 1 up to rounding by construction. Rounding matters: min(1, ·) clips the ratio's noise from above,
so a low-precision run reads low — SmolLM2-135M's own AR decoding gives 0.981 at T = 1 in bf16 on a CPU and
1.000 in fp32 (docs/training.md). Measure α in float32.
"""

from __future__ import annotations

import math

import torch

from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors

# A small default prompt set for `idlm eval alpha` when no --prompts file is given.
DEFAULT_PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\n",
    "The quick brown fox",
    "class Stack:\n    \"\"\"A simple stack.\"\"\"\n",
    "Once upon a time",
    "for i in range(10):",
    "# Sort a list of numbers\n",
    "The capital of France is",
]


@torch.no_grad()
def clean_scores(model, prompt: list[int], tokens: list[int], params: SamplingParams) -> list[float]:
    """p̃_k(x_k) for each generated token from one causal forward over prompt + tokens."""
    seq = torch.tensor([prompt + tokens], device=model.device)
    logits = model.logits(seq)[0, len(prompt) - 1: len(prompt) + len(tokens) - 1]  # [n, V]
    p = filtered_probs(logits, *params_tensors([params] * len(tokens), logits.device))
    return p.gather(-1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(-1).tolist()


@torch.no_grad()
def masked_scores(model, prompt: list[int], tokens: list[int], params: SamplingParams,
                  mask_token_id: int, rows_per_forward: int = 32) -> list[float]:
    """SDAR-style scoring: p̃ of x_k at a single MASK placed at k after the clean prefix x_<k."""
    seq = prompt + tokens
    n, out = len(tokens), []
    # n rows of len(seq) tokens: all at once, a 256-token answer's rows held 48 GB on the H200 (session 20),
    # so rows_per_forward rows at a time, and the LM head only at each row's MASK
    for lo in range(0, n, rows_per_forward):
        ks = range(lo, min(n, lo + rows_per_forward))
        ids = torch.tensor([seq[: len(prompt) + k] + [mask_token_id] + [0] * (n - 1 - k) for k in ks],
                           device=model.device)  # row k: prefix, MASK at its position, trailing padding
        at = torch.arange(len(prompt) + ks.start, len(prompt) + ks.stop, device=model.device)
        hidden = model(ids)[torch.arange(len(ks), device=model.device), at]  # [rows, H]: the head only there
        logits = model.compute_logits(hidden)  # [rows, V]
        p = filtered_probs(logits, *params_tensors([params] * len(ks), logits.device))
        out += p.gather(-1, torch.tensor(tokens[ks.start: ks.stop], device=logits.device)[:, None]).squeeze(-1).tolist()
    return out


def introspective_alpha(model, decoder, prompts: list[list[int]], params: SamplingParams, *, lora=None,
                        eos_token_ids=None) -> dict:
    """α over a prompt set, with per-request values and the decoding statistics of the run."""
    outs = generate(model, decoder, prompts, params, lora=lora, eos_token_ids=eos_token_ids)
    ratios, per_request = [], []
    for prompt, out in zip(prompts, outs):
        if not out.token_ids:
            continue
        if decoder.name == "sdar":
            p = masked_scores(model, prompt, out.token_ids, params, decoder.mask_token_id)
        else:
            p = clean_scores(model, prompt, out.token_ids, params)
        r = [min(1.0, pk / qk) for pk, qk in zip(p, out.token_probs) if qk > 0 and not math.isnan(qk)]
        ratios += r
        per_request.append(sum(r) / len(r) if r else None)
    stats = outs[0].stats
    for o in outs[1:]:
        stats = stats.merge(o.stats)
    return {"alpha": sum(ratios) / len(ratios) if ratios else None, "tokens": len(ratios),
            "requests": len(prompts), "per_request": per_request, "stats": stats.to_dict()}
