"""Introspective strided decoding (ISD, SPEC §4) and its lossless variant R-ISD (SPEC §5).

Stride N, K = N−1 drafts, query block 2N−1 tokens at positions P..P+2N−2 (P = kept KV length):

  cold start C: [t0, MASK × (2N−2)]           index 0 → clean token c; MASK 1..N−1 → drafts
  verify V:     [pending, s_0..s_{K−1}, MASK × (N−1)]
                index j < K → p̃ verifying s_j; index K → clean token c; MASK N..2N−2 → drafts

  C                  → emit c;                    keep 1 slot;   next V(pending=c, new drafts)
  V, all accepted    → emit s_0..s_{K−1}, c;      keep N slots;  next V(pending=c, new drafts)
  V, reject at j     → emit s_0..s_{j−1}, corr.;  keep 1+j;      next C(t0=correction)

The first token t0 is drawn from the prefill logits and emitted there. Acceptance is
`idlm.decoding.acceptance.verify_drafts`. R-ISD is the same decoder with `lora=True`: the drafter
is the base model plus a gated LoRA whose gate is 1 exactly on the MASK slots whose logits become
drafts, so every logit used to emit a token is the base model's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from idlm.decoding.acceptance import verify_drafts
from idlm.decoding.base import Block, Decoder, StepResult
from idlm.decoding.sampling import filtered_probs, params_tensors, sample, sample_tokens, uniforms
from idlm.errors import ConfigError


@dataclass
class ISDState:
    mode: str  # "C" (cold start) or "V" (verify)
    last: int  # C: t0, V: the pending token (emitted, no KV yet)
    specs: list[int] = field(default_factory=list)  # V: drafts s_0..s_{K-1}
    spec_q: torch.Tensor | None = None  # V: [K, V] the distributions q̃ the drafts came from
    spec_qd: list[float] = field(default_factory=list)  # V: q̃_j(s_j), for the α statistic


def draft_slots(mode: str, stride: int) -> range:
    """Block indices whose logits become the next drafts: C 1..N−1, V N..2N−2."""
    return range(1, stride) if mode == "C" else range(stride, 2 * stride - 1)


def isd_block(state: ISDState, stride: int, mask_token_id: int) -> Block:
    n = stride
    if state.mode == "C":
        tokens = [state.last] + [mask_token_id] * (2 * n - 2)
    else:
        if len(state.specs) != n - 1:
            raise ValueError(f"verify block needs {n - 1} drafts, state has {len(state.specs)}")
        tokens = [state.last, *state.specs] + [mask_token_id] * (n - 1)
    first_mask = 1 if state.mode == "C" else n
    is_mask = [i >= first_mask for i in range(2 * n - 1)]
    slots = draft_slots(state.mode, n)
    gate = [i in slots for i in range(2 * n - 1)]
    return Block(tokens=tokens, is_mask=is_mask, gate=gate)


class ISDDecoder(Decoder):
    needs_mask_token = True

    def __init__(self, stride: int, mask_token_id: int | None, lora: bool = False):
        if not isinstance(stride, int) or stride < 2:
            raise ConfigError(f"invalid stride N={stride!r}: ISD needs N >= 2 (N = 1 is plain AR decoding)")
        if mask_token_id is None and not lora:
            raise ConfigError("ISD needs a MASK token id; this model has none")
        self.stride = stride
        self.mask_token_id = 0 if mask_token_id is None else mask_token_id
        self.uses_lora = lora
        self.needs_mask_token = not lora
        self.name = "risd" if lora else "isd"
        self.query_len = 2 * stride - 1

    def start(self, logits, params, generators):
        tokens, probs = (t.tolist() for t in sample_tokens(logits, params, generators))
        return [ISDState("C", t) for t in tokens], [StepResult([t], 0, [q]) for t, q in zip(tokens, probs)]

    def block(self, state: ISDState) -> Block:
        b = isd_block(state, self.stride, self.mask_token_id)
        if not self.uses_lora:
            b.gate = None
        return b

    @torch.no_grad()
    def step(self, states, logits, params, generators, stats):
        B, Q, V = logits.shape
        n, k = self.stride, self.stride - 1
        dev = logits.device
        temp, top_k, top_p = params_tensors(params, dev)
        is_v = torch.tensor([s.mode == "V" for s in states], device=dev)
        point_mass = torch.tensor([p.draft == "argmax" for p in params], device=dev)
        argmax_draft = torch.tensor([p.draft != "sample" for p in params], device=dev)
        alpha = torch.tensor([p.verify_alpha for p in params], dtype=torch.float32, device=dev)

        # p̃ at the clean indices 0..K (C rows use index 0 only)  [B, N, V]
        p = filtered_probs(logits[:, :n].reshape(B * n, V), *_per_slot((temp, top_k, top_p), n)).view(B, n, V)

        # next drafts from the MASK slots (C: 1..N−1, V: N..2N−2)  [B, K]
        offset = torch.where(is_v, n, 1)
        idx = offset[:, None] + torch.arange(k, device=dev)
        draft_logits = logits.gather(1, idx[..., None].expand(B, k, V))
        q_new = filtered_probs(draft_logits.reshape(B * k, V), *_per_slot((temp, top_k, top_p), k)).view(B, k, V)
        sampled = sample(q_new, generators)
        new_drafts = torch.where(argmax_draft[:, None], draft_logits.argmax(-1), sampled)

        # verify the previous drafts (V rows)
        specs = torch.tensor([s.specs if s.mode == "V" else [0] * k for s in states], device=dev)
        need_q = any(s.mode == "V" and s.spec_q is not None for s in states)
        q_old = None
        if need_q:
            q_old = torch.stack([s.spec_q if (s.mode == "V" and s.spec_q is not None)
                                 else torch.zeros(k, V, device=dev) for s in states])
        u = uniforms((k,), generators, dev)
        n_acc, correction = verify_drafts(p[:, :k], specs, q_old, point_mass, alpha, u)

        # the one token each row draws at the end: c (C), bonus c (V all accepted) or the correction
        rows = torch.arange(B, device=dev)
        all_ok = is_v & (n_acc == k)
        final_p = torch.where(is_v[:, None], torch.where(all_ok[:, None], p[rows, k], correction), p[:, 0])
        final = sample(final_p, generators)
        final_q = final_p.gather(-1, final[:, None]).squeeze(-1)
        drafts_q = q_new.gather(-1, new_drafts[..., None]).squeeze(-1)  # q̃_j(d_j) [B, K]

        n_acc_l, final_l, drafts_l = n_acc.tolist(), final.tolist(), new_drafts.tolist()
        final_ql, drafts_ql = final_q.tolist(), drafts_q.tolist()
        results = []
        for b, s in enumerate(states):
            keep_q = params[b].draft != "argmax"
            fresh = ISDState("V", final_l[b], drafts_l[b], q_new[b] if keep_q else None, drafts_ql[b])
            if s.mode == "C":
                emitted, probs, advance, nxt = [final_l[b]], [final_ql[b]], 1, fresh
                stats[b].rounds["cold"] += 1
            else:
                j = n_acc_l[b]
                stats[b].record_verify(k, j)
                emitted, probs = s.specs[:j] + [final_l[b]], s.spec_qd[:j] + [final_ql[b]]
                advance, nxt = 1 + j, (fresh if j == k else ISDState("C", final_l[b]))
            s.mode, s.last, s.specs, s.spec_q, s.spec_qd = nxt.mode, nxt.last, nxt.specs, nxt.spec_q, nxt.spec_qd
            results.append(StepResult(emitted, advance, probs))
        return results


def _per_slot(row_params: tuple[torch.Tensor, ...], m: int) -> list[torch.Tensor]:
    """Per-row parameter tensors [B] repeated for m slots per row -> [B*m] each."""
    return [t.repeat_interleave(m) for t in row_params]
