"""Training objectives: AR next-token loss, introspective-consistency loss (SPEC §3), the R-ISD
drafter loss (SPEC §5) and the SDAR-style baseline loss (SPEC §3.5).

A batch is a window of the token stream, tokens [B, L+1] and lossmask [B, L+1] (1 = a response
token the model should learn to produce; `idlm.data.shards`). x0 = tokens[:, :L]; position i's
target is tokens[:, i+1], counted where lossmask[:, i+1].

The diffusion objectives run one forward over [x_t | x0] (length 2L, both halves at positions
0..L−1) under the masks of `idlm.training.masks`, and compute logits only where a loss is taken.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from idlm.layers.attention import DenseAttention, FlexAttentionBackend, sdpa
from idlm.training.masks import dense_mask, flex_block_mask, idlm_mask_fn, sdar_mask_fn


@lru_cache(maxsize=16)
def _cached_mask(kind: str, L: int, block: int, device: str, impl: str, rows: int | None = None):
    fn = (idlm_mask_fn if kind == "idlm" else sdar_mask_fn)(L, block)
    if impl == "flex":
        return FlexAttentionBackend(flex_block_mask(fn, 2 * L, device=device, rows=rows))
    return DenseAttention(dense_mask(fn, 2 * L, device=device, rows=rows))


@torch.compiler.disable  # in a compiled step: called as Python (its cache holds), not traced into each step
def pair_attention(kind: str, L: int, block: int, device: torch.device, impl: str = "auto",
                   xt_only: bool = False):
    """The attention backend for a [x_t | x0] forward: FlexAttention on CUDA, explicit-mask SDPA elsewhere.
    xt_only: the mask's x_t rows alone (queries 0..L−1 against all 2L keys), for `XtOverX0`."""
    if impl == "auto":
        impl = "flex" if device.type == "cuda" else "sdpa"
    return _cached_mask(kind, L, block, str(device), impl, L if xt_only else None)


class RecordKV:
    """Causal attention (a plain forward) that keeps every layer's keys and values: the x0 half's, which
    the x_t half then attends to (`XtOverX0`)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v):
        self.k[layer], self.v[layer] = k, v
        return sdpa(q, k, v, None, is_causal=True)


class XtOverX0:
    """The x_t half's attention in a [x_t | x0] forward run as two: its own keys first, then the x0 half's
    recorded by a clean forward (`RecordKV`), under the pair mask's x_t rows — the same keys, values and
    mask each x_t query has in the joint forward (x0 never attends to x_t, so its half is a plain causal
    forward)."""

    def __init__(self, inner, x0_kv: RecordKV):
        self.inner, self.x0 = inner, x0_kv

    def attend(self, layer, q, k, v):
        return self.inner.attend(layer, q, torch.cat([k, self.x0.k[layer]], dim=2),
                                 torch.cat([v, self.x0.v[layer]], dim=2))


def group_attention(prefix: RecordKV, ends: torch.Tensor, size: int) -> XtOverX0:
    """Attention for G groups of `size` tokens each (laid out group after group) over a prefix recorded by
    `RecordKV` (keys [1, Hkv, S, D]): a token of group g sees the earlier tokens of its group, itself and the
    prefix keys 0..ends[g] (ends [G]; −1: none) — what a MASK block after a clean prefix sees, for many
    prefixes of one sequence in one forward (scripts/draft_ceiling.py, scripts/branch_drafts.py)."""
    S, G = prefix.k[0].shape[2], ends.shape[0]
    dev = ends.device
    group, index = torch.arange(G, device=dev).repeat_interleave(size), torch.arange(size, device=dev).repeat(G)
    own = (group[:, None] == group[None, :]) & (index[None, :] <= index[:, None])  # [G·size, G·size]
    sees_prefix = torch.arange(S, device=dev)[None, :] <= ends.repeat_interleave(size)[:, None]  # [G·size, S]
    return XtOverX0(DenseAttention(torch.cat([own, sees_prefix], 1)[None, None]), prefix)


def draft_positions(is_mask: torch.Tensor, block: int) -> torch.Tensor:
    """[B, L] -> for each position, how many MASKs precede it in its block of `block` positions: a MASK's
    draft position j (0 = the draft right after the pending token; SPEC §4's MASK slots in order)."""
    B, L = is_mask.shape
    cs = torch.nn.functional.pad(is_mask.long().cumsum(1), (1, 0))  # [B, L + 1]: MASKs before each index
    start = torch.arange(L, device=is_mask.device) // block * block  # each position's block start
    return cs[:, :L] - cs[:, start]


CHUNK = 8192  # loss rows per LM-head call: the [rows, V] temporaries stay bounded


def _ce_sum(model, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor,
            chunk: int = CHUNK):
    """Σ_rows weight·CE(logits(hidden), targets) over hidden [n, H], targets [n], weight [n] (0 leaves a row
    out); with further weight vectors `more`, a tuple of one such sum per vector (their CEs detached), from
    the same logits. Every row is computed, none selected by a mask: a batch's shapes never depend on its
    data, so a compiled step compiles once, not once per count of loss rows (the H200 run of docs/risd.md
    recompiled the loss 64 times, dynamo's limit, before this)."""
    totals = [hidden.sum() * 0.0 for _ in range(1 + len(more))]
    for i in range(0, hidden.shape[0], chunk):
        ce = F.cross_entropy(model.compute_logits(hidden[i: i + chunk]), targets[i: i + chunk], reduction="none")
        for j, w in enumerate((weight, *more)):
            totals[j] = totals[j] + ((ce if j == 0 else ce.detach()) * w[i: i + chunk]).sum()
    return tuple(totals) if more else totals[0]


def _distill_ce_sums(model, hidden: torch.Tensor, teacher_hidden: torch.Tensor, targets: torch.Tensor,
                     weight: float, row_weight: torch.Tensor, chunk: int = CHUNK, teacher=None,
                     tv_weight: float = 0.0, tv_temperature: float = 1.0,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over rows of (r·((1 − w)·CE(targets) + w·CE(p)), m·CE(targets), m·CE(p)), where p = softmax of the
    teacher rows' logits (no gradient), CE(p) = −Σ_v p_v log q_v (= KL(p‖q) + H(p)), r the rows' weights
    and m = (r > 0) whether a row counts at all. hidden, teacher_hidden [n, H]; targets, row_weight [n]; rows
    are taken `chunk` at a time (every row computed, as in `_ce_sum`). The teacher rows' logits come from
    `teacher` (another model: its hidden states) or else `model`; a teacher with fewer vocabulary rows (the
    original of a model given a MASK row) gives the extra ids probability 0.
    With tv_weight t > 0 each row's loss becomes (1 − t)·(the above) + t·TV(p̃, q̃), both at `tv_temperature` τ
    (p̃ = softmax(z_p/τ)):
    a draft q̃ verified against p̃ is rejected with probability TV = 1 − Σ_v min(p̃_v, q̃_v), so this is the
    rejection rate itself, which cross-entropy only approaches through the marginal
    (`idlm.decoding.acceptance.best_blind_draft_acceptance`: a blind draft can do better than the marginal).
    A fourth sum, m·TV (detached), is returned (zero when t = 0)."""
    mixed = hard_sum = soft_sum = tv_sum = hidden.sum() * 0.0
    head = teacher if teacher is not None else model
    for i in range(0, hidden.shape[0], chunk):
        logits = model.compute_logits(hidden[i: i + chunk]).float()  # [c, V]
        log_q = F.log_softmax(logits, dim=-1)
        with torch.no_grad():
            z_p = head.compute_logits(teacher_hidden[i: i + chunk]).float()  # [c, V_teacher]
            if z_p.shape[-1] < log_q.shape[-1]:  # ids the teacher lacks: probability 0
                z_p = F.pad(z_p, (0, log_q.shape[-1] - z_p.shape[-1]), value=float("-inf"))
            p = F.softmax(z_p, dim=-1)
        hard = -log_q.gather(-1, targets[i: i + chunk, None]).squeeze(-1)
        soft = -(p * log_q).sum(-1)
        rw = row_weight[i: i + chunk]
        counts = (rw > 0).to(hard.dtype)
        row_loss = (1.0 - weight) * hard + weight * soft
        if tv_weight:
            p_tau = p if tv_temperature == 1.0 else F.softmax(z_p / tv_temperature, dim=-1)
            q_tau = log_q.exp() if tv_temperature == 1.0 else F.softmax(logits / tv_temperature, dim=-1)
            tv = 1.0 - torch.minimum(p_tau, q_tau).sum(-1)
            row_loss = (1.0 - tv_weight) * row_loss + tv_weight * tv
            tv_sum = tv_sum + (counts * tv.detach()).sum()
        mixed = mixed + (rw * row_loss).sum()
        hard_sum = hard_sum + (counts * hard.detach()).sum()
        soft_sum = soft_sum + (counts * soft.detach()).sum()
    return mixed, hard_sum, soft_sum, tv_sum


def ar_loss(model, tokens: torch.Tensor, lossmask: torch.Tensor, attn=None) -> dict[str, torch.Tensor]:
    """Mean next-token cross-entropy over response targets (plain causal forward)."""
    x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
    hidden = model(x0, attn=attn)  # [B, L, H]
    n = valid.sum().clamp_min(1)
    loss = _ce_sum(model, hidden.flatten(0, 1), tgt.flatten(), valid.flatten().float()) / n
    return {"loss": loss, "l_clean": loss.detach(), "targets": n}


def pair_positions(B: int, L: int, device) -> torch.Tensor:
    """[B, 2L] position ids: 0..L−1 for x_t and again 0..L−1 for x0 (SPEC §3.1)."""
    return torch.arange(L, device=device).repeat(2).expand(B, 2 * L)


def risd_halves(model, x_t, x0, is_mask, block: int, lora, attn_impl: str = "auto"):
    """The two halves of an R-ISD training forward over [x_t | x0] as two forwards -> (h_t, h_0) [B·L, H]
    each: the clean half x0 (the frozen base model, gate 0: a plain causal forward) without autograd,
    recording its keys and values; then x_t (LoRA on, MASK slots with the adapter's embedding) attending
    to its own keys and to those (`XtOverX0`). The same values as the joint forward (the x0 half never
    attends to x_t), but autograd keeps only the x_t half: the backward no longer runs through the clean
    half, and its activations are not stored. h_0 carries no gradient (it is the teacher / context)."""
    B, L = x0.shape
    positions = torch.arange(L, device=x0.device).expand(B, L)
    record = RecordKV()
    with torch.no_grad():
        h_0 = model(x0, positions, record)  # [B, L, H]
    attn = XtOverX0(pair_attention("idlm", L, block, x0.device, attn_impl, xt_only=True), record)
    h_t = model(x_t, positions, attn, lora=lora, lora_gate=torch.ones(B, L, device=x0.device), is_mask=is_mask)
    return h_t.flatten(0, 1), h_0.flatten(0, 1)


def idlm_loss(model, tokens, lossmask, block: int, mask_token_id: int, clean_scale="auto", *,
              lora=None, attn_impl: str = "auto", distill_weight: float = 0.0,
              position_decay: float = 1.0, clean_teacher=None, clean_distill_weight: float = 0.0,
              tv_weight: float = 0.0, tv_temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """L_noisy + s·L_clean (SPEC §3.3), or with `lora` the R-ISD drafter loss L_noisy (SPEC §5).

    x_t = x0 with every response token replaced by MASK; the MASK at i predicts x0[i+1] (logit shift).
    With `lora` and distill_weight w > 0 the drafter's loss mixes in soft targets: the MASK at i learns
    (1 − w)·CE(x0[i+1]) + w·CE(p_i), where p_i is the frozen base model's own next-token distribution at
    clean position i — the clean half's rows, which are exactly the base model's (`risd_halves`: no extra
    forward). p_i is what verification compares a draft with, so this fits the drafter to the
    whole distribution rather than to one sampled token. `l_noisy` stays CE(x0[i+1]); `l_soft` is CE(p).
    position_decay γ < 1 weighs the MASK at draft position j (`draft_positions`) by γ^j, normalised to
    the weights' sum: a later draft counts only when the earlier ones were accepted, so the first ones
    matter most for TPF. The reported `l_noisy` / `l_soft` stay unweighted means.
    Without `lora` (a conversion), distill_weight w > 0 does the same with the model's *own* clean rows as
    the teacher: p_i = its clean half's distribution at i, detached (no gradient through the target; the
    clean half still learns from L_clean). Verification accepts a draft with min(1, p/q), so α is 1 − the
    total variation between the two: this fits q to the p the model will verify against, not to one
    sampled token of data that is not all the model's own. The auto clean scale balances L_clean against
    the noisy term actually trained (the mixed one).
    A conversion with `clean_teacher` (the unchanged original model, frozen) and clean_distill_weight c > 0
    trains its clean half on (1 − c)·CE(x0[i+1]) + c·CE(p0_i), p0_i the original's distribution after
    x0[..i] (the MASK id, which the original lacks, at probability 0): the converted model's AR
    distribution — the one ISD samples from — is held to the original's instead of drifting to the data.
    `l_clean` stays CE(x0[i+1]); `l_clean_soft` is CE(p0).
    tv_weight t > 0 (lora or convert) makes each MASK row's loss (1 − t)·(the above) + t·TV(p̃_i, q̃) at
    `tv_temperature`, with the same teacher p_i as distill_weight (`_distill_ce_sums`): the draft's rejection
    rate itself; `l_tv` is its unweighted mean.
    """
    if position_decay != 1.0 and lora is None:
        raise ValueError("position_decay is for the R-ISD drafter loss (lora=...)")
    x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
    B, L = x0.shape
    is_mask = lossmask[:, :-1]  # response tokens become MASK in x_t
    x_t = torch.where(is_mask, torch.full_like(x0, mask_token_id), x0)
    if lora is None:  # one forward over [x_t | x0]: the clean half is trained too
        attn = pair_attention("idlm", L, block, tokens.device, attn_impl)
        hidden = model(torch.cat([x_t, x0], dim=1), pair_positions(B, L, tokens.device), attn)  # [B, 2L, H]
        h_t, h_0 = hidden[:, :L].flatten(0, 1), hidden[:, L:].flatten(0, 1)  # [B·L, H] each
    else:  # R-ISD: the frozen base's clean half needs no gradient: run it alone, without autograd, then x_t
        h_t, h_0 = risd_halves(model, x_t, x0, is_mask, block, lora, attn_impl)
    n = valid.sum().clamp_min(1)
    noisy = (is_mask & valid).flatten().float()  # [B·L]: the MASK rows with a target (1) — a weight, not an index
    tgt = tgt.flatten()
    w, norm = noisy, n  # per-target weights (position_decay) and their normaliser: a weighted mean
    if position_decay != 1.0:
        w = noisy * float(position_decay) ** draft_positions(is_mask, block).flatten().float()
        count = noisy.sum()
        norm = torch.where(count > 0, n * w.sum() / count.clamp_min(1), n.float())
    extra = {}
    if distill_weight or tv_weight:
        mixed, hard, soft, tv = _distill_ce_sums(model, h_t, h_0, tgt, distill_weight, row_weight=w,
                                                 tv_weight=tv_weight, tv_temperature=tv_temperature)
        noisy_term, extra = mixed / norm, {"l_soft": soft / n, **({"l_tv": tv / n} if tv_weight else {})}
        l_noisy = hard / n
        if lora is not None:
            return {"loss": noisy_term, "l_noisy": l_noisy, **extra, "targets": n}
    elif position_decay != 1.0:  # (lora only, checked above) the loss weighted, l_noisy the plain mean
        weighted, plain = _ce_sum(model, h_t, tgt, w, noisy)
        return {"loss": weighted / norm, "l_noisy": plain / n, "targets": n}
    else:
        noisy_term = l_noisy = _ce_sum(model, h_t, tgt, noisy) / n
    if lora is not None:
        return {"loss": l_noisy, "l_noisy": l_noisy.detach(), "targets": n}
    if clean_teacher is not None and clean_distill_weight:
        with torch.no_grad():
            h_p0 = clean_teacher(x0).flatten(0, 1)  # [B·L, H]: the original model's plain causal forward
        mixed, hard, soft, _ = _distill_ce_sums(model, h_0, h_p0, tgt, clean_distill_weight,
                                                row_weight=valid.flatten().float(), teacher=clean_teacher)
        clean_term, l_clean, extra = mixed / n, hard / n, {**extra, "l_clean_soft": soft / n}
    else:
        clean_term = l_clean = _ce_sum(model, h_0, tgt, valid.flatten().float()) / n
    scale = (noisy_term / clean_term.clamp_min(1e-6)).detach() if clean_scale == "auto" else float(clean_scale)
    return {"loss": noisy_term + scale * clean_term, "l_noisy": l_noisy.detach(), **extra,
            "l_clean": l_clean.detach(), "clean_scale": torch.as_tensor(scale).detach(), "targets": n}


def sdar_loss(model, tokens, lossmask, block: int, mask_token_id: int, *, generator: torch.Generator | None = None,
              attn_impl: str = "auto", min_rate: float = 1e-3) -> dict[str, torch.Tensor]:
    """SDAR-style baseline (SPEC §3.5): per block a rate t ~ U(0,1); each response token of x_t is
    masked with probability t; the MASK at i predicts x0[i] (no logit shift); loss weighted 1/t."""
    x0 = tokens[:, :-1]
    resp = lossmask[:, :-1]
    B, L = x0.shape
    nblocks = (L + block - 1) // block
    dev = tokens.device
    t = torch.rand(B, nblocks, generator=generator, device="cpu").to(dev).clamp_min(min_rate)
    t_tok = t.repeat_interleave(block, dim=1)[:, :L]  # [B, L]
    masked = resp & (torch.rand(B, L, generator=generator, device="cpu").to(dev) < t_tok)
    x_t = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    attn = pair_attention("sdar", L, block, dev, attn_impl)
    hidden = model(torch.cat([x_t, x0], dim=1), pair_positions(B, L, dev), attn)
    n = resp.sum().clamp_min(1)
    weight = (masked.float() / t_tok).flatten()  # 1/t on the masked rows, 0 elsewhere
    loss = _ce_sum(model, hidden[:, :L].flatten(0, 1), x0.flatten(), weight) / n
    return {"loss": loss, "l_noisy": loss.detach(), "targets": n}
