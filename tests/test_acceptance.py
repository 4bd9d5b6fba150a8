"""Speculative verification rules (`verify_drafts`) and the analytic TPF (SPEC §4.3, §7), tested directly.

Oracles: acceptance probabilities and correction distributions worked out by hand on tiny distributions;
an independent two-state Markov-chain derivation of TPF; and, for exactness, the law of the token emitted
at one draft position computed by enumeration (no sampling): the acceptance probability is read off
`verify_drafts` itself by bisecting on the uniform draw u, the correction is the one it returns, and
Σ_d P(draft d) · [P(accept | d) δ_d + P(reject | d) · correction_d] must equal p̃ for the exact rules and
differ from it for the reference release's biased rule (argmax draft tested with min(1, p̃/q̃), SPEC §10.1).
"""

from __future__ import annotations

import pytest
import torch

from idlm.decoding.acceptance import analytic_tpf, marginal_draft_acceptance, verify_drafts

P3 = [0.5, 0.3, 0.2]
Q3 = [0.2, 0.5, 0.3]


def run(p, drafts, q=None, point_mass=False, alpha=1.0, u=0.5, dtype=torch.float64):
    """verify_drafts on B rows of K drafts: p, q [B][K][V] (or [K][V] for one row), drafts/u [B][K] or [K]."""
    p = torch.as_tensor(p, dtype=dtype)
    if p.dim() == 2:
        p = p[None]
    B, K, _ = p.shape
    drafts = torch.as_tensor(drafts, dtype=torch.long).reshape(B, K)
    if q is not None:
        q = torch.as_tensor(q, dtype=dtype).reshape(p.shape)
    point_mass = torch.as_tensor(point_mass, dtype=torch.bool).expand(B).clone()
    alpha = torch.as_tensor(alpha, dtype=dtype).expand(B).clone()
    u = torch.as_tensor(u, dtype=dtype).expand(B, K).clone()
    return verify_drafts(p, drafts, q, point_mass, alpha, u)


def acceptance_probability(p, drafts, q, point_mass, alpha=1.0) -> torch.Tensor:
    """P(accept) of one draft per row [B], measured on verify_drafts: the sup of the u that accept (bisection)."""
    B = len(drafts)
    lo, hi = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        n, _ = run(p, drafts, q, point_mass, alpha, mid[:, None])
        lo, hi = torch.where(n == 1, mid, lo), torch.where(n == 1, hi, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------------------------------- analytic TPF


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_analytic_tpf_limits(n):
    assert analytic_tpf(1.0, n) == pytest.approx(n, abs=1e-12)  # every draft accepted: N per forward
    assert analytic_tpf(0.0, n) == pytest.approx(1.0, abs=1e-12)  # never accepted: C and V alternate, 1 each


@pytest.mark.parametrize("n,tpf", [(2, 1.82), (3, 2.44), (4, 2.92), (8, 4.09)])
def test_analytic_tpf_spec_values_at_p_0_9(n, tpf):
    assert round(analytic_tpf(0.9, n), 2) == tpf


@pytest.mark.parametrize("p", [0.13, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_analytic_tpf_equals_the_two_state_chain(p, n):
    """C commits 1 and moves to V; V with K = N−1 drafts commits j+1 and falls to C on a first rejection at j
    (prob p^j (1−p)), or commits N and stays in V (prob p^K). TPF = stationary mean commit per forward."""
    k = n - 1
    to_cold = 1 - p**k
    pi_v = 1 / (1 + to_cold)  # π_C = π_V · P(V → C), π_C + π_V = 1
    commit_v = sum(p**j * (1 - p) * (j + 1) for j in range(k)) + p**k * n
    assert analytic_tpf(p, n) == pytest.approx((1 - pi_v) * 1 + pi_v * commit_v, rel=1e-12)


@pytest.mark.parametrize("n", [1, 0, -3])
def test_analytic_tpf_rejects_stride_below_two(n):
    with pytest.raises(ValueError):
        analytic_tpf(0.5, n)


# --------------------------------------------------------------------------------- hand-built distributions


def test_sampled_draft_accepts_with_ratio_and_corrects_from_residual():
    # d = 1: min(1, .3/.5) = .6; residual max(0, p − q) = [.3, 0, 0] -> correction [1, 0, 0]
    n, corr = run([[P3]] * 2, [1, 1], [[Q3]] * 2, u=[[0.599], [0.601]])
    assert n.tolist() == [1, 0]
    assert torch.allclose(corr[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    # d = 2: min(1, .2/.3) = 2/3; d = 0: min(1, .5/.2) = 1 (accepted even at u close to 1)
    n, _ = run([[P3]] * 3, [2, 2, 0], [[Q3]] * 3, u=[[0.666], [0.667], [0.9999]])
    assert n.tolist() == [1, 0, 1]
    assert acceptance_probability([[P3]] * 3, [0, 1, 2], [[Q3]] * 3, False).tolist() == pytest.approx([1, 0.6, 2 / 3])


def test_argmax_draft_accepts_with_p_and_corrects_from_p_without_the_draft():
    # point mass q = δ_d: accept with p(d); correction = p with d removed, renormalised. A q passed for a
    # point-mass row is ignored, and q = None is allowed when every row is point mass.
    for q in (None, [[Q3]] * 4):
        n, corr = run([[P3]] * 4, [1, 1, 0, 0], q, point_mass=True, u=[[0.299], [0.301], [0.499], [0.501]])
        assert n.tolist() == [1, 0, 1, 0]
        assert torch.allclose(corr[1], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7], dtype=torch.float64))
        assert torch.allclose(corr[3], torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
        a = acceptance_probability([[P3]] * 3, [0, 1, 2], None if q is None else q[:3], True)
        assert a.tolist() == pytest.approx(P3)


def test_alpha_below_one_raises_acceptance_to_ratio_over_alpha():
    p, q = [[[0.5, 0.3, 0.2]]] * 4, [[[0.1, 0.8, 0.1]]] * 4
    # sampled: min(1, .3 / (alpha · .8)) = .375 at alpha 1, .75 at alpha .5, 1 at alpha .25
    got = acceptance_probability(p[:3], [1, 1, 1], q[:3], False, alpha=[1.0, 0.5, 0.25])
    assert got.tolist() == pytest.approx([0.375, 0.75, 1.0])
    # argmax: min(1, .3 / alpha) = .3, .6, 1
    got = acceptance_probability(p[:3], [1, 1, 1], q[:3], True, alpha=[1.0, 0.5, 0.25])
    assert got.tolist() == pytest.approx([0.3, 0.6, 1.0])
    # alpha changes acceptance only, not the correction
    _, c1 = run(p[:2], [1, 1], q[:2], [False, True], alpha=1.0, u=1.0)
    _, c2 = run(p[:2], [1, 1], q[:2], [False, True], alpha=0.5, u=1.0)
    assert torch.equal(c1, c2)
    assert torch.allclose(c1[0], torch.tensor([4 / 5, 0.0, 1 / 5], dtype=torch.float64))  # max(0, p − q) = [.4, 0, .1]


def test_stops_at_the_first_rejection():
    # three drafts, all token 0, accepted (argmax rule) with p_j(0) = .5, .6, .7
    p = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1]]
    patterns = {  # u per draft -> (leading accepts, position whose correction is returned)
        (0.1, 0.1, 0.1): 3,
        (0.9, 0.1, 0.1): 0,  # reject, accept, accept: nothing after the first rejection counts
        (0.1, 0.9, 0.1): 1,  # accept, reject, accept
        (0.1, 0.1, 0.9): 2,
        (0.9, 0.9, 0.1): 0,
    }
    u = list(patterns)
    n, corr = run([p] * len(u), [[0, 0, 0]] * len(u), None, point_mass=True, u=u)
    assert n.tolist() == list(patterns.values())
    for row, j in enumerate(patterns.values()):
        if j < 3:
            expected = torch.tensor(p[j], dtype=torch.float64)
            expected[0] = 0
            assert torch.allclose(corr[row], expected / expected.sum()), (u[row], corr[row])
    # the same with sampled drafts: q_j(0) = .8 makes the ratios .625, .75, .875
    q = [[0.8, 0.1, 0.1]] * 3
    n, _ = run([p] * 3, [[0, 0, 0]] * 3, [q] * 3, u=[(0.62, 0.74, 0.88), (0.63, 0.1, 0.1), (0.1, 0.76, 0.1)])
    assert n.tolist() == [2, 0, 1]


@pytest.mark.parametrize("point_mass", [True, False])
def test_greedy_accepts_iff_draft_is_the_argmax(point_mass):
    # T = 0: p̃ and q̃ are one-hot; accept iff d = argmax p, else the correction is argmax p
    p = torch.zeros(4, 1, 5, dtype=torch.float64)
    p[:, 0, 3] = 1
    drafts = [3, 3, 0, 4]
    q = torch.nn.functional.one_hot(torch.tensor(drafts), 5).double()[:, None]
    n, corr = run(p, drafts, q, point_mass, u=[[0.0], [0.999999], [0.0], [1e-9]])
    assert n.tolist() == [1, 1, 0, 0]
    assert torch.equal(corr[2:], p[2:, 0])


def test_rows_with_mixed_modes_equal_each_row_alone():
    g = torch.Generator().manual_seed(0)
    B, K, V = 8, 3, 5
    p = torch.softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64) * 2, -1)
    drafts = torch.randint(0, V, (B, K), generator=g)
    point_mass = torch.tensor([True, False] * (B // 2))
    alpha = torch.tensor([1.0, 1.0, 0.5, 0.7] * (B // 4), dtype=torch.float64)
    u = torch.rand(B, K, generator=g, dtype=torch.float64) * 0.8
    n, corr = verify_drafts(p, drafts, q, point_mass, alpha, u)
    assert len(set(n.tolist())) > 1  # the batch mixes outcomes
    for b in range(B):
        nb, cb = verify_drafts(p[b:b + 1], drafts[b:b + 1], q[b:b + 1], point_mass[b:b + 1], alpha[b:b + 1], u[b:b + 1])
        assert nb.item() == n[b].item()
        assert torch.allclose(cb[0], corr[b], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------ exactness by enumeration


def emitted_law(p: torch.Tensor, q: torch.Tensor, draft_law: torch.Tensor, point_mass: bool,
                alpha: float = 1.0) -> torch.Tensor:
    """Law of the token emitted at one draft position: Σ_d draft_law(d) [a_d δ_d + (1 − a_d) correction_d]."""
    V = p.numel()
    support = [d for d in range(V) if draft_law[d] > 0]
    rows_p, rows_q = [[p.tolist()]] * len(support), [[q.tolist()]] * len(support)
    a = acceptance_probability(rows_p, support, rows_q, point_mass, alpha=alpha)
    _, corr = run(rows_p, support, rows_q, point_mass, alpha, u=1.0)  # u = 1 forces the rejection path
    law = torch.zeros(V, dtype=torch.float64)
    for i, d in enumerate(support):
        law += draft_law[d] * (1 - a[i]) * corr[i]
        law[d] += draft_law[d] * a[i]
    return law


def random_pq(seed: int, V: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    if seed % 3 == 1:  # truncated laws (top-k): zeros in p, and a q with a different support
        p[p.argsort()[:2]] = 0
        q[q.argsort()[:1]] = 0
        p, q = p / p.sum(), q / q.sum()
    return p, q


SEEDS = list(range(9))


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_rule_emits_exactly_p(seed):
    p, q = random_pq(seed)
    law = emitted_law(p, q, draft_law=q, point_mass=False)
    assert torch.allclose(law, p, atol=1e-6, rtol=0), (law, p)


@pytest.mark.parametrize("seed", SEEDS)
def test_argmax_rule_emits_exactly_p(seed):
    p, q = random_pq(seed)
    d = int(q.argmax())
    law = emitted_law(p, q, draft_law=torch.nn.functional.one_hot(torch.tensor(d), len(p)).double(), point_mass=True)
    assert torch.allclose(law, p, atol=1e-6, rtol=0), (law, p)


def test_exact_rules_when_draft_law_equals_target():
    # p = q: every draft accepted, residual empty (the fallback correction is never used)
    p, _ = random_pq(0)
    assert torch.allclose(emitted_law(p, p, p, point_mass=False), p, atol=1e-12)
    a = acceptance_probability([[p.tolist()]] * 5, list(range(5)), [[p.tolist()]] * 5, False)
    assert a.tolist() == pytest.approx([1.0] * 5, abs=1e-15)


def test_reference_argmax_ratio_rule_is_biased():
    # by hand: d = argmax q = 1 accepted with min(1, .3/.5) = .6, else [1, 0, 0]: law [.4, .6, 0] instead of p
    p, q = torch.tensor(P3, dtype=torch.float64), torch.tensor(Q3, dtype=torch.float64)
    delta = torch.nn.functional.one_hot(q.argmax(), 3).double()
    law = emitted_law(p, q, draft_law=delta, point_mass=False)
    assert torch.allclose(law, torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64))
    for seed in SEEDS:
        p, q = random_pq(seed)
        delta = torch.nn.functional.one_hot(q.argmax(), len(p)).double()
        law = emitted_law(p, q, draft_law=delta, point_mass=False)
        assert (law - p).abs().max() > 1e-3, seed


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_alpha_below_one_is_lossy(seed):
    p, q = random_pq(seed)
    assert (emitted_law(p, q, draft_law=q, point_mass=False, alpha=0.5) - p).abs().max() > 1e-3
    d = int(q.argmax())
    delta = torch.nn.functional.one_hot(torch.tensor(d), len(p)).double()
    if p[d] < 1:
        assert (emitted_law(p, q, draft_law=delta, point_mass=True, alpha=0.5) - p).abs().max() > 1e-3


def test_marginal_draft_acceptance_closed_forms():
    w = torch.tensor([0.5, 0.3, 0.2])
    same = torch.tensor([0.1, 0.6, 0.3]).expand(3, 3)
    assert marginal_draft_acceptance(w, same).item() == pytest.approx(1.0)
    disjoint = torch.eye(3)  # c decides the next token outright: a blind draft is right with Σ w²
    assert marginal_draft_acceptance(w, disjoint).item() == pytest.approx(0.25 + 0.09 + 0.04)
    batched = marginal_draft_acceptance(torch.stack([w, w]), torch.stack([same, disjoint]))
    assert batched.tolist() == pytest.approx([1.0, 0.38])


def _blind_draft_step(seed: int, K: int, V: int, n: int):
    """n simulated ISD steps with the decoders' own rule: c ~ w, a draft d ~ q̃ (the marginal Σ w_c p̃_c) drawn
    without seeing c, verified by verify_drafts against p̃_c. Returns w, p̃ [K, V], q̃, p̃_c per step, d,
    n_accepted and the correction distributions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(K, generator=g), -1)
    p_next = torch.softmax(2 * torch.randn(K, V, generator=g), -1)
    q = (w[:, None] * p_next).sum(0)
    c = torch.multinomial(w, n, replacement=True, generator=g)
    d = torch.multinomial(q, n, replacement=True, generator=g)
    p = p_next[c]
    n_acc, corr = verify_drafts(p[:, None], d[:, None], q.expand(n, 1, V), torch.zeros(n, dtype=torch.bool),
                                torch.ones(n), torch.rand(n, 1, generator=g))
    return w, p_next, q, p, d, n_acc, corr


def test_marginal_draft_acceptance_is_what_verification_accepts():
    n = 200_000
    w, p_next, *_, n_acc, _ = _blind_draft_step(0, 4, 7, n)
    rate = n_acc.float().mean().item()
    want = marginal_draft_acceptance(w, p_next).item()
    assert abs(rate - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-9
    assert want < 0.95  # a case where not seeing c costs something


def test_marginal_draft_alpha_is_the_mean_ratio_of_what_the_slot_emits():
    """Emit the accepted draft or a correction drawn from verify_drafts' residual, and score the emitted token
    with α's ratio against the distribution it came from."""
    from idlm.decoding.acceptance import marginal_draft_alpha

    n, V = 200_000, 6
    w, p_next, q, p, d, n_acc, corr = _blind_draft_step(1, 3, V, n)
    x = torch.where(n_acc == 1, d, torch.multinomial(corr, 1, generator=torch.Generator().manual_seed(2)).squeeze(-1))
    q_emit = torch.where(n_acc[:, None] == 1, q.expand(n, V), corr)  # the distribution x was drawn from
    ratio = (p.gather(-1, x[:, None]) / q_emit.gather(-1, x[:, None])).clamp(max=1.0).squeeze(-1)
    want = marginal_draft_alpha(w, p_next).item()
    assert abs(ratio.mean().item() - want) < 4 * ratio.std().item() / n ** 0.5
    assert want < 0.95  # not a case where every ratio is 1
    assert marginal_draft_alpha(w, torch.tensor([0.2, 0.3, 0.1, 0.1, 0.2, 0.1]).expand(3, V)).item() == \
        pytest.approx(1.0)  # c does not matter: the draft is p̃ itself


def test_best_blind_draft_acceptance_closed_forms_and_the_marginal_below_it():
    from idlm.decoding.acceptance import best_blind_draft_acceptance

    w = torch.tensor([0.5, 0.3, 0.2])
    assert best_blind_draft_acceptance(w, torch.eye(3)).item() == pytest.approx(0.5, abs=1e-6)  # max_c w_c
    assert best_blind_draft_acceptance(w, torch.tensor([0.1, 0.6, 0.3]).expand(3, 3)).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(3)
    ws = torch.softmax(torch.randn(50, 5, generator=g), -1)
    ps = torch.softmax(3 * torch.randn(50, 5, 9, generator=g), -1)
    best, marginal = best_blind_draft_acceptance(ws, ps), marginal_draft_acceptance(ws, ps)
    assert (best >= marginal - 1e-6).all() and (best <= 1 + 1e-6).all()


def test_best_blind_draft_acceptance_is_the_maximum_over_every_draft_distribution():
    """Brute force over a fine grid of the 3-token simplex."""
    from idlm.decoding.acceptance import best_blind_draft_acceptance

    g = torch.Generator().manual_seed(4)
    steps = 200
    a, b = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = a + b <= steps
    grid = torch.stack([a[keep], b[keep], steps - a[keep] - b[keep]], -1).double() / steps  # [G, 3] every q̃
    for _ in range(5):
        w = torch.softmax(torch.randn(4, generator=g), -1).double()
        p = torch.softmax(2 * torch.randn(4, 3, generator=g), -1).double()
        brute = (w[None, :] * torch.minimum(p[None], grid[:, None]).sum(-1)).sum(-1).max().item()
        got = best_blind_draft_acceptance(w, p).item()
        assert brute - 1e-9 <= got <= brute + 3 / steps  # the grid's maximum lies within one step of the true one


# ------------------------------------------------------------------------------------ block verification
#
# Oracle: the law of AR sampling from the target. A "tree" of target conditionals p(·|prefix) over V = 3
# tokens; drafts d_1..d_K drawn from q (ISD's drafts: one q̃ per position, blind to the drafts before it, or
# conditionals of the prefix as a draft model's); each sample verifies its drafts, emits the accepted prefix
# and the token after it (correction or bonus) and continues from the target to K + 1 tokens. The counts of
# those K + 1 tokens must fit the target's joint law (chi-square), with no sample anywhere else.

BV_V = 3


def bv_tree(seed: int, K: int, blind: bool):
    """Target conditionals P[L] [V^L, V] (prefixes of length L = 0..K) and draft laws Q[L] alike; blind: the
    draft law of position L is the same for every prefix (ISD's MASK slots)."""
    g = torch.Generator().manual_seed(seed)

    def laws(n):  # peaked and flat laws mixed (gamma(0.5)-like via squared normals)
        x = torch.randn(n, BV_V, generator=g, dtype=torch.float64) ** 2 + 1e-3
        return x / x.sum(-1, keepdim=True)

    P = [laws(BV_V ** L) for L in range(K + 1)]
    Q = [laws(1).expand(BV_V ** L, BV_V).clone() if blind else laws(BV_V ** L) for L in range(K + 1)]
    return P, Q


def bv_sample(P, Q, K: int, n: int, seed: int, block: bool, verify=None):
    """n samples of K + 1 tokens (each sample's code in base V) through verify_drafts; also the accepted counts.
    verify: the rule to call (default verify_drafts), so a wrong rule can be run through the same test."""
    verify = verify or verify_drafts
    g = torch.Generator().manual_seed(seed)
    code = torch.zeros(n, dtype=torch.long)
    drafts, p, q = [], [], []
    for L in range(K):  # drafts from q, the target's conditionals at each draft prefix
        qL = Q[L][code]
        d = torch.multinomial(qL, 1, generator=g).squeeze(1)
        drafts.append(d)
        p.append(P[L][code])
        q.append(qL)
        code = code * BV_V + d
    drafts, p, q = torch.stack(drafts, 1), torch.stack(p, 1), torch.stack(q, 1)
    u = torch.rand(n, K, generator=g, dtype=torch.float64)
    n_acc, corr = verify(p, drafts, q, torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.float64), u,
                         torch.ones(n, dtype=torch.bool) if block else None)
    # the emitted tokens: the accepted prefix, then the correction (or the bonus after all K), then the target
    out = torch.zeros(n, dtype=torch.long)
    for L in range(K):
        out = torch.where(n_acc > L, out * BV_V + drafts[:, L], out)
    # the token after the accepted prefix: the bonus after all K, else the correction
    after = torch.where((n_acc == K)[:, None], P[K][torch.where(n_acc == K, out, 0)], corr)
    out = out * BV_V + torch.multinomial(after, 1, generator=g).squeeze(1)
    length = n_acc + 1
    for L in range(1, K + 1):  # rows that emitted L tokens so far continue from the target
        here = length == L
        cont = torch.multinomial(P[L][torch.where(here, out, 0)], 1, generator=g).squeeze(1)
        out, length = torch.where(here, out * BV_V + cont, out), length + here.long()
    return out, n_acc


def bv_joint(P, K: int) -> torch.Tensor:
    """The target's joint law of K + 1 tokens [V^(K+1)], in the samples' coding."""
    law = P[0][0]
    for L in range(1, K + 1):
        law = (law[:, None] * P[L]).reshape(-1)
    return law


@pytest.mark.parametrize("seed,blind", [(0, True), (1, False), (2, True), (3, False)])
def test_block_verification_emits_the_target_law(seed, blind):
    from test_isd_distribution import chi_square_pvalue

    K, n = 3, 200_000
    P, Q = bv_tree(seed, K, blind)
    out, _ = bv_sample(P, Q, K, n, seed=10 + seed, block=True)
    counts = torch.bincount(out, minlength=BV_V ** (K + 1))
    pvalue, chi2, df = chi_square_pvalue(counts, bv_joint(P, K))
    assert pvalue > 1e-3, (pvalue, chi2, df)


def test_the_block_law_test_fails_a_wrong_rule():
    """The same test on a rule that forgets the weight w_i in the residual (corrections from max(0, p̃ − q̃)):
    a biased law, rejected — the test can fail."""
    from test_isd_distribution import chi_square_pvalue

    import idlm.decoding.acceptance as acc

    def unweighted(p, drafts, q, point_mass, alpha, u, block=None, k_row=None):
        n_acc, _ = verify_drafts(p, drafts, q, point_mass, alpha, u, block, k_row)
        rows, j = torch.arange(len(p)), n_acc.clamp(max=p.shape[1] - 1)
        r = (p[rows, j] - q[rows, j]).clamp_min(0)
        return n_acc, torch.where(r.sum(-1, keepdim=True) > 0, r / r.sum(-1, keepdim=True).clamp_min(1e-30),
                                  p[rows, j])

    assert acc.verify_drafts is verify_drafts
    K = 3
    P, Q = bv_tree(1, K, True)
    out, _ = bv_sample(P, Q, K, 200_000, seed=1, block=True, verify=unweighted)
    pvalue, _, _ = chi_square_pvalue(torch.bincount(out, minlength=BV_V ** (K + 1)), bv_joint(P, K))
    assert pvalue < 1e-6


@pytest.mark.parametrize("seed", [1, 5, 6])
def test_block_verification_accepts_more_drafts_than_token_verification(seed):
    """The same drafts and uniforms: more drafts accepted on average (the rule's optimality; here +6%, +11%
    and +24% by the 200,000 samples), and token verification's samples fit the same law (the harness is
    sound for it too)."""
    from test_isd_distribution import chi_square_pvalue

    K, n = 3, 200_000
    P, Q = bv_tree(seed, K, True)
    out, n_token = bv_sample(P, Q, K, n, seed=seed, block=False)
    _, n_block = bv_sample(P, Q, K, n, seed=seed, block=True)
    gain = (n_block - n_token).double()
    assert gain.mean() > 10 * gain.std() / n ** 0.5, gain.mean()
    pvalue, chi2, df = chi_square_pvalue(torch.bincount(out, minlength=BV_V ** (K + 1)), bv_joint(P, K))
    assert pvalue > 1e-3, (pvalue, chi2, df)


def test_block_verification_of_one_draft_is_token_verification():
    g = torch.Generator().manual_seed(5)
    B, V = 64, 7
    p = torch.softmax(torch.randn(B, 1, V, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(B, 1, V, generator=g, dtype=torch.float64) * 2, -1)
    drafts, u = torch.multinomial(q[:, 0], 1, generator=g), torch.rand(B, 1, generator=g, dtype=torch.float64)
    pm, alpha = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.float64)
    n_t, c_t = verify_drafts(p, drafts, q, pm, alpha, u)
    n_b, c_b = verify_drafts(p, drafts, q, pm, alpha, u, torch.ones(B, dtype=torch.bool))
    assert torch.equal(n_t, n_b) and len(set(n_t.tolist())) == 2
    rejected = n_t == 0
    assert torch.allclose(c_t[rejected], c_b[rejected], atol=1e-12, rtol=0)


@pytest.mark.parametrize("point_mass", [True, False])
def test_block_verification_of_greedy_rows_is_token_verification(point_mass):
    """One-hot p̃ and q̃ (greedy): the accepted prefix is the drafts' agreement with the argmaxes, as token
    verification, and the correction is the argmax after it."""
    g = torch.Generator().manual_seed(6)
    B, K, V = 200, 4, 3
    p = torch.nn.functional.one_hot(torch.randint(0, V, (B, K), generator=g), V).double()
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.7, p.argmax(-1), torch.randint(0, V, (B, K), generator=g))
    q = torch.nn.functional.one_hot(drafts, V).double()
    u = torch.rand(B, K, generator=g, dtype=torch.float64)
    args = (p, drafts, None if point_mass else q, torch.full((B,), point_mass), torch.ones(B, dtype=torch.float64), u)
    n_t, c_t = verify_drafts(*args)
    n_b, c_b = verify_drafts(*args, torch.ones(B, dtype=torch.bool))
    assert torch.equal(n_t, n_b) and len(set(n_t.tolist())) == K + 1
    assert torch.equal(c_t[n_t < K], c_b[n_t < K])


def test_block_rows_of_their_own_k_equal_a_call_at_that_k():
    """k_row: a row whose own K is k (drafts past it padded) gets what a call with K = k gives, from the same
    uniform columns (the adaptive stride's rows of several N in one step)."""
    g = torch.Generator().manual_seed(7)
    B, K, V = 300, 4, 5
    p = torch.softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64) * 2, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    u = torch.rand(B, K, generator=g, dtype=torch.float64)
    pm, block = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    alpha = torch.ones(B, dtype=torch.float64)
    k_row = torch.randint(1, K + 1, (B,), generator=g)
    pad = torch.arange(K)[None, :] >= k_row[:, None]  # what a shorter row's padding holds is never read
    drafts_p, q_p = drafts.masked_fill(pad, 0), q.masked_fill(pad[..., None], 0.0)
    n_all, c_all = verify_drafts(p, drafts_p, q_p, pm, alpha, u, block, k_row)
    for k in range(1, K + 1):
        rows = k_row == k
        n_k, c_k = verify_drafts(p[rows, :k], drafts[rows, :k], q[rows, :k], pm[rows], alpha[rows], u[rows, :k],
                                 block[rows])
        assert torch.equal(n_all[rows], n_k)
        short = n_k < k
        assert torch.allclose(c_all[rows][short], c_k[short], atol=1e-12, rtol=0)
