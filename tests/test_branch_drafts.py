"""scripts/branch_drafts.py, ISD with rejection branches (the TPF estimate of docs/risd.md, session 21), against
independent oracles: its MASK groups over a recorded prefix equal plain causal forwards of [prefix, MASK...];
greedy decoding with and without branches emits exactly greedy AR's tokens (I-DLM and R-ISD); sampled
decoding with branches follows the exact AR law (chi-square against the enumerated law of
tests/test_isd_distribution.py's model)."""

from __future__ import annotations

import pytest
import torch
from test_device_scripts import _load
from test_isd_distribution import MASK, PROMPT, V, ar_law, chi_square_pvalue
from test_isd_distribution import model as law_model  # noqa: F401  (the fixture)

from idlm.decoding.ar import ARDecoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams

branch = _load("branch_drafts")


def test_mask_groups_equal_causal_forwards(tiny_ar):
    model, tok, lora = tiny_ar
    mask = model.config.vocab_size - 1  # any id: the adapter's MASK embedding replaces it
    ctx, specs, k = [5, 9, 100, 33, 7], [81, 12, 40], 3
    drafter = branch.Drafter(model, None, lora, temperature=1.0)
    starts = [len(ctx) + k, len(ctx), len(ctx) + 1]  # after every spec; branches at the first two drafts
    guesses = [(len(ctx), 17), (len(ctx) + 2, 250)]  # a guessed correction at draft 0 and at draft 2
    p, q, _, (gq, _) = drafter.round(ctx, specs, starts, k, guesses)
    seq = ctx + specs
    with torch.no_grad():
        want_p = drafter.dist(model.logits(torch.tensor([seq]))[0, len(ctx) - 1:])
        assert torch.allclose(p, want_p, atol=1e-5)
        for g, s in enumerate(starts):
            ids = torch.tensor([seq[:s] + [mask] * k])
            on = torch.zeros_like(ids, dtype=torch.bool)
            on[0, s:] = True
            h = model(ids, lora=lora, lora_gate=on.float(), is_mask=on)[0, s:]
            assert torch.allclose(q[g], drafter.dist(model.compute_logits(h)), atol=1e-5), g
        for g, (s, t) in enumerate(guesses):  # the guessed token is a clean row (gate off), MASKs after it
            ids = torch.tensor([seq[:s] + [t] + [mask] * k])
            on = torch.zeros_like(ids, dtype=torch.bool)
            on[0, s + 1:] = True
            h = model(ids, lora=lora, lora_gate=on.float(), is_mask=on)[0, s:]
            assert torch.allclose(gq[g], drafter.dist(model.compute_logits(h)), atol=1e-5), g
            # its first row is the unchanged AR model's distribution of the token after the guess
            assert torch.allclose(gq[g][:1], drafter.dist(model.logits(torch.tensor([seq[:s] + [t]]))[0, -1:]),
                                  atol=1e-5)


@pytest.mark.parametrize("kind", ["isd", "risd"])
def test_greedy_with_and_without_branches_is_greedy_ar(kind, tiny, tiny_ar):
    model, tok, lora = tiny_ar if kind == "risd" else (*tiny, None)
    drafter = branch.Drafter(model, None if lora else tok.mask_token_id, lora, temperature=0.0)
    prompts = [tok.encode(t) for t in ("def fibonacci(n):", "The quick brown fox", "class Stack:\n")]
    want = generate(model, ARDecoder(), prompts, SamplingParams(temperature=0, max_tokens=40))
    forwards = {}
    stats: dict = {}
    # none, the first only, all, guessed corrections (emitted at once, deferred to the next round)
    for branches, guesses, defer in ((False, 0, 0), (1, 0, 0), (True, 0, 0), (True, 2, 0), (True, 2, 1)):
        g = torch.Generator().manual_seed(0)
        case = branches, guesses, defer
        forwards[case] = 0
        for pr, w in zip(prompts, want):
            out, f = branch.decode(drafter, pr, 4, 40, tok.eos_token_ids, branches, g, guesses,
                                   stats if guesses else None, bool(defer))
            assert out == w.token_ids, (kind, case)
            forwards[case] += f
        assert forwards[case] < sum(len(w.token_ids) for w in want)  # drafts were accepted
    assert forwards[True, 0, 0] <= forwards[False, 0, 0]
    assert forwards[True, 2, 0] <= forwards[True, 2, 1] <= forwards[True, 0, 0]
    assert sum(stats["rejected"]) >= sum(stats.get("matched", [0])) > 0  # some guesses met their correction
    with pytest.raises(ValueError, match="branches must be within 0..3"):
        branch.decode(drafter, prompts[0], 4, 8, tok.eos_token_ids, 4, torch.Generator())
    with pytest.raises(ValueError, match="guessed corrections go with a branch at every draft"):
        branch.decode(drafter, prompts[0], 4, 8, tok.eos_token_ids, 1, torch.Generator(), 1)


@pytest.mark.slow
@pytest.mark.parametrize("guesses,defer", [(0, False), (1, False), (1, True)])
def test_sampled_branches_follow_the_ar_law(law_model, guesses, defer):  # noqa: F811
    """5 tokens at T = 1, stride 2 (one draft a round, so rejections and their branches are frequent):
    the last two tokens' joint law against the exact AR law (x4 and x5 come after rounds that may have
    used a branch's draft or, with guesses, emitted a token drawn from a guessed correction's clean row)."""
    drafter = branch.Drafter(law_model, MASK, None, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros([V] * 2)
    rounds = {"tokens": 0, "forwards": 0}
    stats: dict = {}
    for _ in range(3000):
        out, f = branch.decode(drafter, PROMPT, 2, 5, frozenset(), True, g, guesses, stats, defer)
        counts[tuple(out[3:5])] += 1
        rounds["tokens"] += len(out)
        rounds["forwards"] += f
    law = ar_law(law_model, 1.0).sum(dim=(0, 1, 2))
    pvalue, chi2, df = chi_square_pvalue(counts, law)
    assert pvalue > 1e-3, (pvalue, chi2, df)
    assert 1.1 < rounds["tokens"] / rounds["forwards"] < 1.9  # drafts both accepted and rejected
    if guesses:
        assert 0 < sum(stats["matched"]) < sum(stats["rejected"])  # guessed corrections met and missed
