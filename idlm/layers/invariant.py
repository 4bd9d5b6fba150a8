"""Batch-invariant kernels (issue 16's exact mode): y = x Wᵀ and RMSNorm whose every row has the same
bits whatever the other rows are — how many, in which order, from which requests.

Why cuBLAS is not: it picks tile shapes, split-K and the reduction order per (M, N, K), so a token's
projection in a 1-row AR step and in a 7-row ISD verify step (or a 64-row batch) may round differently in
bf16, and a greedy near-tie can flip. This Triton kernel fixes everything a row's value depends on:
tiles of BLOCK_M × BLOCK_N with a K loop in BLOCK_K steps from 0 upwards, float32 accumulation, no
split-K, the same launch configuration for every M — so row i's dot products are computed by the same
instructions in the same order whether the tile holds 1 row or 64, and rows never mix. The column tile
is chosen from the weight's rows and the device (`block_n`), never from the number of input rows.
The cost is a fixed tiling (no autotuning per shape); exact mode trades that speed for invariance.

Under TRITON_INTERPRET=1 it runs on CPU tensors; tests check a row's bits are unchanged when rows are
added, removed or reordered, and the values against torch.
"""

from __future__ import annotations

import functools

import torch

from idlm.layers.paged_kernel import device_sm_count

BLOCK_M, BLOCK_K = 32, 64
BLOCK_N_CHOICES = (64, 32, 16)


def block_n(n: int, sm_count: int) -> int:
    """Output columns per program for a weight of n rows: the widest tile that still gives every SM two
    programs (a decode step has one row tile, so the column tiles are all the parallelism), else 16. It
    depends on the weight and the device only — never on the number of rows — so row invariance holds."""
    for bn in BLOCK_N_CHOICES:
        if -(-n // bn) >= 2 * sm_count:
            return bn
    return BLOCK_N_CHOICES[-1]


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def invariant_mm(X, W, B, Y, M, N, K, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):  # one fixed order of K chunks for every row
            kk = k0 + rk
            x = tl.load(X + rm[:, None] * s_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(W + rn[:, None] * s_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            if IEEE:  # float32 operands: full-precision products (no TF32)
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return invariant_mm


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]ᵀ (+ bias [N]) -> [..., N] in x's dtype, each row's bits independent of the
    other rows (module docstring). x and weight need unit stride in K."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"invariant_linear: x has {K} features, weight expects {weight.shape[1]}")
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("invariant_linear needs unit stride in the feature dimension")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bn = block_n(N, device_sm_count(x.device))
    grid = (-(-M // BLOCK_M), -(-N // bn))
    _kernel()[grid](x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0),
                    y.stride(0), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BM=BLOCK_M, BN=bn,
                    BK=BLOCK_K, num_warps=4)
    return y.reshape(*shape[:-1], N)


@functools.cache
def _norm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(X, RES, GATE, W, S_OUT, Y, dim, eps, s_x, s_r, s_s, s_y,
                      HAS_RES: tl.constexpr, DUAL: tl.constexpr, PAIR: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one row, its whole width in one block: one reduction order for every row
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        x = tl.load(X + row * s_x + cols, mask=ok, other=0.0)
        if DUAL or PAIR:
            g = tl.load(GATE + row).to(x.dtype)
        if DUAL:  # [base, delta] halves: base + gate·delta
            x = x + tl.load(X + row * s_x + dim + cols, mask=ok, other=0.0) * g
        if HAS_RES:
            x = tl.load(RES + row * s_r + cols, mask=ok, other=0.0) + x
            tl.store(S_OUT + row * s_s + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
        y = tl.load(W + cols, mask=ok, other=0.0) * (xf * inv).to(x.dtype)
        tl.store(Y + row * s_y + cols, y, mask=ok)
        if PAIR:
            tl.store(Y + row * s_y + dim + cols, y * g, mask=ok)

    return rms_norm_rows


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None, pair: bool = False, dual: bool = False):
    """RMSNorm with `idlm.layers.norm.RMSNorm.forward`'s options (residual add; R-ISD's `dual` [base, delta]
    input and `pair` [y, gate·y] output) in one launch, one program per row: a row's bits do not depend on
    the other rows. x [..., dim] (dual: [..., 2·dim]) -> y, or (residual + x, y) with a residual."""
    width = x.shape[-1]
    dim = weight.shape[0]
    if width != (2 * dim if dual else dim):
        raise ValueError(f"invariant_rms_norm: input width {width} for a norm of {dim}{' (dual)' if dual else ''}")
    if dual and residual is None:
        raise ValueError("a dual input needs the residual stream it is added to")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, width)
    rows = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(rows, 2 * dim if pair else dim, dtype=x.dtype, device=x.device)
    res = residual.reshape(-1, dim) if residual is not None else x2
    if res.stride(-1) != 1:
        res = res.contiguous()
    s_out = torch.empty(rows, dim, dtype=x.dtype, device=x.device) if residual is not None else y
    g = gate.reshape(-1).to(x.dtype) if gate is not None else x2
    if (pair or dual) and gate is None:
        raise ValueError("pair and dual need the R-ISD gate")
    if rows:
        _norm_kernel()[(rows,)](x2, res, g, weight, s_out, y, dim, eps, x2.stride(0), res.stride(0), s_out.stride(0),
                                y.stride(0), HAS_RES=residual is not None, DUAL=dual, PAIR=pair,
                                BLOCK=1 << (dim - 1).bit_length(), num_warps=4)
    y = y.reshape(*lead, y.shape[-1])
    return (s_out.reshape(*lead, dim), y) if residual is not None else y
