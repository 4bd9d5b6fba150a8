"""SDAR-style block-diffusion decoding: the baseline I-DLM is compared against (SPEC §3.5, §6).

Why it exists: I-DLM's claims (TPF, introspective acceptance α, quality) are relative to a block
diffusion LM that decodes the way SDAR does. This decoder runs such a model (trained as in §3.5)
through the same runner and engine as AR and ISD, so every number is measured the same way.

Semantics (B = block size, τ = confidence threshold, L0 = prompt length):

- No logit shift: the output at a MASK at position i is a distribution over the token *at* i.
- Blocks are aligned to the end of the prompt: generation block k covers L0+kB .. L0+(k+1)B−1.
  The prompt is prefilled causally by the runner; `start` ignores the prefill logits and emits
  nothing; every request starts with a block of B MASKs.
- Each forward predicts every still-masked slot of the current block, which attends to the
  committed prefix and bidirectionally to its whole block. Per masked slot a candidate and its
  confidence: T > 0: candidate ~ p̃ (`filtered_probs`, the request's temperature/top-k/top-p),
  confidence = p̃(candidate); T = 0: candidate = argmax ℓ, confidence = softmax(ℓ)[candidate] (the
  model's own probability: the point-mass p̃ of greedy decoding would make every slot certain).
  Every masked slot with confidence ≥ τ is unmasked, and at least the single most confident one
  (ties: the lowest index). τ = 1 thus unmasks one slot per forward (unless a probability
  rounds to exactly 1), a tiny τ the whole block in one forward. Candidates are not filtered: a
  model that predicts the MASK id gets it (the state tracks masked slots separately from tokens).
- When the block is full its B tokens are emitted in order, in that same step (the runner applies
  the stop rules token by token, truncating at EOS / stop ids / max_tokens). Each token's
  `StepResult.probs` entry is p̃(token) at the forward that unmasked it (1 under greedy decoding):
  the generation side of the introspective acceptance rate α (SPEC §7). With `SamplingParams.logprobs`
  each token's raw logprob (and top-k) is the logits of its own slot at the forward that unmasked it.
- A finished block is committed to the KV cache as *clean* tokens: its KV is recomputed from its
  final tokens with bidirectional attention inside the block over the committed prefix (the x0
  half of §3.5 training is block-causal), never kept from a forward whose inputs held MASKs.

Query layout: Q = 2B tokens at positions P..P+2B−1 (P = kept KV length), always with the same
visibility: the first half sees the prefix and the first half (visible = B−1), the second half
sees everything (visible = 2B−1).

  in progress   [current block (MASK where undecided) | MASK × B padding]   advance 0
  after finish  [finished block, clean                | new block, MASK × B] advance B

In the first layout the current block is the first half and never sees the padding, whose logits
are ignored; its KV is dropped (advance 0) because its inputs hold MASKs. The step after a block
finishes uses the second layout: the first half writes the finished block's clean KV (kept:
advance B) while the second half already runs the first denoising forward of the next block. The
next block may finish in that same forward (it is emitted at once, and committed by the next one).
Requests start in the first layout (the prompt's KV is already written by prefill).

Why this layout, among the alternatives:
- The runner stacks every active request's block into one tensor, so Q must be one constant; a
  request that commits (2B) and one that is mid-block (B) must share a step. Padding the mid-block
  layout to 2B gives that, with one fixed visibility pattern (CUDA-graph friendly, like ISD's
  padded cold-start block, SPEC §8).
- Committing inside the next block's first forward costs no forward of its own, so the runner's
  counters give exactly TPF = committed / forwards = B / (denoising forwards per block), SPEC §6.
  A separate commit forward (SDAR's reference loop re-runs the finished block to store its KV)
  would add one forward per block; keeping the KV of the last denoising forward would cache KV
  computed from MASK inputs.
- Lagging the cache one block behind ([previous block clean | current block], re-run each step)
  costs the same 2B tokens but has no previous block for the first generation block (the prompt's
  tail is already cached, causally) and would need a second layout there anyway.
The price: 2B query tokens per forward where B would do mid-block (memory-bound decode barely
notices; compute overhead per SPEC §7 is 2B / TPF).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.decoding.base import Decoder, QueryBlock, StepResult
from idlm.decoding.logprobs import logprob_columns, unpack_logprobs
from idlm.decoding.sampling import filtered_probs, params_tensors, sample
from idlm.errors import ConfigError


@dataclass
class SDARState:
    tokens: list[int]  # the current block's B slots (the MASK id where still masked)
    masked: list[bool]  # which slots are still masked
    q: list[float]  # p̃(token) of each decoded slot when it was drawn (the α statistic, SPEC §7); nan if masked
    finished: list[int] | None = None  # a block emitted last step whose clean KV the next forward writes
    blocks_done: int = 0  # finished blocks (for inspection)
    # SamplingParams.logprobs: each decoded slot's raw logprob and top-k at the forward that unmasked it
    lp: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


def fresh_state(block_size: int, mask_token_id: int, finished: list[int] | None = None, blocks_done: int = 0
                ) -> SDARState:
    return SDARState([mask_token_id] * block_size, [True] * block_size, [float("nan")] * block_size, finished,
                     blocks_done, [float("nan")] * block_size, [[] for _ in range(block_size)])


def sdar_visible(block_size: int) -> list[int]:
    """The one visibility pattern [2B]: first half sees up to B−1, second half up to 2B−1."""
    return [block_size - 1] * block_size + [2 * block_size - 1] * block_size


def sdar_block(state: SDARState, block_size: int, mask_token_id: int) -> QueryBlock:
    """The 2B query block: [current | MASK padding] mid-block, [finished clean | current] after a finish."""
    b = block_size
    if state.finished is None:
        tokens = state.tokens + [mask_token_id] * b
        is_mask = state.masked + [True] * b
    else:
        tokens = state.finished + state.tokens
        is_mask = [False] * b + state.masked
    return QueryBlock(tokens=tokens, is_mask=is_mask, visible=sdar_visible(b))


def current_offset(state: SDARState, block_size: int) -> int:
    """Index in the query block where the current block starts: 0 mid-block, B after a finish."""
    return 0 if state.finished is None else block_size


def candidates(logits: torch.Tensor, params, rngs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot a candidate, its confidence and p̃ of it: logits [R, B, V] -> (tokens [R, B] long,
    conf [R, B], q [R, B] float32).

    T > 0: token ~ p̃, conf = q = p̃(token). T = 0: token = argmax, conf = softmax(logits)[token], q = 1
    (p̃ is the point mass: the distribution the token was drawn from).
    """
    R, B, V = logits.shape
    temp, top_k, top_p = params_tensors(params, logits.device)
    p = filtered_probs(logits.reshape(R * B, V), *(t.repeat_interleave(B) for t in (temp, top_k, top_p)))
    p = p.view(R, B, V)
    drawn = sample(p, rngs)  # [R, B]; drawn every step so each row's draw number counts its steps
    greedy = (temp <= 0)[:, None]  # [R, 1]
    top = logits.float().argmax(-1)  # [R, B]
    tokens = torch.where(greedy, top, drawn)
    plain = torch.softmax(logits.float(), dim=-1).gather(-1, top[..., None])[..., 0]
    q = p.gather(-1, tokens[..., None])[..., 0]
    conf = torch.where(greedy, plain, q)
    return tokens, conf, q


def unmask_choice(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Slots to unmask: conf [R, B], masked [R, B] bool -> [R, B] bool.

    Every masked slot with conf >= threshold, plus the most confident masked slot (ties: lowest index);
    rows without a masked slot get none.
    """
    c = torch.where(masked, conf, torch.full_like(conf, -1.0))
    best = torch.zeros_like(masked).scatter_(-1, c.argmax(-1, keepdim=True), True)
    return masked & ((conf.double() >= threshold) | best)  # compared in float64: τ exactly as given


class SDARDecoder(Decoder):
    name = "sdar"
    needs_mask_token = True
    uses_lora = False

    def __init__(self, block_size: int, mask_token_id: int | None, threshold: float = 0.9):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f"invalid SDAR block_size={block_size!r}: must be an integer >= 1")
        if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not 0 < threshold <= 1):
            raise ConfigError(f"invalid SDAR confidence threshold={threshold!r}: must be in (0, 1]")
        if mask_token_id is None:
            raise ConfigError("the SDAR decoder needs a MASK token id; this model has none")
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.threshold = float(threshold)
        self.query_len = 2 * block_size

    @property
    def stride(self) -> int:
        """The block size under the name the CLI gives it (`--stride`), for reports."""
        return self.block_size

    def start(self, logits, params, rngs):
        """The prefill logits are not used (no logit shift): every request begins with B MASKs, emitting nothing."""
        n = logits.shape[0]
        return ([fresh_state(self.block_size, self.mask_token_id) for _ in range(n)],
                [StepResult([], 0, []) for _ in range(n)])

    def block(self, state: SDARState) -> QueryBlock:
        return sdar_block(state, self.block_size, self.mask_token_id)

    @torch.no_grad()
    def step(self, states, logits, params, rngs, stats):
        R, Q, V = logits.shape
        b, dev = self.block_size, logits.device
        offset = torch.tensor([current_offset(s, b) for s in states], device=dev)
        idx = offset[:, None] + torch.arange(b, device=dev)  # [R, B]
        cur = logits.gather(1, idx[..., None].expand(R, b, V))  # [R, B, V] the current block's logits
        tokens, conf, q = candidates(cur, params, rngs)
        masked = torch.tensor([s.masked for s in states], dtype=torch.bool, device=dev)
        chosen = unmask_choice(conf, masked, self.threshold).tolist()
        tokens_l, q_l = tokens.tolist(), q.tolist()
        lp_rows = _slot_logprobs(cur, tokens, params)
        results = []
        for r, s in enumerate(states):
            advance = 0 if s.finished is None else b  # keep the finished block's clean KV
            for j in range(b):
                if chosen[r][j]:
                    s.tokens[j], s.masked[j], s.q[j] = tokens_l[r][j], False, q_l[r][j]
                    if lp_rows[r] is not None:  # the logits of slot j (no shift) predicted its token
                        s.lp[j], s.top[j] = lp_rows[r][0][j], lp_rows[r][1][j]
            if any(s.masked):
                res = StepResult([], advance, [])
                s.finished = None
            else:
                res = StepResult(list(s.tokens), advance, list(s.q))
                if params[r].logprobs is not None:
                    res.logprobs, res.top_logprobs = list(s.lp), list(s.top)
                nxt = fresh_state(b, self.mask_token_id, res.emitted, s.blocks_done + 1)
                s.tokens, s.masked, s.q, s.finished, s.blocks_done = (nxt.tokens, nxt.masked, nxt.q, nxt.finished,
                                                                      nxt.blocks_done)
                s.lp, s.top = nxt.lp, nxt.top
            results.append(res)
        return results


def _slot_logprobs(cur: torch.Tensor, tokens: torch.Tensor, params) -> list:
    """Per row of the current block's logits [R, B, V] and candidates [R, B]: (logprobs [B], top-k lists [B])
    for rows that asked for logprobs, None for the others (nothing is computed for them)."""
    out: list = [None] * len(params)
    want = [r for r, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return out
    k = max(params[r].logprobs for r in want)
    rows = torch.tensor(want, device=cur.device)
    packed = logprob_columns(cur[rows], tokens[rows], k).tolist()
    for i, r in enumerate(want):
        out[r] = unpack_logprobs(packed[i], 0, cur.shape[1], cur.shape[1], params[r].logprobs)
    return out
