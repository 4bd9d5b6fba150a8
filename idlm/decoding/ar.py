"""The autoregressive decoder: one query token per request per forward (the baseline, TPF = 1).

Every other decoder is measured against it and, under greedy decoding, must reproduce its tokens.
Raw logprobs (`SamplingParams.logprobs`): the first token's from the prefill logits, then each step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.decoding.base import Block, Decoder, StepResult
from idlm.decoding.logprobs import first_token_logprobs, logprob_columns, logprobs_static, unpack_logprobs
from idlm.decoding.sampling import (
    exponential_noise,
    filtered_probs,
    needs_truncation,
    params_tensors,
    race,
    sample_tokens,
)
from idlm.layers.fused import cuda_fused


@dataclass
class ARState:
    last: int  # the last emitted token; its KV is written by the next forward


class ARDecoder(Decoder):
    name = "ar"
    query_len = 1

    def start(self, logits, params, generators):
        tokens, probs = (t.tolist() for t in sample_tokens(logits, params, generators))
        lps = first_token_logprobs(logits, tokens, params)
        return [ARState(t) for t in tokens], [StepResult([t], 0, [q], *lp) for t, q, lp in zip(tokens, probs, lps)]

    def block(self, state: ARState) -> Block:
        return Block(tokens=[state.last], is_mask=[False])

    fused = True

    def step_inputs(self, states, params, generators, vocab_size, device):
        temp, top_k, top_p = params_tensors(params, "cpu")  # host tensors; noise on the device
        tensors = {"temperature": temp, "top_k": top_k, "top_p": top_p}
        if not all(p.greedy for p in params):
            tensors["noise"] = exponential_noise((vocab_size,), generators, device)  # [B, V]
        greedy = all(p.greedy for p in params)
        return tensors, {"truncate": needs_truncation(params) and not greedy, "greedy": greedy,
                         "logprobs": logprobs_static(params)}

    def compute(self, logits, tensors, truncate=True, greedy=False, logprobs=None):
        if greedy:  # p̃ is the point mass on the argmax: skip the distribution entirely
            packed = greedy_ar_step(logits)
        else:
            p = filtered_probs(logits[:, 0], tensors["temperature"], tensors["top_k"], tensors["top_p"], truncate)
            tokens = race(p, tensors.get("noise"))  # [B]
            q = p.gather(-1, tokens[:, None]).squeeze(-1)
            packed = torch.stack([tokens.float(), q], dim=-1)  # [B, 2]: token, p̃(token)
        if logprobs is not None:  # + [1 + 2k]: the token's raw logprob, top-k ids, top-k logprobs
            packed = torch.cat([packed, logprob_columns(logits, packed[:, :1].long(), logprobs)], dim=-1)
        return packed, None

    def finish(self, states, rows, extra, params, stats):
        results = []
        for s, row, p in zip(states, rows, params):
            s.last = int(row[0])
            res = StepResult([s.last], 1, [row[1]])
            if p.logprobs is not None:
                res.logprobs, res.top_logprobs = unpack_logprobs(row, 2, 1, 1, p.logprobs)
            results.append(res)
        return results


def generate_ar(model, prompts, params, **kwargs):
    """AR generation for a batch of prompts (keyword arguments: `idlm.decoding.runner.generate`)."""
    from idlm.decoding.runner import generate

    return generate(model, ARDecoder(), prompts, params, **kwargs)


@cuda_fused
def greedy_ar_step(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, 1, V] -> packed [B, 2]: the argmax token and q = 1 (one fused kernel on CUDA)."""
    tokens = logits[:, 0].argmax(-1)
    return torch.stack([tokens.float(), torch.ones_like(tokens, dtype=torch.float32)], dim=-1)
