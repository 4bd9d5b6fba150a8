"""Small deterministic fake models with the interface the reference runner uses.

`idlm.decoding.reference.generate` calls `hidden = model(tokens [B, Q], positions [B, Q], attn, **kwargs)`
and then `model.compute_logits(hidden)`, and reads `model.config`, `model.device` and `model.dtype`.
A fake returns logits directly from `__call__` (so `compute_logits` is the identity) and never uses
the attention backend: its output at a position depends only on the tokens of the current query
block, which is all the ISD decoders need for an exactly known oracle.

`MarkovModel` is a first-order Markov chain with a (scriptable) perfect drafter:
- a clean position holding token t predicts next(t) with a large logit margin, so greedy AR output is
  the chain t0, next(t0), next(next(t0)), ... (`chain`);
- a MASK slot j of the query block finds the last clean token of the block before it (index i0) and
  predicts next^(j - i0 + 1)(token at i0): the token two steps after the one the MASK stands in for,
  which is exactly what a perfect ISD drafter must say (SPEC §4.2, logit shift);
- with probability 1 - draft_accuracy (i.i.d. per MASK slot per forward, drawn from the fake's own
  generator) or at scripted (forward, draft) pairs `wrong_at`, the MASK slot predicts a wrong token
  instead (never the right one, never MASK).
next() is one cycle through all non-MASK tokens, so a greedy chain repeats no token for vocab−1 steps
and never produces the MASK id.
"""

from __future__ import annotations

import torch

from idlm.models.config import ModelConfig


class MarkovModel:
    def __init__(self, vocab: int, mask_id: int | None, draft_accuracy: float = 1.0, seed: int = 0,
                 wrong_at: set[tuple[int, int]] | None = None, margin: float = 10.0,
                 eos_token_id: int | None = None, max_positions: int = 4096):
        """wrong_at: (call, j) pairs where draft j (the j-th MASK slot of each row's block, 0-based) is
        wrong; call 0 is the prefill forward, call c >= 1 the c-th decode forward."""
        if mask_id is not None and not 0 <= mask_id < vocab:
            raise ValueError("mask_id outside the vocabulary")
        self.vocab, self.mask_id, self.p, self.margin = vocab, mask_id, float(draft_accuracy), margin
        self.wrong_at = set(wrong_at or ())
        self.calls = 0
        self.config = ModelConfig(family="llama", vocab_size=vocab, hidden_size=8, intermediate_size=8,
                                  num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                                  max_position_embeddings=max_positions, eos_token_id=eos_token_id,
                                  mask_token_id=mask_id)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.tensor([t for t in range(vocab) if t != mask_id])
        self.order = tokens[torch.randperm(len(tokens), generator=g)]  # the cycle of next()
        self.rank = torch.full((vocab,), -1, dtype=torch.long)  # position of a token in the cycle
        self.rank[self.order] = torch.arange(len(self.order))
        self.next = torch.zeros(vocab, dtype=torch.long)
        self.next[self.order] = self.order.roll(-1)
        if mask_id is not None:
            self.next[mask_id] = self.order[0]  # never consulted for MASK slots; keeps the table total
        self.gen = torch.Generator().manual_seed(seed + 1)

    device = torch.device("cpu")
    dtype = torch.float32

    # ------------------------------------------------------------------------------ oracle
    def step(self, t: int, k: int = 1) -> int:
        """next^k(t)."""
        for _ in range(k):
            t = int(self.next[t])
        return t

    def chain(self, prompt: list[int], n: int) -> list[int]:
        """Greedy AR output of n tokens: next(last prompt token), then next of that, ..."""
        out, t = [], prompt[-1]
        for _ in range(n):
            t = self.step(t)
            out.append(t)
        return out

    # ---------------------------------------------------------------------------- forward
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attn=None, **kwargs) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        B, Q = tokens.shape
        is_mask = tokens == self.mask_id if self.mask_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        idx = torch.arange(Q).expand(B, Q)
        anchor = torch.where(is_mask, -1, idx).cummax(dim=1).values  # last clean index <= i
        has_anchor = anchor >= 0
        anchor_tok = tokens.gather(1, anchor.clamp_min(0))
        steps = torch.where(has_anchor, idx - anchor + 1, 1)
        target = anchor_tok.clone()
        for k in range(1, int(steps.max()) + 1):
            target = torch.where(steps >= k, self.next[target], target)
        target = torch.where(has_anchor, target, self.order[0])

        # wrong drafts on MASK slots: i.i.d. with probability 1 - p, plus the scripted ones
        wrong = torch.rand(B, Q, generator=self.gen) >= self.p
        draft_index = is_mask.long().cumsum(1) - 1  # j-th MASK slot of the row
        for c, j in self.wrong_at:
            if c == call:
                wrong |= draft_index == j
        wrong &= is_mask
        n_other = len(self.order) - 1  # tokens that are neither MASK nor the right one
        shift = torch.randint(1, max(2, n_other + 1), (B, Q), generator=self.gen)
        wrong_tok = self.order[(self.rank[target] + shift) % len(self.order)]
        target = torch.where(wrong, wrong_tok, target)

        logits = torch.zeros(B, Q, self.vocab)
        logits.scatter_(-1, target[..., None], self.margin)
        if self.mask_id is not None:
            logits[..., self.mask_id] = -self.margin
        return logits
