"""Training attention masks over the [x_t | x0] layout (SPEC §3.2, §3.5), as pure index functions.

Each mask is written once as a function of (query index, key index) tensors over the 2L sequence
(x_t at 0..L−1, x0 at L..2L−1). The same function serves as FlexAttention's `mask_mod` on CUDA and,
evaluated on broadcast index grids, as the explicit boolean mask of the SDPA path on CPU; tests
compare both against a brute-force construction written loop by loop from the SPEC's words.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _split(idx: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(is the index in the x_t half, its position 0..L−1 within its half)."""
    in_xt = idx < L
    return in_xt, torch.where(in_xt, idx, idx - L)


def _coords(q: torch.Tensor, k: torch.Tensor, L: int, block: int):
    """(q in x_t, k in x_t, q position, k position, q block, k block) of index tensors over [x_t | x0]."""
    q_xt, qi = _split(q, L)
    k_xt, ki = _split(k, L)
    return q_xt, k_xt, qi, ki, qi // block, ki // block


def idlm_mask_fn(L: int, block: int) -> MaskFn:
    """I-DLM (SPEC §3.2), block = B = N−1 MASKs per block:
    x_t→x_t: same block and k ≤ q; x_t→x0: block(k) < block(q); x0→x0: k ≤ q; x0→x_t: never."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")

    def allowed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_xt, k_xt, qi, ki, qb, kb = _coords(q, k, L, block)
        xt_xt = q_xt & k_xt & (qb == kb) & (ki <= qi)
        xt_x0 = q_xt & ~k_xt & (kb < qb)
        x0_x0 = ~q_xt & ~k_xt & (ki <= qi)
        return xt_xt | xt_x0 | x0_x0

    return allowed


def sdar_mask_fn(L: int, block: int) -> MaskFn:
    """SDAR-style baseline (SPEC §3.5): x_t→x_t: same block (bidirectional); x_t→x0: block(k) < block(q);
    x0→x0: block(k) ≤ block(q) (block-causal); x0→x_t: never."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")

    def allowed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_xt, k_xt, _, _, qb, kb = _coords(q, k, L, block)
        return (q_xt & k_xt & (qb == kb)) | (q_xt & ~k_xt & (kb < qb)) | (~q_xt & ~k_xt & (kb <= qb))

    return allowed


def dense_mask(fn: MaskFn, size: int, device="cpu", rows: int | None = None) -> torch.Tensor:
    """The mask as a [1, 1, rows, size] bool tensor (True = may attend) for SDPA: query indices 0..rows−1
    (default all `size`; the x_t half alone is rows = L) against key indices 0..size−1."""
    idx = torch.arange(size, device=device)
    return fn(idx[: size if rows is None else rows, None], idx[None, :])[None, None]


def flex_block_mask(fn: MaskFn, size: int, device="cuda", rows: int | None = None):
    """The mask as a FlexAttention BlockMask (sparse: fully masked tiles are skipped); rows as `dense_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, k: fn(q, k), None, None, size if rows is None else rows, size,
                             device=device)
