"""Speculative verification as pure functions (SPEC §4.3, §7), shared by the decoders and the engine.

All functions are batched: row b is one request, with its own draft mode and alpha. Nothing here
touches a model or a cache, so each rule is tested directly (tests/test_acceptance.py).
"""

from __future__ import annotations

import torch


def verify_drafts(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, point_mass: torch.Tensor,
                  alpha: torch.Tensor, u: torch.Tensor, block: torch.Tensor | None = None,
                  k_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification of K drafts per row: token by token, left to right, stopping at the first rejection, or
    (the rows of `block`) the whole block jointly (`block_verify`).

    p          [B, K, V]  p̃_j, the target distribution at the position of draft j
    drafts     [B, K]     the drafted tokens d_j
    q          [B, K, V]  q̃_j, the distribution each draft was drawn from (may be None if all rows are point mass)
    point_mass [B] bool   the draft was the deterministic argmax (q = δ_d) rather than a sample from q̃
    alpha      [B]        verify_alpha (1 = exact)
    u          [B, K]     U[0, 1) draws
    Returns (n_accepted [B] in 0..K, correction [B, V]): the distribution to draw the correction from
    at draft n_accepted when n_accepted < K (unused otherwise):
      sampled drafts: accept with min(1, p̃(d) / (alpha·q̃(d))), correction ∝ max(0, p̃ − q̃)
      argmax drafts:  accept with min(1, p̃(d) / alpha),        correction ∝ max(0, p̃ − δ_d)
                      (= p̃ with d removed, renormalised)
    Both make every emitted token distributed as p̃ when alpha = 1 (standard speculative sampling).
    block      [B] bool   rows verified by `block_verify` instead (None: none); only exact rows (alpha = 1)
                          may be: the block rule has no relaxed form
    k_row      [B]        each row's own K <= K (None: all K), read by the block rows only (the caller cuts a
                          token row's n_accepted to it: token verification is prefix-wise)
    """
    B, K, V = p.shape
    onehot = torch.zeros_like(p).scatter_(-1, drafts[..., None], 1.0)
    if q is None:
        qq = onehot
    else:
        qq = torch.where(point_mass[:, None, None], onehot, q)
    pd = p.gather(-1, drafts[..., None]).squeeze(-1)  # [B, K]
    qd = qq.gather(-1, drafts[..., None]).squeeze(-1)
    accept_prob = (pd / (alpha[:, None] * qd).clamp_min(1e-30)).clamp(max=1.0)
    accepted = u < accept_prob
    n_acc = accepted.long().cumprod(-1).sum(-1)  # leading accepted drafts
    j = n_acc.clamp(max=K - 1)
    rows = torch.arange(B, device=p.device)
    resid = (p[rows, j] - qq[rows, j]).clamp_min(0.0)
    mass = resid.sum(-1, keepdim=True)
    correction = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p[rows, j])
    if block is None:
        return n_acc, correction
    n_blk, corr_blk = block_verify(p, qq, pd / qd.clamp_min(1e-30), u, k_row)
    return torch.where(block, n_blk, n_acc), torch.where(block[:, None], corr_blk, correction)


def block_verify(p: torch.Tensor, q: torch.Tensor, ratio: torch.Tensor, u: torch.Tensor,
                 k_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block verification (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR 2025): a
    row's K drafts verified jointly. Exact like token verification (every emitted token is distributed as AR
    sampling from p̃) and, in expectation, it accepts at least as many drafts: the most any verification
    that sees these distributions can (the paper's optimality result). Token verification drops the rest of
    the block at the first draft whose ratio p̃/q̃ falls below its uniform; this rule carries a running weight
    of the accepted prefix and may accept past such a draft.

    p, q  [B, K, V]  p̃_i and q̃_i at draft i (q: one-hot rows for argmax drafts)
    ratio [B, K]     p̃_i(d_i) / q̃_i(d_i)
    u     [B, K]     U[0, 1) draws (the columns token verification uses)
    k_row [B]        each row's own K (None: K): its drafts past that are ignored
    Returns (n_accepted [B] in 0..K, correction [B, V]: the law of the token after the accepted prefix when
    n_accepted < the row's K).

    The rule: w_0 = 1, w_i = min(1, w_{i−1}·ratio_{i−1}) (the weight of the first i drafts); after i accepted
    drafts the residual is r_i = max(0, w_i·p̃_i − q̃_i), of mass S_i; the row may stop after i drafts with
    h_i = S_i / (S_i + 1 − w_i) for 0 < i < K, h_K = w_K. n_accepted is the largest i whose u_{i−1} < h_i (0
    if none) and the token after it is drawn from r_i / S_i (after all K: from p̃_K, the caller's bonus).
    K = 1 is token verification; with one-hot p̃ and q̃ (greedy) it accepts the same prefix. Tested by a
    chi-square fit of sampled blocks to the AR law (tests/test_acceptance.py)."""
    B, K, V = p.shape
    weights = [torch.ones_like(ratio[:, 0])]
    for i in range(K):  # w_1 .. w_K (K is a small constant: unrolled)
        weights.append(torch.clamp(weights[-1] * ratio[:, i], max=1.0))
    w = torch.stack(weights, 1)  # [B, K+1]: w_0 .. w_K
    resid = (w[:, :K, None] * p - q).clamp_min(0.0)  # [B, K, V]: r_i at index i
    mass = resid.sum(-1)  # [B, K]: S_i
    h = torch.where(mass > 0, mass / (mass + 1.0 - w[:, :K]).clamp_min(1e-30), torch.zeros_like(mass))
    stop = torch.arange(1, K + 1, device=p.device)  # [K]: stopping after i = 1..K drafts
    kb = stop[-1:].expand(B) if k_row is None else k_row  # [B]
    h_next = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], 1)  # h_i at column i − 1 (i < K)
    h_stop = torch.where(stop[None] < kb[:, None], h_next,
                         torch.where(stop[None] == kb[:, None], w[:, 1:], torch.zeros_like(h_next)))
    n_acc = torch.where(u < h_stop, stop[None], 0).amax(-1)  # [B]: the last stop that fired
    rows = torch.arange(B, device=p.device)
    j = n_acc.clamp(max=K - 1)
    r, s = resid[rows, j], mass[rows, j, None]
    return n_acc, torch.where(s > 0, r / s.clamp_min(1e-30), p[rows, j])


def analytic_tpf(p: float, n: int) -> float:
    """Expected tokens per forward of ISD with stride n and i.i.d. per-draft acceptance p (SPEC §7):
    TPF = (2 + p + … + p^(n−2)) / (2 − p^(n−1))."""
    if n < 2:
        raise ValueError("stride must be >= 2")
    return (2 + sum(p**i for i in range(1, n - 1))) / (2 - p ** (n - 1))


def marginal_draft_acceptance(weights: torch.Tensor, p_next: torch.Tensor) -> torch.Tensor:
    """How often a draft that cannot see the token before it is accepted, at best (docs/training.md).

    ISD drafts the token at P+2 in the forward that samples c for P+1, so the draft's q̃ cannot depend on c.
    With c ~ weights and the verifier's p̃_c = p_next[c], the draft drawn from the marginal
    q̃ = Σ_c w_c p̃_c is accepted with probability Σ_c w_c Σ_y min(p̃_c(y), q̃(y)) = E_c[1 − TV(p̃_c, q̃)].
    weights [..., K] (summing to 1), p_next [..., K, V] -> [...]. Equal p̃_c give 1; disjoint point
    masses give Σ_c w_c².
    """
    q = (weights[..., None] * p_next).sum(-2, keepdim=True)  # [..., 1, V]
    return (weights * torch.minimum(p_next, q).sum(-1)).sum(-1)


def marginal_draft_alpha(weights: torch.Tensor, p_next: torch.Tensor) -> torch.Tensor:
    """α's ratio (SPEC §7) for the token such a draft slot emits, in expectation: the accepted draft d ~ q̃
    scores min(1, p̃_c(d)/q̃(d)); after a rejection (probability Z_c = TV(p̃_c, q̃)) the correction
    x ~ max(0, p̃_c − q̃)/Z_c scores min(1, p̃_c(x)·Z_c/(p̃_c(x) − q̃(x))). Same shapes as
    `marginal_draft_acceptance`. With stride 2 every V forward (or V then C after a rejection) emits one
    such token and one drawn from p̃ (ratio 1), so that decoding's α is (1 + this)/2."""
    q = (weights[..., None] * p_next).sum(-2, keepdim=True)  # [..., 1, V]
    accepted = torch.minimum(p_next, q) * (p_next / q.clamp_min(1e-30)).clamp(max=1.0)
    resid = (p_next - q).clamp_min(0.0)  # [..., K, V]
    z = resid.sum(-1, keepdim=True)
    corrected = resid * (p_next * z / resid.clamp_min(1e-30)).clamp(max=1.0)
    return (weights * (accepted + torch.where(resid > 0, corrected, 0.0)).sum(-1)).sum(-1)


def best_blind_draft_acceptance(weights: torch.Tensor, p_next: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """The most any draft distribution q̃ that cannot see c can be accepted: max over q̃ of
    Σ_c w_c Σ_y min(p̃_c(y), q̃(y)) — at least `marginal_draft_acceptance` (the marginal is one q̃; a drafter
    trained by cross-entropy learns it), sometimes more (disjoint point masses: max_c w_c against Σ w_c²).

    By LP duality the maximum is min over λ ∈ [0, 1] of λ + Σ_y max_t (f_y(t) − λt), f_y(t) = Σ_c w_c min(p̃_c(y), t)
    concave and piecewise linear with slope Σ_c w_c [p̃_c(y) > t]: the inner max sits at the largest p̃_c(y) (in
    descending order, k-th) whose cumulative weight W_k reaches λ, worth (W_k − λ)·p̃_(k)(y) + Σ_{i>k} w_(i) p̃_(i)(y).
    The outer function is convex in λ: a ternary search of `iters` steps. weights [..., K], p_next [..., K, V] -> [...].
    """
    v, order = p_next.sort(-2, descending=True)  # [..., K, V] each column descending over c
    w = weights[..., None].expand_as(p_next).gather(-2, order)  # the weights in that order
    cum_w = w.cumsum(-2)  # W_k
    tail = (w * v).flip(-2).cumsum(-2).flip(-2) - w * v  # Σ_{i>k} w_(i) v_(i)

    def dual(lam: torch.Tensor) -> torch.Tensor:  # lam [...] -> [...]
        k = (cum_w < lam[..., None, None]).sum(-2, keepdim=True).clamp(max=v.shape[-2] - 1)  # first W_k >= λ
        inner = ((cum_w.gather(-2, k) - lam[..., None, None]) * v.gather(-2, k) + tail.gather(-2, k)).clamp_min(0)
        return lam + inner.squeeze(-2).sum(-1)

    lo, hi = torch.zeros_like(weights[..., 0]), torch.ones_like(weights[..., 0])
    for _ in range(iters):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = dual(a) < dual(b)
        lo, hi = torch.where(left, lo, a), torch.where(left, b, hi)
    return dual((lo + hi) / 2)
