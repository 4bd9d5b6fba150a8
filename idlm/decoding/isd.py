"""Introspective strided decoding (ISD, SPEC §4) and its lossless variant R-ISD (SPEC §5).

Stride N, K = N−1 drafts, query block 2N−1 tokens at positions P..P+2N−2 (P = kept KV length):

  cold start C: [t0, MASK × (2N−2)]           index 0 → clean token c; MASK 1..N−1 → drafts
  verify V:     [pending, s_0..s_{K−1}, MASK × (N−1)]
                index j < K → p̃ verifying s_j; index K → clean token c; MASK N..2N−2 → drafts

  C                  → emit c;                    keep 1 slot;   next V(pending=c, new drafts)
  V, all accepted    → emit s_0..s_{K−1}, c;      keep N slots;  next V(pending=c, new drafts)
  V, reject at j     → emit s_0..s_{j−1}, corr.;  keep 1+j;      next C(t0=correction)

Rejection branches (`branches=True`, the engine's `EngineConfig.branches`): after the 2N−1 rows above, the
block carries (N−1)² more MASK rows, N−1 per draft s_j: branch j sits at positions P+j+1..P+j+N−1 (from
where a correction of s_j would go) and sees the prefix, the block's rows 0..j and its own earlier rows
only (`branch_layout`: explicit positions and a hidden range per row). Its logits are the drafts a cold
start from the correction would make, so a rejection at j no longer costs a cold round:

  V, reject at j     → emit s_0..s_{j−1}, corr.;  keep 1+j;      next V(pending=corr., branch j's drafts)

Exact for the same reason as every draft: branch j's q̃ is fixed before the correction is drawn and its
drafts use the draft uniforms, independent of the acceptance and correction draws (greedy: AR's tokens).
Query block N² tokens (N = 4: 16 instead of 7); the drafts of the next round are chosen on the device, so
the step's packed output is the same as without branches.

Guessed corrections (`guesses=G`, with branches; `EngineConfig.guesses`): a branch's first MASK cannot see the
correction it follows, so its first draft is blind. Each draft s_j also gets G guessed groups after the
branches, K rows each: a guess g at the correction's position — a clean row (no MASK, gate off: its logits
are the target's p̃ of the token after g) — then K − 1 MASK rows after it, seeing the prefix, the block's rows
0..j and their own earlier rows. The guesses are the drafter's next-best tokens at draft j other than s_j
(made with the drafts, a step earlier: `guess_tokens`). When the correction drawn at j equals a guess, the
next drafts come from that group: the first from the clean row, i.e. from p̃ itself (accepted but for
rounding), the others its MASK rows' (drafts that saw the correction):

  V, reject at j, correction = g_jm → emit s_0..s_{j−1}, corr.; keep 1+j; next V(pending=corr., group jm's drafts)

Exact like the branches: every group's q̃ is fixed before the correction is drawn, the group is chosen by the
committed correction, and a draft is verified against the q̃ it was drawn from. Query block 2N−1 + (1+G)·K²
tokens (N = 4, G = 1: 25). With `guess_rows` W < K a guessed group is its guess row and W − 1 MASK rows, and
after a right guess the drafts past the W-th come from branch j's MASK rows (blind to the correction, as
without a guess; still exact: those rows' q̃ too is fixed before the correction is drawn): 2N−1 + K² + G·K·W
rows (N = 4, G = 1, W = 1: 19, a 57-row attention tile for SmolLM2's 3 query heads per KV head, not 75 → 128).
CPU estimate on SmolLM2 with its adapter (docs/risd.md, session 34): the TPF with
branches 2.17 → 2.44 greedy and 1.84 → 2.02 at T = 0.7 with one guess a draft (guesses emitted at once).

The first token t0 is drawn from the prefill logits and emitted there. Acceptance is
`idlm.decoding.acceptance.verify_drafts`: the drafts of a step verified jointly (block verification, the
default) or token by token (`SamplingParams.verification`); exact either way. R-ISD is the same decoder
with `lora=True`: the drafter is the base model plus a gated LoRA whose gate is 1 exactly on the MASK
slots whose logits become drafts, so every logit used to emit a token is the base model's own.

Raw logprobs (`SamplingParams.logprobs`): the first token's from the prefill logits; in a step, the
emitted tokens s_0..s_{j−1}, final are predicted by the clean indices 0..j (C: the final by index 0),
so for R-ISD (gate 0 there) they are exactly the base AR model's logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from idlm.decoding import rng
from idlm.decoding.acceptance import verify_drafts
from idlm.decoding.ar import ARDecoder
from idlm.decoding.base import BlockBatch, Decoder, ParamsInputs, QueryBlock, StepResult
from idlm.decoding.logprobs import first_token_logprobs, logprob_columns, logprobs_static, unpack_logprobs
from idlm.decoding.sampling import (
    chunked_argmax,
    filtered_probs,
    inverse_cdf,
    params_tensors,
    sample_tokens,
    take_draws,
    to_float32,
    truncation,
)
from idlm.errors import ConfigError
from idlm.layers.fused import cat_columns, cuda_fused


@dataclass
class ISDState:
    mode: str  # "C" (cold start) or "V" (verify)
    last: int  # C: t0, V: the pending token (emitted, no KV yet)
    specs: list[int] = field(default_factory=list)  # V: drafts s_0..s_{K-1}
    # V, sampled drafts: where the distributions q̃ they came from are kept — (the step's q̃ output
    # [B', K', V], this row's index in it); the row's q̃ are that row's first len(specs) columns
    spec_q: tuple[torch.Tensor, int] | None = None
    spec_qd: list[float] = field(default_factory=list)  # V: q̃_j(s_j), for the α statistic
    # V with guessed corrections: the G guesses of each draft, [K·G] (draft j's at j·G..j·G+G−1)
    guesses: list[int] = field(default_factory=list)
    # this row's own stride in the coming steps, <= the step's (the adaptive stride's per-row choice:
    # a shorter block padded to the step's 2N−1 slots); None: the step's stride
    n: int | None = None


def draft_slots(mode: str, stride: int) -> range:
    """Block indices whose logits become the next drafts: C 1..N−1, V N..2N−2."""
    return range(1, stride) if mode == "C" else range(stride, 2 * stride - 1)


def branch_layout(stride: int, guesses: int = 0, rows: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The position offsets and hidden ranges (`QueryBlock.offsets` / `.hide`) of a block with rejection
    branches, Q = 2N−1 + (N−1)² = N² rows: rows 0..2N−2 as without branches (offset t, nothing hidden);
    branch j (0 <= j < N−1) rows g_j + i (g_j = 2N−1 + j(N−1), 0 <= i < N−1) at offset j+1+i, not seeing
    the block's rows j+1 .. g_j − 1 (the drafts from s_j on, the plain MASK rows, the earlier branches).
    With G `guesses`, G·(N−1) guessed groups follow, laid out as branches are (`group_start`): group (j, m)
    at offsets j+1.. (its guess where the correction of s_j goes), hiding the block's rows j+1 up to it; a
    guessed group has `rows` rows (1..N−1: the guess row and rows − 1 MASK rows; None: N−1)."""
    n, k = stride, stride - 1
    w = k if rows is None else rows
    main = 2 * n - 1
    offsets, hide = list(range(main)), [(0, 0)] * main
    for j, size in [(j, k) for j in range(k)] + [(j, w) for j in range(k) for _ in range(guesses)]:
        g = len(offsets)
        offsets += [j + 1 + i for i in range(size)]
        hide += [(j + 1, g)] * size
    return offsets, hide


def group_start(stride: int, j, m=None, guesses: int = 0, rows: int | None = None):
    """The block index of branch j's first row (m None), or of guessed group (j, m)'s — its guess row
    (`branch_layout`, guessed groups of `rows` rows, None: N−1); j and m may be tensors."""
    k = stride - 1
    main = 2 * stride - 1
    if m is None:
        return main + j * k
    return main + k * k + (j * guesses + m) * (k if rows is None else rows)


def isd_block(state: ISDState, stride: int, mask_token_id: int) -> QueryBlock:
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
    return QueryBlock(tokens=tokens, is_mask=is_mask, gate=gate)


class ISDDecoder(Decoder):
    needs_mask_token = True

    def __init__(self, stride: int, mask_token_id: int | None, lora: bool = False, branches: bool = False,
                 guesses: int = 0, guess_rows: int | None = None):
        if not isinstance(stride, int) or stride < 2:
            raise ConfigError(f"invalid stride N={stride!r}: ISD needs N >= 2 (N = 1 is plain AR decoding)")
        if mask_token_id is None and not lora:
            raise ConfigError("ISD needs a MASK token id; this model has none")
        self.stride = stride
        self.mask_token_id = 0 if mask_token_id is None else mask_token_id
        self.uses_lora = lora
        self.needs_mask_token = not lora
        self.name = "risd" if lora else "isd"
        self.branches = bool(branches)
        if isinstance(guesses, bool) or not isinstance(guesses, int) or guesses < 0:
            raise ConfigError(f"invalid guesses={guesses!r}: the guessed corrections per draft, an integer >= 0")
        if guesses and not self.branches:
            raise ConfigError("guessed corrections (guesses) go with rejection branches (branches=True)")
        self.guesses = guesses
        if guess_rows is not None and (isinstance(guess_rows, bool) or not isinstance(guess_rows, int)
                                       or guess_rows < 1 or not guesses):
            raise ConfigError(f"invalid guess_rows={guess_rows!r}: the rows of a guessed group, an integer >= 1, "
                              "with guesses > 0")
        k = stride - 1
        # rows of a guessed group: its guess row and W − 1 MASK rows (at most K; the drafts past W after a right
        # guess come from the branch's MASK rows)
        self.guess_rows = k if guess_rows is None else min(guess_rows, k)
        self.main_len = 2 * stride - 1  # the block's rows before the rejection branches
        self.query_len = self.main_len + (k * k + guesses * k * self.guess_rows) * self.branches
        self.packed_width = 3 + 2 * k + k * guesses  # `compute`'s packed columns (before any logprobs)
        self._layout = None
        self._guess_rows = np.array([group_start(stride, j, m, guesses, self.guess_rows) for j in range(k)
                                     for m in range(guesses)], dtype=np.int64)  # [K·G] the guess rows' block indices
        self._not_guess = np.ones(self.query_len, dtype=bool)  # [Q] False at the guess rows (clean, gate off)
        self._not_guess[self._guess_rows] = False
        if self.branches:
            offsets, hide = branch_layout(stride, guesses, self.guess_rows)
            self._layout = (np.array(offsets, dtype=np.int64), np.array(hide, dtype=np.int64))

    def start(self, logits, params, rngs):
        tokens, probs = (t.tolist() for t in sample_tokens(logits, params, rngs))
        lps = first_token_logprobs(logits, tokens, params)
        return ([ISDState("C", t) for t in tokens],
                [StepResult([t], 0, [q], *lp) for t, q, lp in zip(tokens, probs, lps)])

    def row_stride(self, state: ISDState) -> int:
        """The N this row runs in a step of this decoder: its own (`ISDState.n`, at most the step's), or the
        step's. A row of N < the step's fills the first 2N−1 slots of the block; the rest is padding (MASK
        tokens after the row's last query position: causal attention keeps them out of the row's logits,
        and their KV is never committed)."""
        if state.n is None:
            return self.stride
        if not 1 <= state.n <= self.stride:
            raise ValueError(f"a row's stride {state.n} must be within 1..{self.stride} (the step's)")
        return state.n

    def _restart_stale(self, state: ISDState) -> None:
        if state.mode == "V" and len(state.specs) != self.row_stride(state) - 1:
            # drafts made under another stride (the engine may change N between steps): restart cold.
            # Exact: C only means "no drafts to verify"; the pending token is still the next input.
            state.mode, state.specs, state.spec_q, state.spec_qd, state.guesses = "C", [], None, [], []

    def block(self, state: ISDState) -> QueryBlock:
        self._restart_stale(state)
        n = self.row_stride(state)
        b = isd_block(state, n, self.mask_token_id) if n > 1 else QueryBlock([state.last], [False], [False])
        pad = self.main_len - len(b.tokens)  # a shorter row's block, padded (see `row_stride`)
        extra = self.query_len - self.main_len  # the rejection branches' MASK rows (gate on: they draft)
        b.tokens = b.tokens + [self.mask_token_id] * (pad + extra)
        b.is_mask = b.is_mask + [True] * (pad + extra)
        b.gate = b.gate + [False] * pad + [True] * extra if self.uses_lora else None
        if self.branches:
            b.offsets, b.hide = self._layout[0].tolist(), [tuple(h) for h in self._layout[1].tolist()]
        if self.guesses:  # the guess rows: clean tokens (no MASK, gate off)
            for r, t in zip(self._guess_rows.tolist(), self._guess_array([state])[0].tolist()):
                b.tokens[r], b.is_mask[r] = t, False
                if b.gate is not None:
                    b.gate[r] = False
        return b

    def _guess_array(self, states) -> np.ndarray:
        """[B, K·G] each row's guesses (a V row's kept ones; any token elsewhere — a C row never rejects, and a
        guess that meets its correction is exact whatever it is: the row computes p̃ after that token)."""
        out = np.full((len(states), len(self._guess_rows)), self.mask_token_id, dtype=np.int64)
        for b, s in enumerate(states):
            if s.mode == "V" and len(s.guesses) == out.shape[1]:
                out[b] = s.guesses
        return out

    def _with_guesses(self, batch: BlockBatch, states) -> BlockBatch:
        """The guess rows' tokens on a batch of blocks (their is_mask / gate are off in the patterns)."""
        if self.guesses:
            batch.tokens[:, self._guess_rows] = self._guess_array(states)
        return batch

    def _tree(self, batch: BlockBatch) -> BlockBatch:
        """The rejection branches' positions and hidden ranges on a batch of blocks (the same for every row)."""
        if self.branches:
            B, q = batch.tokens.shape
            batch.offsets = np.broadcast_to(self._layout[0], (B, q))
            batch.hide = np.broadcast_to(self._layout[1], (B, q, 2))
        return batch

    # set by an engine whose rows may run their own strides (the adaptive stride per row): its steps then
    # always take the per-row inputs, so each stride compiles one step function, not two
    per_row = False

    def row_strides(self, states) -> np.ndarray | None:
        """[B] each row's N (`row_stride`), or None when every row runs the step's stride."""
        if all(s.n is None or s.n == self.stride for s in states):
            return None
        return np.fromiter((self.row_stride(s) for s in states), np.int64, len(states))

    def blocks(self, states):
        """`isd_block` of every state as arrays: [last, MASK...] (C) or [last, drafts, MASK...] (V); a row
        of a shorter stride (`row_stride`) fills the first 2n−1 slots, MASK padding after them."""
        n, B = self.stride, len(states)
        for s in states:
            self._restart_stale(s)
        rows_n = self.row_strides(states)
        if rows_n is None:  # every row at the step's stride: two row patterns, C and V (a host-side hot path)
            return self._blocks_fixed(states)
        is_v = np.fromiter((s.mode == "V" for s in states), bool, B)
        tokens = np.full((B, self.query_len), self.mask_token_id, dtype=np.int64)
        tokens[:, 0] = np.fromiter((s.last for s in states), np.int64, B)
        if rows_n is None:
            if is_v.any():
                tokens[is_v, 1:n] = [s.specs for s in states if s.mode == "V"]
            row_n = np.full((B, 1), n)
        else:
            for b in np.flatnonzero(is_v):
                tokens[b, 1:rows_n[b]] = states[b].specs
            row_n = rows_n[:, None]
        first_mask = np.where(is_v[:, None], row_n, 1)  # the MASK slots: C 1.., V N.. (n = 1: none)
        index = np.arange(self.query_len)
        is_mask = (index >= first_mask) & self._not_guess
        # `draft_slots`; a row of n = 1 has none
        gate = is_mask & ((index < first_mask + row_n - 1) | (index >= self.main_len)) if self.uses_lora else None
        return self._with_guesses(self._tree(BlockBatch(tokens, is_mask, gate)), states)

    _patterns_cache: tuple | None = None

    def _blocks_fixed(self, states) -> BlockBatch:
        """`blocks` when every row runs the step's stride N: a C row is [last, MASK × (Q−1)], a V row [last,
        its N−1 drafts, MASK × (Q−N)]; is_mask and the gate are one of two fixed rows each (C: MASK from slot 1,
        drafts from slots 1..N−1; V: MASK from slot N, drafts from N..2N−2), looked up per row — a few numpy
        calls whatever B, where the general path's dozen cost ~0.1 ms a step at batch 1."""
        n, q, mask = self.stride, self.query_len, self.mask_token_id
        key = (n, q, self.uses_lora)
        if self._patterns_cache is None or self._patterns_cache[0] != key:
            index = np.arange(q)
            first = np.array([[1], [n]]) if n > 1 else np.array([[q], [q]])  # rows C, V; n = 1: no MASK slot
            is_mask = (index >= first) & self._not_guess  # [2, Q]
            gate = is_mask & ((index < first + n - 1) | (index >= self.main_len))  # the branches' rows draft too
            self._patterns_cache = (key, is_mask, gate)
        _, is_mask, gate = self._patterns_cache
        c_tail, v_tail = [mask] * (q - 1), [mask] * (q - n)
        tokens = np.array([[s.last, *s.specs, *v_tail] if s.mode == "V" else [s.last, *c_tail] for s in states],
                          dtype=np.int64).reshape(len(states), q)
        kind = np.fromiter((s.mode == "V" for s in states), np.intp, len(states))
        return self._with_guesses(self._tree(BlockBatch(tokens, is_mask[kind], gate[kind] if self.uses_lora else None)),
                                  states)

    @property
    def max_advance(self) -> int:
        return self.stride  # a V row that accepts all K drafts: K + the final token

    def next_inputs(self, packed, inputs):
        """The device form of `finish` + `blocks` + `step_inputs`' is_v / specs (see `Decoder.next_inputs`):
        a V row commits 1 + n_accepted positions, a C row 1; the next row is V (its drafts to verify) after a
        C row, after a V row that accepted all its K, or always with rejection branches — if it drafts at all
        (a row of its own N = 1 does not); else C. Its tokens are [final, its K drafts or MASK, MASK...], MASK
        from slot 1 (C) or K + 1 (V), the gate on the K slots from there and the branches' rows (`blocks`).
        K is each row's own (`dec.k_row`, per-row inputs) or the step's; specs past it are zeros, as a C row's
        are never read."""
        k, q, mask = self.stride - 1, self.query_len, self.mask_token_id
        was_v = inputs["dec.is_v"].bool()  # [B]
        n_acc, final = packed[:, 0].long(), packed[:, 1].long()  # [B]
        drafts = packed[:, 2: 2 + k].long()  # [B, K]
        k_row = inputs.get("dec.k_row")
        kb = torch.full_like(n_acc, k) if k_row is None else k_row.long()  # [B] each row's K
        advance = torch.where(was_v, n_acc + 1, torch.ones_like(n_acc))
        next_v = (torch.ones_like(was_v) if self.branches else ~was_v | (n_acc == kb)) & (kb > 0)
        own = torch.arange(k, device=packed.device) < kb[:, None]  # [B, K]: the row's own drafts
        tokens = torch.full((packed.shape[0], q), mask, dtype=torch.int64, device=packed.device)
        tokens[:, 0] = final
        tokens[:, 1: k + 1] = torch.where(next_v[:, None] & own, drafts, mask)
        out = {"tokens": tokens, "dec.is_v": next_v, "dec.specs": torch.where(own, drafts, 0)}
        if self.guesses:  # the new drafts' guesses: the next block's guess rows (`_with_guesses`)
            # the guess rows (`group_start`) made on the device: no host-to-device copy inside a captured step
            guess_rows = group_start(self.stride, 0, 0, self.guesses, self.guess_rows) + self.guess_rows * torch.arange(
                len(self._guess_rows), device=packed.device)
            guesses = packed[:, self.packed_width - len(self._guess_rows): self.packed_width].long()
            tokens[:, guess_rows] = torch.where(next_v[:, None], guesses, mask)
            out["dec.guesses"] = guesses
        if self.uses_lora:
            index = torch.arange(q, device=packed.device)
            first = torch.where(next_v, kb + 1, 1)[:, None]
            out["is_mask"] = index >= first
            if self.guesses:
                out["is_mask"][:, guess_rows] = False
            out["gate"] = out["is_mask"] & ((index < first + kb[:, None]) | (index >= self.main_len))
        return advance, out

    fused = True
    _zeros_cache: tuple | None = None

    def _zeros(self, k: int, vocab_size: int, device) -> torch.Tensor:
        """A [K, V] zeros tensor (the q̃ of a row without kept drafts), made once per shape and device."""
        key = (k, vocab_size, str(device))
        if self._zeros_cache is None or self._zeros_cache[0] != key:
            self._zeros_cache = (key, torch.zeros(k, vocab_size, device=device))
        return self._zeros_cache[1]

    def params_inputs(self, params):
        temp, top_k, top_p = params_tensors(params, "cpu")
        n = len(params)
        point_mass = np.fromiter((_point_mass(p) for p in params), bool, n)
        argmax_draft = np.fromiter((p.draft != "sample" or p.greedy for p in params), bool, n)
        alpha = to_float32(np.fromiter((p.verify_alpha for p in params), np.float64, n))
        block = np.fromiter((p.verification == "block" and p.verify_alpha == 1 for p in params), bool, n)
        greedy = all(p.greedy and p.verify_alpha <= 1 for p in params)
        draft_temp = to_float32(np.fromiter((p.temperature if p.draft_temperature is None else p.draft_temperature
                                             for p in params), np.float64, n))
        tensors = {"temperature": temp, "top_k": top_k, "top_p": top_p, "point_mass": torch.from_numpy(point_mass),
                   "argmax_draft": torch.from_numpy(argmax_draft), "alpha": torch.from_numpy(alpha),
                   "draft_temperature": torch.from_numpy(draft_temp)}
        if block.any():  # rows verified jointly (`verify_drafts`' block rows); absent: every row token by token
            tensors["block"] = torch.from_numpy(block)
        return ParamsInputs(tensors, {"truncate": truncation(params) if not greedy else False, "greedy": greedy,
                                      "logprobs": logprobs_static(params), "branches": self.branches},
                            sampled=not all(p.greedy for p in params), rows={"point_mass": point_mass})

    def step_inputs(self, states, params, rngs, vocab_size, device):
        k, B = self.stride - 1, len(states)
        fixed = self.batch_params(params)
        rows_n = self.row_strides(states)
        is_v = np.fromiter((s.mode == "V" for s in states), bool, B)
        if rows_n is None:  # a C row's specs are never read: zeros
            no_specs = [0] * k
            specs = np.array([s.specs if s.mode == "V" else no_specs for s in states], dtype=np.int64).reshape(B, k)
        else:
            specs = np.zeros((B, k), dtype=np.int64)
            for b in np.flatnonzero(is_v):
                specs[b, :rows_n[b] - 1] = states[b].specs
        # small per-row tensors on the host (the engine packs them into one copy)
        tensors = {**fixed.tensors, "is_v": torch.from_numpy(is_v), "specs": torch.from_numpy(specs)}
        if self.guesses:  # each draft's guessed corrections (what the block's guess rows hold)
            tensors["guesses"] = torch.from_numpy(self._guess_array(states))
        if rows_n is not None or self.per_row:  # each row's K (absent: every row the step's)
            tensors["k_row"] = torch.from_numpy(rows_n - 1 if rows_n is not None else np.full(B, k))
        # a V row keeps the q̃ its drafts were sampled from; given whenever a row samples its drafts, V or not
        # yet (a C row's is never read), so a step's inputs do not depend on the rows' modes: an overlapped step
        # continues with the same graph whatever the last step accepted (`next_inputs`)
        if fixed.sampled and not fixed.rows["point_mass"].all():
            tensors["q_old"] = self._kept_q(states, k, vocab_size, device)
        if fixed.sampled:  # each row's keys and draw number: its uniforms are drawn in `compute` (on the device)
            tensors["keys"], tensors["draw"] = take_draws(rngs)
        return tensors, dict(fixed.static)

    def _kept_q(self, states, k: int, vocab_size: int, device) -> torch.Tensor:
        """[B, K, V] the kept q̃ of each V row's drafts in its first k_b columns; what the other columns and
        rows hold is never read (C rows' verification is ignored, point-mass rows use δ_d, a shorter row
        stops after its own k_b) but is finite. Usually every kept q̃ is a row of the last step's output:
        then that output's rows are taken in one gather (a view when the rows come in the same order), not
        one copy per row (a kernel launch per row: hundreds per step in a large sampled batch)."""
        kept = [s.spec_q if s.mode == "V" else None for s in states]
        sources = {id(r[0]) for r in kept if r is not None}
        if len(sources) == 1:
            out = next(r[0] for r in kept if r is not None)  # [B', K', V]
            # a row without kept q̃ takes any row: its own place where it exists (so that a batch in the
            # last step's order is a view, with its cold rows too), else row 0
            index = [(b if b < len(out) else 0) if r is None else r[1] for b, r in enumerate(kept)]
            if index == list(range(len(index))):
                q = out[: len(index)]
            else:
                q = out.index_select(0, torch.tensor(index, device=out.device))
            if q.shape[1] >= k:
                return q[:, :k]
            return torch.nn.functional.pad(q, (0, 0, 0, k - q.shape[1]))  # the step's stride grew
        zeros = self._zeros(k, vocab_size, device)  # rows from several steps (e.g. after a preemption)
        return torch.stack([zeros if r is None else torch.cat([r[0][r[1], :len(s.specs)], zeros[len(s.specs):]])
                            for s, r in zip(states, kept)])

    def compute(self, logits, tensors, truncate=True, greedy=False, logprobs=None, branches=False):
        """-> packed [B, 2K+3] (see below), + [N·(1+2k)] logprob columns of the clean indices 0..K when the
        static option `logprobs` = k is set (`clean_logprobs`), and the kept q̃ of the new drafts (or None)."""
        if greedy:
            # every row greedy: all p̃ and q̃ are point masses on argmaxes (alpha <= 1 changes nothing then)
            packed, extra = greedy_isd_step(logits, tensors["is_v"], tensors["specs"], tensors.get("k_row"),
                                            branches, tensors.get("guesses")), None
        else:
            packed, extra = self._compute_sampled(logits, tensors, truncate, branches)
        if logprobs is not None:
            packed = torch.cat([packed, clean_logprobs(logits, tensors["is_v"], tensors["specs"], packed, logprobs)],
                               dim=-1)
        return packed, extra

    def _compute_sampled(self, logits, tensors, truncate, branches=False):
        t = tensors
        return sampled_isd_step(logits, t["is_v"], t["specs"], t["temperature"], t["top_k"], t["top_p"],
                                t["point_mass"], t["argmax_draft"], t["alpha"], t.get("keys"), t.get("draw"),
                                t.get("q_old"), truncate, t.get("k_row"), t.get("draft_temperature"), branches,
                                t.get("block"), t.get("guesses"))

    def finish(self, states, packed, extra, params, stats):
        """The packed columns (see `_compute_sampled`) -> each row's emitted tokens and next state."""
        k = self.stride - 1
        rows_n = self.row_strides(states)
        ks = [k] * len(states) if rows_n is None else (rows_n - 1).tolist()
        n_acc, final = packed[:, 0].astype(np.int64).tolist(), packed[:, 1].astype(np.int64).tolist()
        drafts, final_q = packed[:, 2: 2 + k].astype(np.int64).tolist(), packed[:, 2 + k].tolist()
        drafts_q = packed[:, 3 + k: 3 + 2 * k].tolist()
        G = self.guesses
        guesses = packed[:, 3 + 2 * k: self.packed_width].astype(np.int64).tolist()
        point_mass = self.batch_params(params).rows["point_mass"].tolist()
        results = []
        for b, s in enumerate(states):
            j, kb = n_acc[b], ks[b]
            if s.mode == "C":
                emitted, probs, advance = [final[b]], [final_q[b]], 1
                kind = "cold" if kb else "ar"  # kb = 0: a row of N = 1, a plain AR step
                stats[b].rounds[kind] = stats[b].rounds.get(kind, 0) + 1
            else:
                stats[b].record_verify(kb, j)
                emitted, probs, advance = s.specs[:j] + [final[b]], s.spec_qd[:j] + [final_q[b]], 1 + j
                if G and j < kb and final[b] in s.guesses[j * G: (j + 1) * G]:
                    stats[b].guessed += 1  # (the device took the next drafts from that guess's group)
            # next: verify the new drafts (after a rejection at j: branch j's, when the block has branches)
            if kb and (s.mode == "C" or j == kb or self.branches):
                spec_q = None if point_mass[b] or extra is None else (extra, b)  # the new drafts' q̃: row b
                s.mode, s.last, s.specs, s.spec_q, s.spec_qd = ("V", final[b], drafts[b][:kb], spec_q,
                                                                drafts_q[b][:kb])
                s.guesses = guesses[b]
            else:  # a draft was rejected (or the row drafts nothing): cold start from the final token
                s.mode, s.last, s.specs, s.spec_q, s.spec_qd, s.guesses = "C", final[b], [], None, [], []
            res = StepResult(emitted, advance, probs)
            if params[b].logprobs is not None:  # emitted token i is predicted by clean index i
                res.logprobs, res.top_logprobs = unpack_logprobs(packed[b].tolist(), self.packed_width, self.stride,
                                                                 len(emitted), params[b].logprobs)
            results.append(res)
        return results


# torch 2.11's inductor fails this step's dynamic-batch compile (tiling_utils.get_pw_red_splits asserts on
# batch x ((Q + 1) // 2 - 1) sizes; seen in three H200 runs, docs/stride.md): start with only the batch
# dynamic; batch_rows: one compile per (stride, variant) serves every batch bucket (`batch_rows_of`)
@cuda_fused(start="only the batch dynamic", batch_rows=True)
def sampled_isd_step(logits: torch.Tensor, is_v: torch.Tensor, specs: torch.Tensor, temperature: torch.Tensor,
                     top_k: torch.Tensor, top_p: torch.Tensor, point_mass: torch.Tensor, argmax_draft: torch.Tensor,
                     alpha: torch.Tensor, keys: torch.Tensor | None, draw: torch.Tensor | None,
                     q_old: torch.Tensor | None, truncate: bool | int,
                     k_row: torch.Tensor | None = None,
                     draft_temperature: torch.Tensor | None = None,
                     branches: bool = False, block: torch.Tensor | None = None,
                     guesses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled ISD step as one function (compiled into a few fused kernels on CUDA, inside the decode
    graph). logits [B, 2N−1, V]; per row: is_v, specs [B, K], temperature/top_k/top_p, point_mass,
    argmax_draft, alpha; keys [B, 2] / draw [B] (None: every row greedy with verify_alpha > 1); q_old
    [B, K, V] the q̃ of a V row's drafts (None: all point masses); k_row [B] each row's own K = n − 1 <= K
    (None: every row K; a shorter row's block fills the first 2n − 1 slots, specs / q_old zero-padded);
    draft_temperature [B] the temperature of the MASK slots' q̃ (None: `temperature`); branches: the block
    carries rejection branches (Q = N², `branch_layout`): a V row that rejects at j takes its new drafts from
    branch j's rows instead of the plain MASK rows (and with `guesses`, guessed groups after them); block [B]
    bool: rows whose drafts are verified jointly (`verify_drafts`, block verification;
    None: none); guesses [B, K·G]: each draft's guessed corrections (the block's guess rows): a V row whose
    correction at j is guess m takes its new drafts from guessed group (j, m) (the final token is then drawn
    before the drafts, from the same uniform column)
    -> (packed [B, 2K+3 (+K·G guesses of the new drafts)], q̃ of the new drafts [B, K, V]; a shorter row's
    first k_row columns are its own). A row's draws use uniform columns 0..k_row only, so it gets the same
    numbers as in a step of its own stride. No host sync, no data-dependent shapes."""
    B, Q, V = logits.shape
    k = specs.shape[1]
    n = k + 1
    dev = logits.device
    first_mask = torch.where(is_v, n if k_row is None else k_row + 1, 1)  # [B]: the first MASK slot of each row
    # this step's uniforms of each row: N token draws (K drafts, then the final token), K acceptances
    if keys is not None:
        uniforms = rng.uniforms.__wrapped__  # already inside a compiled region on CUDA
        u_tok = uniforms(keys, draw, rng.STREAM_TOKENS, n)  # [B, N]
        u = uniforms(keys, draw, rng.STREAM_ACCEPT, k)  # [B, K]
    else:  # every row greedy (some with verify_alpha > 1): point masses, acceptance is 0/1
        u_tok, u = None, torch.zeros(B, k, device=dev)

    d_temp = temperature if draft_temperature is None else draft_temperature  # [B]: the MASK slots' (q̃)
    if branches:  # N² slots, of which a row uses N clean ones and K drafts' ones: filter the clean slots now,
        # the K slots of the drafts once the verification has picked them (below; row-wise, the same values)
        probs = None
        p = filtered_probs(logits[:, :n].reshape(B * n, V), *_per_slot((temperature, top_k, top_p), n),
                           truncate).view(B, n, V)
    else:
        # the filtered distribution of every slot at once (one set of softmax / sort kernels, not one for the
        # clean slots and another for the drafts' slots; row-wise, so each slot's values are what it gets alone)
        slot_temp = temperature[:, None].expand(B, Q)  # [B, Q]: clean slots at the request's temperature ...
        if draft_temperature is not None:  # ... its MASK slots (q̃) at the draft temperature
            is_mask_slot = torch.arange(Q, device=dev)[None, :] >= first_mask[:, None]
            slot_temp = torch.where(is_mask_slot, d_temp[:, None], slot_temp)
        probs = filtered_probs(logits.reshape(B * Q, V), slot_temp.reshape(B * Q),
                               *_per_slot((top_k, top_p), Q), truncate).view(B, Q, V)
        p = probs[:, :n]  # p̃ at the clean indices 0..K (C rows use index 0 only)  [B, N, V]

    # verify the previous drafts (V rows; C rows' results are ignored)
    kr = k_row
    n_acc, correction = verify_drafts(p[:, :k], specs, q_old, point_mass, alpha, u, block, kr)
    kb = k if kr is None else kr  # each row's K
    if kr is not None:  # a shorter row has accepted all its drafts once its first k_row are
        n_acc = torch.minimum(n_acc, kr)

    # the one token each row draws at the end: c (C), bonus c (V all accepted) or the correction
    rows = torch.arange(B, device=dev)
    all_ok = is_v & (n_acc == kb)
    bonus = p[rows, k] if kr is None else p[rows, kr]
    final_p = torch.where(is_v[:, None], torch.where(all_ok[:, None], bonus, correction), p[:, 0])
    if guesses is not None:  # the drafts' rows depend on the final token: draw it first
        return _guessed_sampled_tail(logits, final_p, is_v, n_acc, kb, first_mask, u_tok, kr, guesses,
                                     argmax_draft, d_temp, top_k, top_p, truncate, n, branches)

    # next drafts from the MASK slots (C: 1..N−1, V: N..2N−2; a row of its own n: C 1..n−1, V n..2n−2; with
    # branches, a V row that rejected at j: branch j's rows; columns past a row's own K are ignored on the host)
    idx = draft_index(first_mask, is_v, n_acc, kb, n, Q, branches, kr is not None)  # [B, K]
    # the K drafts' q̃ and the final token's distribution side by side  [B, K+1, V]: one inversion samples all
    # of them (one set of scan kernels, not two; row-wise, so each distribution gets the token it gets alone,
    # from the same uniform as before), and q̃ is a view of it (written once)
    sel = logits.gather(1, idx[..., None].expand(B, k, V))  # the drafts' slots' logits  [B, K, V]
    if probs is None:  # branches: the drafts' K slots, filtered now  [B, K, V]
        q_sel = filtered_probs(sel.reshape(B * k, V), *_per_slot((d_temp, top_k, top_p), k), truncate).view(B, k, V)
    else:
        q_sel = probs.gather(1, idx[..., None].expand(B, k, V))
    dists = torch.cat([q_sel, final_p[:, None]], 1)
    q_new = dists[:, :k]  # q̃ of the drafts' slots  [B, K, V]
    if u_tok is None:
        sampled, final = q_new.argmax(-1), final_p.argmax(-1)
    else:  # uniform columns 0..K−1 for the drafts, K (a row of its own n: k_row) for the final token
        cols = torch.arange(n, device=dev)
        both = inverse_cdf(dists, u_tok if kr is None else u_tok.gather(1, torch.where(cols == k, kr[:, None], cols)))
        sampled, final = both[:, :k], both[:, k]
    new_drafts = torch.where(argmax_draft[:, None], chunked_argmax(sel), sampled)
    return _sampled_packed(n_acc, final, new_drafts, final_p, q_new), q_new


def _sampled_packed(n_acc, final, new_drafts, final_p, q_new, guesses=None) -> torch.Tensor:
    """A sampled step's packed output (`_pack_step`) with q(final) and q̃_j(d_j) read off the distributions the
    tokens came from: final_p [B, V], q_new [B, K, V]."""
    drafts_q = q_new.gather(-1, new_drafts[..., None]).squeeze(-1)  # q̃_j(d_j) [B, K]
    return _pack_step(n_acc, final, new_drafts, final_p.gather(-1, final[:, None]), drafts_q, guesses)


def _pack_step(n_acc, final, drafts, final_q, drafts_q, guesses=None) -> torch.Tensor:
    """[B, 2K+3 (+K·G)]: n_accepted, final token, K drafts, q(final) [B, 1], K q̃(draft) [B, K], then the new
    drafts' guessed corrections [B, K·G] when given (ids exact in float32 below 2^24)."""
    cols = [n_acc[:, None].float(), final[:, None].float(), drafts.float(), final_q, drafts_q]
    return cat_columns(cols if guesses is None else cols + [guesses.float()])


def _guessed_sampled_tail(logits, final_p, is_v, n_acc, kb, first_mask, u_tok, kr, guesses, argmax_draft, d_temp,
                          top_k, top_p, truncate, n: int, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampled_isd_step` after verification, with guessed corrections: the final token from final_p [B, V]
    (its uniform column K, or k_row), then the drafts from the rows its value picks (`guess_pick`), filtered
    at the draft temperature, each from its own column 0..K−1 — the columns of the step without guesses."""
    B, Q, V = logits.shape
    k = n - 1
    if u_tok is None:
        final = final_p.argmax(-1)
        cols_u = None
    else:
        cols = torch.arange(n, device=logits.device)
        cols_u = u_tok if kr is None else u_tok.gather(1, torch.where(cols == k, kr[:, None], cols))
        final = inverse_cdf(final_p[:, None], cols_u[:, k:])[:, 0]
    pick = guess_pick(guesses, final, is_v, n_acc, kb, k)
    g = guesses.shape[1] // k
    idx = draft_index(first_mask, is_v, n_acc, kb, n, Q, branches, kr is not None, pick, g, group_rows(Q, n, g))
    sel = logits.gather(1, idx[..., None].expand(B, k, V))  # [B, K, V]
    q_new = filtered_probs(sel.reshape(B * k, V), *_per_slot((d_temp, top_k, top_p), k), truncate).view(B, k, V)
    sampled = q_new.argmax(-1) if cols_u is None else inverse_cdf(q_new, cols_u[:, :k])
    new_drafts = torch.where(argmax_draft[:, None], chunked_argmax(sel), sampled)
    new_guesses = guess_tokens(sel, new_drafts, guesses.shape[1] // k)
    return _sampled_packed(n_acc, final, new_drafts, final_p, q_new, new_guesses), q_new


def group_rows(query_len: int, n: int, g: int) -> int:
    """The rows W of each guessed group of a block of `query_len` rows at stride n with g guesses a draft:
    query_len = 2n−1 + K² + g·K·W (`branch_layout`)."""
    k = n - 1
    w, rest = divmod(query_len - (2 * n - 1) - k * k, g * k)
    if rest or not 1 <= w <= k:
        raise ValueError(f"a block of {query_len} rows is no stride-{n} layout with {g} guesses a draft")
    return w


def guess_pick(guesses: torch.Tensor, final: torch.Tensor, is_v: torch.Tensor, n_acc: torch.Tensor, kb,
               k: int) -> torch.Tensor:
    """[B] which of its G guesses at the rejected draft j = n_acc a V row's correction `final` equals (−1: none,
    or no rejection). guesses [B, K·G] (draft j's at j·G..), final / n_acc [B], kb the rows' K (int or [B])."""
    B = final.shape[0]
    g = guesses.shape[1] // k
    j = n_acc.clamp(max=k - 1)
    cand = guesses.view(B, k, g).gather(1, j[:, None, None].expand(B, 1, g))[:, 0]  # [B, G]
    hit = (cand == final[:, None]) & (is_v & (n_acc < kb))[:, None]
    return torch.where(hit.any(-1), hit.int().argmax(-1), -1)


def guess_tokens(sel: torch.Tensor, drafts: torch.Tensor, g: int) -> torch.Tensor:
    """[B, K·G] the guessed corrections of new drafts: the G highest logits of each draft's row sel [B, K, V]
    other than the draft itself, drafts [B, K] (a draft is only corrected to another token)."""
    B, k, V = sel.shape
    if g == 1:  # the best other than the draft: one reduction that a compiled step fuses (topk is a library sort)
        return chunked_argmax(torch.where(torch.arange(V, device=sel.device) == drafts[..., None], float("-inf"), sel))
    top = sel.topk(g + 1, dim=-1).indices  # [B, K, G+1]
    hit = top == drafts[..., None]
    return torch.where(hit[..., :g].cumsum(-1) > 0, top[..., 1:], top[..., :g]).reshape(B, k * g)


def draft_index(first_mask: torch.Tensor, is_v: torch.Tensor, n_acc: torch.Tensor, kb, n: int, q: int,
                branches: bool, per_row: bool, pick: torch.Tensor | None = None, g: int = 0,
                rows: int | None = None) -> torch.Tensor:
    """[B, K] the block index of each row's next drafts: first_mask + 0..K−1 (the plain MASK rows); with
    branches, a V row that rejected at j = n_acc < its K (kb) takes branch j's rows 2N−1 + j(N−1) + 0..K−1
    (`branch_layout`), or where pick [B] = m >= 0 (`guess_pick`; g guesses a draft) guessed group (j, m)'s
    `rows` rows (None: K) for its first drafts and branch j's rows for the rest.
    per_row: rows of their own K, whose columns past it are clamped into the block."""
    k = n - 1
    cols = torch.arange(k, device=first_mask.device)
    idx = first_mask[:, None] + cols
    if branches:
        rejected = is_v & (n_acc < kb)
        j = n_acc.clamp(max=k - 1)
        branch = group_start(n, j)[:, None] + cols
        if pick is not None:
            guessed = group_start(n, j, pick.clamp(min=0), g, rows)[:, None] + cols
            branch = torch.where((pick >= 0)[:, None] & (cols < (k if rows is None else rows)), guessed, branch)
        idx = torch.where(rejected[:, None], branch, idx)
    return idx.clamp(max=q - 1) if per_row else idx


@cuda_fused(batch_rows=True)  # one compile serves every batch bucket (`batch_rows_of`)
def greedy_isd_step(logits: torch.Tensor, is_v: torch.Tensor, specs: torch.Tensor,
                    k_row: torch.Tensor | None = None, branches: bool = False,
                    guesses: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy ISD step as one function (a couple of fused kernels on CUDA). logits [B, 2N−1, V] (N² with
    rejection branches, more with guessed corrections: `sampled_isd_step`), is_v [B] bool, specs [B, K], k_row
    [B] each row's own K (None: all K; see `sampled_isd_step`), guesses [B, K·G] (`sampled_isd_step`)
    -> packed [B, 2K+3 (+K·G)] (see ISDDecoder.compute)."""
    B, Q = logits.shape[:2]
    k = specs.shape[1]
    n = k + 1
    am = chunked_argmax(logits)  # [B, Q]: argmax at every index
    clean = am[:, :n]  # the clean indices 0..K
    miss = specs != clean[:, :k]  # [B, K]
    if k_row is None and not branches:
        drafts = torch.where(is_v[:, None], am[:, n:2 * n - 1], am[:, 1:n])  # MASK slots: V N..2N−2, C 1..N−1
    if k_row is not None:  # a row of its own n: V n..2n−2, C 1..n−1; columns past its K are ignored on the host
        cols = torch.arange(k, device=logits.device)
        miss = miss | (cols >= k_row[:, None])  # stop after the row's own drafts
    n_acc = torch.where(miss.any(-1), miss.int().argmax(-1), k)  # leading accepted drafts
    final = torch.where(is_v, clean.gather(1, n_acc[:, None]).squeeze(1), clean[:, 0])
    if k_row is not None or branches:
        first_mask = torch.where(is_v, n if k_row is None else k_row + 1, 1)
        kb = k if k_row is None else k_row
        g = 0 if guesses is None else guesses.shape[1] // k
        pick = None if guesses is None else guess_pick(guesses, final, is_v, n_acc, kb, k)
        idx = draft_index(first_mask, is_v, n_acc, kb, n, Q, branches, k_row is not None, pick, g,
                          group_rows(Q, n, g) if g else None)
        drafts = am.gather(1, idx)
    ones = torch.ones_like(drafts, dtype=torch.float32)
    new_guesses = None
    if guesses is not None:
        V = logits.shape[-1]
        new_guesses = guess_tokens(logits.gather(1, idx[..., None].expand(B, k, V)), drafts, g)
    return _pack_step(n_acc, final, drafts, ones[:, :1], ones, new_guesses)


def clean_logprobs(logits: torch.Tensor, is_v: torch.Tensor, specs: torch.Tensor, packed: torch.Tensor,
                   k: int) -> torch.Tensor:
    """Logprob columns (`logprob_columns`) of the clean indices 0..K [B, N·(1+2k)]: index i predicts the
    i-th emitted token of the step. V rows emit s_0..s_{j−1} then the final token (j = n_accepted, so the
    final sits at index j); C rows emit the final token, predicted by index 0. Later indices are scored
    against a placeholder and never read."""
    n = specs.shape[1] + 1
    n_acc, final = packed[:, 0].long(), packed[:, 1].long()
    at = torch.where(is_v, n_acc, torch.zeros_like(n_acc))
    tokens = torch.cat([specs, torch.zeros_like(specs[:, :1])], dim=1).scatter(1, at[:, None], final[:, None])
    return logprob_columns(logits[:, :n], tokens, k)


def _point_mass(p) -> bool:
    """The draft is a deterministic argmax (q = δ_d): argmax drafting, or greedy decoding where q̃ is
    itself the point mass on the argmax (so no q̃ needs to be kept between steps)."""
    return p.draft == "argmax" or p.greedy


def _per_slot(row_params, m: int) -> list[torch.Tensor]:
    """Per-row parameter tensors [B] repeated for m slots per row -> [B*m] each."""
    return [t.repeat_interleave(m) for t in row_params]


class ISDPlainStep(ARDecoder):
    """N = 1 in an ISD / R-ISD stride schedule (`EngineConfig.stride_schedule`): a plain AR step on ISD
    states — the pending token is fed alone, the base model (no MASK slots, no LoRA) gives p̃ and the next
    token is drawn from it. Where a batch is so large that a 2N−1-token step costs more than its
    drafts gain, the engine can fall back to this and stay exactly AR (SPEC §9).

    Exact for the same reason a stride change is: drafts made earlier are dropped (the state restarts
    cold: "no drafts to verify"), the pending token is still the next input, and every emitted token is
    drawn from p̃ of the base model. The next ISD step starts cold from the token drawn here.
    """
    stride = 1
    query_len = 1
    uses_lora = False

    def __init__(self, name: str):
        self.name = name  # "isd" or "risd": the decoder this step stands in for

    def start(self, logits, params, rngs):
        raise RuntimeError("a request's first token is drawn by its ISD decoder, not by an AR fallback step")

    # block / blocks: ARDecoder's (the pending token alone: `last` is all they read)

    def finish(self, states, packed, extra, params, stats):
        results = super().finish(states, packed, extra, params, stats)  # sets each state's pending token
        for s, st in zip(states, stats):
            if s.mode == "V":  # its drafts are dropped: restart cold (a "C" state holds none already)
                s.mode, s.specs, s.spec_q, s.spec_qd, s.guesses = "C", [], None, [], []
            rounds = st.rounds
            rounds["ar"] = rounds.get("ar", 0) + 1
        return results
