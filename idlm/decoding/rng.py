"""Counter-based random numbers (Philox4x32-10) for sampling: per request, batch-invariant, on the device.

Why it exists: a sampled decode step needs random numbers for every request in the batch (the race
that samples from p̃, the drafts' race from q̃, the acceptance uniforms). Drawn from stateful
generators they cost a host call per request and per step, cannot live inside a CUDA graph, and
depend on what else is in the batch. A counter-based generator is a pure function instead:

    random words = Philox4x32-10(counter, key)

with key = the request's 64-bit seed and counter = (position in the draw, stream, the request's draw
number). So each request's numbers depend only on its seed and how many steps it has drawn, never on
the batch; they are computed by elementwise integer ops inside the step's graph (no host work, no
sync); and CPU and GPU give the same bits (integer arithmetic), so the CPU path is an exact reference.

Philox4x32-10 is the generator of Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11),
the one cuRAND and PyTorch's CUDA generator use; the known-answer vectors of its reference
implementation are checked in tests/test_rng.py. The 32x32 -> 64-bit products are computed in 16-bit
halves, so no int64 product ever overflows.
"""

from __future__ import annotations

import torch

from idlm.layers.fused import cuda_fused

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10

# streams: independent sequences of one request's draw (counter word 1)
STREAM_TOKENS = 0  # the race that samples tokens (p̃, q̃, corrections)
STREAM_ACCEPT = 1  # acceptance uniforms of speculative verification


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product m·x, m a 32-bit constant, x [...] int64 in [0, 2^32)."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    x_lo, x_hi = x & 0xFFFF, x >> 16
    ll, lh, hl, hh = x_lo * m_lo, x_lo * m_hi, x_hi * m_lo, x_hi * m_hi  # each < 2^32
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)  # < 3 * 2^16
    low = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    high = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return high & MASK32, low


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32-`rounds` of counters (c0..c3) under keys (k0, k1): int64 tensors (or ints) holding
    32-bit values, broadcast together -> four int64 tensors of 32-bit random words."""
    args = (c0, c1, c2, c3, k0, k1)
    if not any(isinstance(v, torch.Tensor) for v in args):
        c0, c1, c2, c3, k0, k1 = (torch.tensor(v, dtype=torch.int64) for v in args)
    # plain ints stay Python scalars in the ops (no host-to-device copy: capturable in a CUDA graph)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.broadcast_tensors(c0, c1, c2, c3)


def seed_keys(seeds: list[int]) -> torch.Tensor:
    """Per-request 64-bit seeds (any int; taken mod 2^64) -> Philox keys [B, 2] int64 (low, high words)."""
    return torch.tensor([[s & MASK32, (s >> 32) & MASK32] for s in (int(x) % 2**64 for x in seeds)],
                        dtype=torch.int64).reshape(len(seeds), 2)


@cuda_fused
def uniforms(keys: torch.Tensor, draw: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """n uniforms in (0, 1) per row: keys [B, 2] int64, draw [B] int64 (the request's draw number)
    -> [B, n] float32, multiples of 2^-24 (never 0 or 1). Row b depends only on (keys[b], draw[b],
    stream): the same request gets the same numbers in any batch, on CPU and GPU."""
    # column j is word j % 4 of the block j // 4. Each column computes its block's four words and keeps one
    # (n is a step's few draws, so the 4x redundant integer work is nothing) rather than stacking the four
    # words: a stack is a concatenation, which inductor wrote as one kernel per word (the H200's q/k/v
    # taught that, docs/risd.md session 27), here one kernel for all.
    col = torch.arange(n, device=keys.device, dtype=torch.int64)[None]  # [1, n]
    draw = draw.to(torch.int64)[:, None]
    c0, c1, c2, c3 = philox4x32(col // 4, stream, draw & MASK32, (draw >> 32) & MASK32, keys[:, :1], keys[:, 1:])
    lane = col % 4
    w = torch.where(lane == 0, c0, torch.where(lane == 1, c1, torch.where(lane == 2, c2, c3)))  # [B, n]
    return ((w >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def exponentials(keys: torch.Tensor, draw: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """n Exp(1) draws per row (-log of `uniforms`): the noise of the exponential race. [B, n] float32."""
    return -torch.log(uniforms(keys, draw, stream, n))
