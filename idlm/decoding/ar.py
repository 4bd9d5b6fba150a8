"""Reference autoregressive generation for a batch of prompts over a contiguous KV cache.

This is the AR baseline every other decoder is measured against (and, under greedy decoding, must
reproduce token for token). One prefill forward for the whole batch (right-padded, each row's
logits taken at its last prompt token), then one token per request per forward. Requests keep their
own sampling parameters and seeds; finished requests leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors, sample
from idlm.errors import ConfigError
from idlm.layers.attention import KVCache
from idlm.models.transformer import Transformer


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS / stop id) or "length" (max_tokens)
    stats: dict = field(default_factory=dict)


def check_request(prompt: list[int], params: SamplingParams, context: int, vocab_size: int) -> None:
    """Reject requests that cannot run, naming the problem."""
    if not prompt:
        raise ConfigError("the prompt is empty: at least one token is needed")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    if len(prompt) + params.max_tokens > context:
        raise ConfigError(
            f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the model's "
            f"context of {context} tokens"
        )


@torch.no_grad()
def generate_ar(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                eos_token_ids: list[int] | None = None,
                on_token: Callable[[int, int], None] | None = None) -> list[GenerationOutput]:
    """Generate for every prompt; `on_token(row, token_id)` is called as each token is emitted."""
    cfg, device = model.config, model.device
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    for p, sp in zip(prompts, params):
        check_request(p, sp, cfg.max_position_embeddings, cfg.vocab_size)
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    B = len(prompts)
    outs = [GenerationOutput(list(p)) for p in prompts]
    stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos) for sp in params]
    generators = [sp.generator(device) for sp in params]
    temp, top_k, top_p = params_tensors(params, device)

    lens = torch.tensor([len(p) for p in prompts], device=device)
    max_len = int(max(len(p) + sp.max_tokens for p, sp in zip(prompts, params)))
    cache = KVCache.for_model(cfg, B, max_len, model.dtype, device)

    # prefill: right-padded batch, logits at each row's last prompt token
    t0 = time.perf_counter()
    T = int(lens.max())
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(T, device=device).expand(B, T)
    hidden = model(ids, positions, cache.view(starts=torch.zeros(B, dtype=torch.long, device=device)))
    cache.lengths[:] = lens
    logits = model.compute_logits(hidden[torch.arange(B, device=device), lens - 1])  # [B, V]
    prefill_s = time.perf_counter() - t0

    active = list(range(B))
    forwards = 0
    t0 = time.perf_counter()
    while True:
        rows = torch.tensor(active, device=device)
        probs = filtered_probs(logits, temp[rows], top_k[rows], top_p[rows])
        tokens = sample(probs, [generators[b] for b in active]).tolist()
        still = []
        for b, tok in zip(active, tokens):
            out = outs[b]
            out.token_ids.append(tok)
            if on_token is not None:
                on_token(b, tok)
            if tok in stops[b]:
                out.finish_reason = "stop"
            elif len(out.token_ids) >= params[b].max_tokens:
                out.finish_reason = "length"
            else:
                still.append(b)
        if not still:
            break
        active = still
        rows = torch.tensor(active, device=device)
        last = torch.tensor([[outs[b].token_ids[-1]] for b in active], device=device)
        hidden = model(last, cache.lengths[rows][:, None], cache.view(rows))
        cache.lengths[rows] += 1
        logits = model.compute_logits(hidden[:, -1])
        forwards += 1
    decode_s = time.perf_counter() - t0
    for out in outs:
        n = len(out.token_ids)
        out.stats = {"decoder": "ar", "prompt_tokens": len(out.prompt_token_ids), "generated_tokens": n,
                     "decode_forwards": n - 1, "batch_forwards": forwards,
                     "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4)}
    return outs
