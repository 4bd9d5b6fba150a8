"""The autoregressive decoder: one query token per request per forward (the baseline, TPF = 1).

Every other decoder is measured against it and, under greedy decoding, must reproduce its tokens.
Raw logprobs (`SamplingParams.logprobs`): the first token's from the prefill logits, then each step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from idlm.decoding import rng
from idlm.decoding.base import BlockBatch, Decoder, ParamsInputs, QueryBlock, StepResult
from idlm.decoding.logprobs import first_token_logprobs, logprob_columns, logprobs_static, unpack_logprobs
from idlm.decoding.sampling import (
    chunked_argmax,
    filtered_probs,
    inverse_cdf,
    params_tensors,
    sample_tokens,
    take_draws,
    truncation,
)
from idlm.layers.fused import cuda_fused


@dataclass
class ARState:
    last: int  # the last emitted token; its KV is written by the next forward


class ARDecoder(Decoder):
    name = "ar"
    query_len = 1

    def start(self, logits, params, rngs):
        tokens, probs = (t.tolist() for t in sample_tokens(logits, params, rngs))
        lps = first_token_logprobs(logits, tokens, params)
        return [ARState(t) for t in tokens], [StepResult([t], 0, [q], *lp) for t, q, lp in zip(tokens, probs, lps)]

    def block(self, state: ARState) -> QueryBlock:
        return QueryBlock(tokens=[state.last], is_mask=[False])

    def blocks(self, states):
        tokens = np.fromiter((s.last for s in states), np.int64, len(states))[:, None]
        return BlockBatch(tokens, np.zeros(tokens.shape, dtype=bool))

    fused = True

    def params_inputs(self, params):
        temp, top_k, top_p = params_tensors(params, "cpu")  # host tensors; noise on the device
        greedy = all(p.greedy for p in params)
        return ParamsInputs({"temperature": temp, "top_k": top_k, "top_p": top_p},
                            {"truncate": truncation(params) if not greedy else False, "greedy": greedy,
                             "logprobs": logprobs_static(params)}, sampled=not greedy)

    def step_inputs(self, states, params, rngs, vocab_size, device):
        fixed = self.batch_params(params)
        tensors = dict(fixed.tensors)
        if fixed.sampled:  # the keys and draw numbers of each row's uniform, drawn in `compute` (on the device)
            tensors["keys"], tensors["draw"] = take_draws(rngs)
        return tensors, dict(fixed.static)

    def compute(self, logits, tensors, truncate=True, greedy=False, logprobs=None):
        if greedy:  # p̃ is the point mass on the argmax: skip the distribution entirely
            packed = greedy_ar_step(logits)
        else:
            packed = sampled_ar_step(logits, tensors["temperature"], tensors["top_k"], tensors["top_p"],
                                     tensors["keys"], tensors["draw"], truncate)
        if logprobs is not None:  # + [1 + 2k]: the token's raw logprob, top-k ids, top-k logprobs
            packed = torch.cat([packed, logprob_columns(logits, packed[:, :1].long(), logprobs)], dim=-1)
        return packed, None

    def next_inputs(self, packed, inputs):
        tokens = packed[:, :1].long()  # [B, 1]: the token drawn is the next input (ids < 2^24: exact in float32)
        return torch.ones_like(tokens[:, 0]), {"tokens": tokens}

    def finish(self, states, packed, extra, params, stats):
        tokens, probs = packed[:, 0].astype(np.int64).tolist(), packed[:, 1].tolist()
        for s, t in zip(states, tokens):
            s.last = t
        results = [StepResult([t], 1, [q]) for t, q in zip(tokens, probs)]
        if self.batch_params(params).static["logprobs"] is not None:  # some rows want logprobs
            for b, p in enumerate(params):
                if p.logprobs is not None:
                    results[b].logprobs, results[b].top_logprobs = unpack_logprobs(packed[b].tolist(), 2, 1, 1,
                                                                                   p.logprobs)
        return results


def generate_ar(model, prompts, params, **kwargs):
    """AR generation for a batch of prompts (keyword arguments: `idlm.decoding.reference.generate`)."""
    from idlm.decoding.reference import generate

    return generate(model, ARDecoder(), prompts, params, **kwargs)


@cuda_fused
def greedy_ar_step(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, 1, V] -> packed [B, 2]: the argmax token and q = 1 (one fused kernel on CUDA)."""
    tokens = chunked_argmax(logits[:, 0])
    return torch.stack([tokens.float(), torch.ones_like(tokens, dtype=torch.float32)], dim=-1)


@cuda_fused(start="only the batch dynamic", batch_rows=True)
def sampled_ar_step(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    keys: torch.Tensor, draw: torch.Tensor, truncate: bool | int) -> torch.Tensor:
    """logits [B, 1, V], per-row temperature / top_k / top_p [B], Philox keys [B, 2] and draw numbers [B]
    -> packed [B, 2]: the token drawn from p̃ and p̃(token). One compiled function on CUDA (a few fused
    kernels inside the decode graph, as the sampled ISD step), eager elsewhere."""
    p = filtered_probs(logits[:, 0], temperature, top_k, top_p, truncate)
    u = rng.uniforms.__wrapped__(keys, draw, rng.STREAM_TOKENS, 1)[:, 0]  # [B] (inside a compiled region on CUDA)
    tokens = inverse_cdf(p, u)  # [B]
    q = p.gather(-1, tokens[:, None]).squeeze(-1)
    return torch.stack([tokens.float(), q], dim=-1)
