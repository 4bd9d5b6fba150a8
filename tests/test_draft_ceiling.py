"""scripts/draft_ceiling.py, the first-draft acceptance ceiling of a model, against plain forwards: its branch
tokens over a cached prefix give the same logits as a causal forward of the whole sequence, and its ceiling with
every branch kept equals the closed form built from one forward per (prefix, next token)."""

from __future__ import annotations

import pytest
import torch
from test_device_scripts import _load
from tiny import tiny_transformer

from idlm.decoding.acceptance import best_blind_draft_acceptance, marginal_draft_acceptance, marginal_draft_alpha
from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors

ceiling = _load("draft_ceiling")
V = 24


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(V, std=0.5)


def test_branch_tokens_see_only_their_prefix(model):
    seq = torch.tensor([[3, 7, 1, 9, 4, 4, 12, 0, 5, 21]])
    prefix = ceiling.RecordKV()
    model(seq, attn=prefix)
    ends = torch.tensor([2, 5, 5, 8])  # branch i: the real next token after x≤ends[i], so a causal forward's
    tokens = seq[0, ends + 1][None]  # hidden state at ends[i] + 1 is the oracle (two branches share a prefix)
    h = model(tokens, positions=(ends + 1)[None], attn=ceiling.branch_attention(prefix, ends))[0]
    want = model.logits(seq)[0, ends + 1]
    assert torch.allclose(model.compute_logits(h), want, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ceiling_with_every_branch_equals_one_forward_per_next_token(model, temperature):
    prompt, answer = [2, 5, 11], [7, 7, 19, 3, 8]
    params = SamplingParams(temperature=temperature)
    got = ceiling.sequence_ceiling(model, prompt, answer, params, top=V, chunk=2)

    def probs(ids):
        logits = model.logits(torch.tensor([ids]))[0, -1:]
        return filtered_probs(logits, *params_tensors([params], logits.device))[0]

    want, want_best, want_alpha = [], [], []
    for t in range(len(answer)):
        ctx = prompt + answer[:t]  # the prefix x≤P; c would sit at P+1
        w = probs(ctx)
        p2 = torch.stack([probs(ctx + [c]) for c in range(V)])
        want.append(marginal_draft_acceptance(w, p2).item())
        want_best.append(best_blind_draft_acceptance(w, p2).item())
        want_alpha.append(marginal_draft_alpha(w, p2).item())
    assert got["coverage"] == pytest.approx([1.0] * len(answer), abs=1e-5)
    assert got["marginal"] == pytest.approx(want, abs=1e-5)
    assert got["best"] == pytest.approx(want_best, abs=1e-5)  # all V columns kept: both bounds are the best
    assert got["best_high"] == pytest.approx(want_best, abs=1e-5)
    assert got["alpha"] == pytest.approx(want_alpha, abs=1e-5)
    assert all(0 < x < 1 for x in want)
    row = ceiling.summarize(temperature, got)
    assert row["first_draft_marginal"] <= row["first_draft_best"] <= row["first_draft_bound"] + 1e-9
    assert ceiling.local_tpf([1.0, 0.0], 4) == pytest.approx(2 / (1 / 4 + 1 / 1))  # forwards per token averaged


def test_best_on_a_few_columns_bounds_the_full_vocabulary_tightly():
    g = torch.Generator().manual_seed(5)
    w = torch.softmax(torch.randn(6, 8, generator=g), -1)
    p = torch.softmax(8 * torch.randn(6, 8, 300, generator=g), -1)  # peaked: a few tokens hold the mass
    full = best_blind_draft_acceptance(w, p)
    low, high = ceiling.best_on_columns(w, p, 64)
    assert (low <= full + 1e-5).all() and (high >= full - 1e-5).all() and (high - low <= 0.005).all()
