"""The autoregressive decoder: one query token per request per forward (the baseline, TPF = 1).

Every other decoder is measured against it and, under greedy decoding, must reproduce its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from idlm.decoding.base import Block, Decoder, StepResult
from idlm.decoding.sampling import sample_tokens


@dataclass
class ARState:
    last: int  # the last emitted token; its KV is written by the next forward


class ARDecoder(Decoder):
    name = "ar"
    query_len = 1

    def start(self, logits, params, generators):
        tokens, probs = (t.tolist() for t in sample_tokens(logits, params, generators))
        return [ARState(t) for t in tokens], [StepResult([t], 0, [q]) for t, q in zip(tokens, probs)]

    def block(self, state: ARState) -> Block:
        return Block(tokens=[state.last], is_mask=[False])

    def step(self, states, logits, params, generators, stats):
        tokens, probs = (t.tolist() for t in sample_tokens(logits[:, 0], params, generators))
        for s, t in zip(states, tokens):
            s.last = t
        return [StepResult([t], 1, [q]) for t, q in zip(tokens, probs)]


def generate_ar(model, prompts, params, **kwargs):
    """AR generation for a batch of prompts (keyword arguments: `idlm.decoding.runner.generate`)."""
    from idlm.decoding.runner import generate

    return generate(model, ARDecoder(), prompts, params, **kwargs)
