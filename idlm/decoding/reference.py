"""The reference decoding loop (`generate`): drives any decoder over a batch of prompts with a contiguous KV cache.

It is deliberately simple (no paging, no scheduling): the batched engine must reproduce its output
request by request. Per step every active request contributes its decoder's query block
(`Decoder.block`) at positions P..P+Q−1 (P = its kept KV length); the decoder turns the block's
logits into committed tokens and an `advance` (KV slots kept); the rest of the block's KV is
discarded by rolling the request's length back. Stop rules run on each emitted token in order.
Raw logprobs (`SamplingParams.logprobs`) come from the decoders; prompt logprobs from the prefill forward.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from idlm.decoding.base import BlockBatch, Decoder, StepResult
from idlm.decoding.logprobs import score
from idlm.decoding.output import GenerationOutput, apply_result, check_request
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stops import StopChecker
from idlm.errors import ConfigError
from idlm.layers.attention import KVCache


def _right_pad(seqs: list[list[int]], device) -> torch.Tensor:
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, device=device)
    return ids


@torch.no_grad()
def generate(model, decoder: Decoder, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             *, lora=None, eos_token_ids=None, tokenizer=None,
             on_text: Callable[[int, str], None] | None = None) -> list[GenerationOutput]:
    """Decode every prompt with `decoder`.

    With a tokenizer, `on_text(row, delta)` streams each request's text as tokens are committed
    (never a partial character or a prefix of a stop string).
    """
    cfg, device = model.config, model.device
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    for p, sp in zip(prompts, params):
        check_request(p, sp, cfg.max_position_embeddings, cfg.vocab_size)
    if decoder.uses_lora and lora is None:
        raise ConfigError(f"decoder {decoder.name!r} needs a LoRA adapter (--lora PATH)")
    if lora is not None:
        lora.check_fits(cfg)
    eos = cfg.eos_token_ids if eos_token_ids is None else list(eos_token_ids)
    if on_text is not None and tokenizer is None:
        raise ConfigError("streaming text (on_text) needs a tokenizer")
    B, Q = len(prompts), decoder.query_len
    outs = [GenerationOutput(list(p)) for p in prompts]
    checkers = [StopChecker(sp, eos, tokenizer) for sp in params]
    rngs = [sp.rng() for sp in params]  # each request's counter-based random stream
    stats = [o.stats for o in outs]
    lens = [len(p) for p in prompts]
    max_len = max(n + sp.max_tokens for n, sp in zip(lens, params)) + Q
    cache = KVCache.for_model(cfg, B, max_len, model.dtype, device)

    def commit(b: int, res: StepResult, from_decode: bool) -> bool:
        done = apply_result(outs[b], checkers[b], res, from_decode)
        if on_text is not None:
            on_text(b, checkers[b].new_text())
        return done

    # prefill: one right-padded forward (the base model: no LoRA), logits at each last prompt token
    t0 = time.perf_counter()
    ids = _right_pad(prompts, device)
    T = ids.shape[1]
    hidden = model(ids, torch.arange(T, device=device).expand(B, T),
                   cache.view(starts=torch.zeros(B, dtype=torch.long, device=device)))
    cache.lengths[:] = torch.tensor(lens, device=device)
    last = torch.tensor(lens, device=device) - 1
    logits = model.compute_logits(hidden[torch.arange(B, device=device), last])
    for b, sp in enumerate(params):  # prompt logprobs: position i predicts prompt token i + 1
        if sp.prompt_logprobs is not None:
            lps, tops = score(model.compute_logits(hidden[b, : lens[b] - 1]), prompts[b][1:], sp.prompt_logprobs)
            outs[b].prompt_logprobs, outs[b].prompt_top_logprobs = [None, *lps], [[], *tops]
    states, first = decoder.start(logits, params, rngs)
    active = [b for b in range(B) if not commit(b, first[b], from_decode=False)]
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    batch_forwards = 0
    while active:
        blocks = [decoder.block(states[b]) for b in active]
        rows = torch.tensor(active, device=device)
        batch = BlockBatch.stack(blocks)
        tokens = torch.from_numpy(batch.tokens).to(device)  # [A, Q]
        starts = cache.lengths[rows]
        offsets = torch.arange(Q) if batch.offsets is None else torch.from_numpy(batch.offsets)
        positions = starts[:, None] + offsets.to(device)
        visible, hide = (None if a is None else torch.from_numpy(a).to(device) for a in (batch.visible, batch.hide))
        kwargs = {}
        if decoder.uses_lora:
            kwargs = dict(lora=lora, lora_gate=torch.from_numpy(batch.gate).to(device),
                          is_mask=torch.from_numpy(batch.is_mask).to(device))
        hidden = model(tokens, positions, cache.view(rows, starts, visible, hide), **kwargs)
        logits = model.compute_logits(hidden)  # [A, Q, V]
        results = decoder.step([states[b] for b in active], logits, [params[b] for b in active],
                               [rngs[b] for b in active], [stats[b] for b in active])
        batch_forwards += 1
        still = []
        for b, res in zip(active, results):
            if not 0 <= res.advance <= Q:
                raise RuntimeError(f"decoder {decoder.name} kept {res.advance} of {Q} slots")
            cache.lengths[b] += res.advance  # the rest of the block's KV is rolled back
            stats[b].forwards += 1
            if not commit(b, res, from_decode=True):
                still.append(b)
        active = still
    decode_s = time.perf_counter() - t0
    for o, ch in zip(outs, checkers):
        if tokenizer is not None:
            o.text = ch.text
        o.timing = {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
                    "batch_forwards": batch_forwards}
    return outs
