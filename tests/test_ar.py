"""Reference AR generation: the batched KV-cache loop equals a naive full-recompute greedy loop."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_transformer

from idlm.decoding.ar import generate_ar
from idlm.decoding.sampling import SamplingParams
from idlm.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(64, std=0.6, max_position_embeddings=96, eos_token_id=0)


@torch.no_grad()
def naive_greedy(model, prompt, n, eos=()):
    seq = list(prompt)
    for _ in range(n):
        tok = int(model.logits(torch.tensor([seq]))[0, -1].argmax())
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt):]


def test_batched_greedy_equals_naive_loop_for_mixed_lengths(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (1, 5, 17, 9)]
    outs = generate_ar(model, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == naive_greedy(model, p, 20)
        assert o.finish_reason == "length"


def test_stops_at_eos_and_stop_ids_per_request(model):
    prompts = [[5, 6, 7], [9, 3]]
    free = generate_ar(model, prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_at = free[0].token_ids[3]
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    outs = generate_ar(model, prompts, params)
    first = free[0].token_ids.index(stop_at)
    assert outs[0].token_ids == free[0].token_ids[: first + 1] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == free[1].token_ids[:4] and outs[1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_batch(model):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=15, ignore_eos=True)
    alone = generate_ar(model, [[4, 4, 4]], sp)[0].token_ids
    other = SamplingParams(temperature=1.0, seed=99, max_tokens=15, ignore_eos=True)
    batched = generate_ar(model, [[1, 2, 3, 4, 5, 6], [4, 4, 4]], [other, sp])[1].token_ids
    assert alone == batched


def test_bad_requests(model):
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate_ar(model, [[]], SamplingParams())
    with pytest.raises(ConfigError, match="token id 64 is outside the vocabulary"):
        generate_ar(model, [[1, 64]], SamplingParams())
    with pytest.raises(ConfigError, match="exceeds the model's context of 96 tokens"):
        generate_ar(model, [[1] * 90], SamplingParams(max_tokens=10))
