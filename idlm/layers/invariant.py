"""Batch-invariant kernels (issue 16's exact mode): y = x Wᵀ and RMSNorm whose every row has the same
bits whatever the other rows are — how many, in which order, from which requests.

Why cuBLAS is not: it picks tile shapes, split-K and the reduction order per (M, N, K), so a token's
projection in a 1-row AR step and in a 7-row ISD verify step (or a 64-row batch) may round differently in
bf16, and a greedy near-tie can flip. This Triton kernel fixes everything a row's value depends on:
tiles of BLOCK_M × BLOCK_N with float32 accumulation, K cut into BLOCK_K chunks and the chunks into S
fixed splits, the same launch configuration for every M — so row i's dot products are computed by the same
instructions in the same order whether the tile holds 1 row or 64, and rows never mix. The column tile
(`block_n`) and the split count (`split_k`) are chosen from the weight's shape and the device, never from
the number of input rows.

The fixed split-K: a decode step has one row tile, so with only N / BLOCK_N programs each streaming the
whole K of its columns the step cannot saturate HBM (too few programs in flight). When N alone gives too
few programs, K is cut into S contiguous ranges of whole BLOCK_K chunks (`k_partition`); program (row
tile, column tile, split s) accumulates its range in float32, chunk by chunk from low K upwards, into a
float32 partial [S, M, N], and a second kernel sums the S partials of each element in the order
s = 0, 1, …, S-1, adds the bias and casts. Unlike cuBLAS's split-K this is still row-invariant: S, the
chunk boundaries and both summation orders depend on (N, K, device) only, and every output element is
reduced on its own, so a row's partials and their sum are the same instructions whatever M is. (With
S = 1 — wide weights such as an LM head — one kernel stores directly.) Large M runs in row slabs so the
partial buffer stays bounded (`PARTIAL_ELEMENTS`); rows never depend on their slab either.

The cost is a fixed tiling (no autotuning per shape); exact mode trades that speed for invariance.

Under TRITON_INTERPRET=1 it runs on CPU tensors; tests check a row's bits are unchanged when rows are
added, removed or reordered, with and without splits, and the values against torch.
"""

from __future__ import annotations

import functools

import torch

from idlm.layers.paged_kernel import device_sm_count

BLOCK_M, BLOCK_K = 32, 128
BLOCK_N_CHOICES = (64, 32, 16)
PROGRAMS_PER_SM = 4  # split K until the grid of a one-row-tile (decode) launch has this many programs per SM
# split only weights of at least this many elements (32 MiB in bf16): streaming a large weight with few
# programs leaves HBM bandwidth unused, which K splits recover (an 8B model's projections: H200 exact/default
# step 1.24x -> 1.13x at batch 1, docs/exact.md); a small weight is read in a few µs, where the second
# kernel's launch would cost more than it saves (a 135M model's step is bound by kernel count)
MIN_SPLIT_ELEMENTS = 1 << 24
MAX_SPLITS = 16
PARTIAL_ELEMENTS = 1 << 24  # float32 partial sums held at once (64 MiB): large M runs in row slabs
REDUCE_BLOCK = 1024


def block_n(n: int, sm_count: int) -> int:
    """Output columns per program for a weight of n rows: the widest tile that still gives every SM two
    programs (a decode step has one row tile, so the column tiles are all the parallelism), else 16. It
    depends on the weight and the device only — never on the number of rows — so row invariance holds."""
    for bn in BLOCK_N_CHOICES:
        if -(-n // bn) >= 2 * sm_count:
            return bn
    return BLOCK_N_CHOICES[-1]


def k_partition(k: int, splits: int) -> tuple[int, int]:
    """(splits, chunks per split) of a K of k features cut into at most `splits` contiguous ranges of whole
    BLOCK_K chunks: each range but the last holds the same number of chunks, and no range is empty (so
    fewer splits come back when K has fewer chunks than asked for)."""
    if splits < 1:
        raise ValueError(f"k_partition: {splits} splits (need >= 1)")
    chunks = max(1, -(-k // BLOCK_K))
    per = -(-chunks // min(splits, chunks))
    return -(-chunks // per), per


def split_k(n: int, k: int, sm_count: int) -> int:
    """K splits S for a weight [n, k] on a device of sm_count SMs: 1 for a weight of fewer than
    MIN_SPLIT_ELEMENTS elements or when the column tiles of one row tile (ceil(n / block_n)) already give
    PROGRAMS_PER_SM programs per SM, else the smallest power of two with
    tiles · S >= PROGRAMS_PER_SM · sm_count, at most MAX_SPLITS and at most the number of BLOCK_K chunks
    (`k_partition`). A function of the weight and the device only — never of the number of rows — so a
    row's partial sums and their reduction order are the same in every batch."""
    if n * k < MIN_SPLIT_ELEMENTS:
        return 1
    tiles = -(-n // block_n(n, sm_count))
    want = PROGRAMS_PER_SM * sm_count
    s = 1
    while tiles * s < want and s < MAX_SPLITS:
        s *= 2
    return k_partition(k, s)[0]


def num_stages(element_size: int) -> int:
    """Software-pipeline depth of the K loop (loads of later chunks in flight while one is multiplied): 3 for
    16-bit operands, 2 for float32 (twice the shared memory per stage). Scheduling only: it changes no
    arithmetic, so not the bits."""
    return 3 if element_size <= 2 else 2


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def invariant_mm(X, W, B, Y, P, M, N, K, CPS, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                     IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm = tl.program_id(0)  # row tiles vary fastest: the row tiles of one weight tile run side by side
        pn = tl.program_id(1)
        ps = tl.program_id(2)  # K split: chunks [ps·CPS, (ps+1)·CPS) of BK features
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        k_lo = ps * CPS * BK
        k_hi = tl.minimum(K, k_lo + CPS * BK)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(k_lo, k_hi, BK):  # one fixed order of K chunks for every row
            kk = k0 + rk
            x = tl.load(X + rm[:, None] * s_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(W + rn[:, None] * s_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            if IEEE:  # float32 operands: full-precision products (no TF32)
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        ok = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT:  # float32 partial [S, M, N] (contiguous), summed by `reduce_splits`
            tl.store(P + ps * M * N + rm[:, None] * N + rn[None, :], acc, mask=ok)
        else:
            if HAS_BIAS:
                acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def reduce_splits(P, B, Y, M, N, S, s_ym, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index into [M, N]
        ok = i < M * N
        row = i // N
        col = i % N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(0, S):  # s = 0, 1, …, S-1 for every element: one reduction order
            acc += tl.load(P + s * M * N + i, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(B + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * s_ym + col, acc.to(Y.dtype.element_ty), mask=ok)

    return invariant_mm, reduce_splits


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     splits: int | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]ᵀ (+ bias [N]) -> [..., N] in x's dtype, each row's bits independent of the
    other rows (module docstring). x and weight need unit stride in K. `splits` overrides `split_k`'s count
    (tests, tuning); whatever it is, it must be the same for every call whose rows are compared."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"invariant_linear: x has {K} features, weight {tuple(weight.shape)} expects "
                         f"{weight.shape[-1]}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"invariant_linear: bias {tuple(bias.shape)} for {N} outputs")
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("invariant_linear needs unit stride in the feature dimension")
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    sm = device_sm_count(x.device)
    bn = block_n(N, sm)
    S, cps = k_partition(K, split_k(N, K, sm) if splits is None else splits)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    mm, reduce = _kernel()
    b = bias if bias is not None else weight
    meta = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BM=BLOCK_M, BN=bn, BK=BLOCK_K,
                num_warps=4, num_stages=num_stages(x.element_size()))
    if M and S == 1:  # one kernel, direct store
        mm[(-(-M // BLOCK_M), -(-N // bn), 1)](x2, weight, b, y, y, M, N, K, cps, x2.stride(0), weight.stride(0),
                                               y.stride(0), SPLIT=False, **meta)
    elif M:
        slab = max(BLOCK_M, PARTIAL_ELEMENTS // (S * N) // BLOCK_M * BLOCK_M)  # rows per launch pair
        part = torch.empty(S, min(slab, M), N, dtype=torch.float32, device=x.device)  # [S, rows, N]
        for r0 in range(0, M, slab):
            xs, ys = x2[r0:r0 + slab], y[r0:r0 + slab]
            m = xs.shape[0]
            mm[(-(-m // BLOCK_M), -(-N // bn), S)](xs, weight, b, ys, part, m, N, K, cps, xs.stride(0),
                                                   weight.stride(0), ys.stride(0), SPLIT=True, **meta)
            reduce[(-(-(m * N) // REDUCE_BLOCK),)](part, b, ys, m, N, S, ys.stride(0), HAS_BIAS=bias is not None,
                                                   BLOCK=REDUCE_BLOCK, num_warps=4)
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
