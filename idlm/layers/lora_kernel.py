"""A projection with its gated LoRA in one Triton kernel, for the few rows of a decode step.

Why it exists: `Transformer.fuse_lora`'s "select" layout runs R-ISD's projections as AR's, one matmul each, by
folding the adapter into a second copy of every weight ([W ; W + D], D = scale·B·A): the step reads twice AR's
weight bytes. For idlm-tiny-ar that is ~52 MB a step against AR's ~29 MB, more than an H100's 50 MB L2, and its
R-ISD step's GEMMs cost ~17 µs more than AR's although their shapes alone cost the same (docs/risd.md, session
38; `scripts/bench_small_gemm.py`). Here the adapter stays low-rank: one program per (row block, column block)
computes

    y = x·Wᵀ + gate ⊙ ((x·Aᵀ)·B'ᵀ),        B' = scale·B,

reading W once plus the small factors (A [R, K], B' [N, R]), with no second weight copy, no extra launch for the
LoRA and the gate applied per row (so the consumers — norms, RoPE, SiLU — are AR's, not the select layout's
gated variants). The rows with gate 0 get x·Wᵀ: the base model's projection, as R-ISD's verification needs
(within float32 accumulation order of cuBLAS's; float32 inputs are multiplied in IEEE float32, never TF32).

`lowrank_factors` builds (W, A, B', segments) of projections side by side (q/k/v, gate/up): A stacked, B'
block-diagonal.
`lora_linear` is the eager reference (what CPU and any shape runs); `lora_linear_rows` the kernel; `lora_mm` picks
one for `Transformer.fuse_lora`'s "lowrank" layout. `choose_lora_layout` is when the engine's default
`lora_layout="auto"` takes that layout: where a step's weights fit the GPU's L2 with it and not with "select"
(idlm-tiny-ar in bf16: its R-ISD step 1.175× AR's against select's 1.255× on an H200; SmolLM2-135M, whose
weights fit neither, is faster with select — docs/risd.md, session 39).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from idlm.layers.paged_kernel import triton_available

BLOCK_M = 16  # the kernel's rows a program: tl.dot's least
LORA_KERNEL_MAX_ROWS = 32  # `lora_mm` takes the kernel up to this many rows (a few decode blocks), else matmuls
L2_FIT = 0.75  # the share of the L2 a step's weights may take and still be read from it (`choose_lora_layout`)


def kernel_tile(k: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_warps) of `lora_linear_rows` for a reduced dimension k: 16 output columns a program
    (the most programs for a decode step's narrow weights; idlm-tiny-ar's q/k/v get 40 instead of 10 at 64), 128
    of k a step with 4 warps, 256 with 2 past k = 512. The fastest tile per idlm-tiny-ar projection on an H100
    (`scripts/bench_small_gemm.py`'s `kernel_tiles`, docs/risd.md session 39) or within 2% of it."""
    return (16, 256, 2) if k > 512 else (16, 128, 4)


def choose_lora_layout(select_bytes: int, lowrank_bytes: int, l2_bytes: int | None) -> str:
    """The fused-LoRA layout `EngineConfig(lora_layout="auto")` runs: "lowrank" where the weights a decode step
    reads stay in the GPU's L2 with it (W plus the low-rank factors, `lowrank_bytes`, at most L2_FIT of
    `l2_bytes`) and would not with "select" (W and W + D, `select_bytes`); else "select", which runs each
    projection as cuBLAS's one GEMM. Measured (docs/risd.md, session 39; 50 MiB L2): idlm-tiny-ar, 34 MB
    lowrank / 52 MB select, the R-ISD step 1.175× AR's with "lowrank" against 1.255× with "select" (H200);
    SmolLM2-135M, whose weights never fit, 2.104× against 2.245× AR's tokens/s the other way round.
    l2_bytes None (no GPU): "select"."""
    if l2_bytes and lowrank_bytes <= L2_FIT * l2_bytes < select_bytes:
        return "lowrank"
    return "select"


def lowrank_factors(layer_lora, named: list[tuple[str, nn.Linear]], weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple | None]:
    """(W [N, K], A [R, K], B' [N, R], segments) of the projections `named` (name, Linear; at most 3) side by
    side: W their weights concatenated (or `weight`, that concatenation already built: `fuse_projections`' copy,
    shared), A the targeted ones' lora_A stacked, B' = scale·lora_B placed block-diagonally (each projection's
    output rows read only its own A rows; computed in float32, rounded once to W's dtype), and per projection
    (its last output row + 1, its first A row, its rank; rank 0 where it has no LoRA) — what lets a kernel
    program whose columns lie in one projection read only that projection's A rows (`lora_linear_rows`).
    (A, B', segments) = (None, None, None) where no projection is targeted."""
    if not 1 <= len(named) <= 3:
        raise ValueError(f"lowrank_factors: 1 to 3 projections side by side, got {len(named)}")
    ws = [m.weight for _, m in named]
    w = weight if weight is not None else torch.cat(ws) if len(ws) > 1 else ws[0]
    pairs = [(i, layer_lora.pairs[name]) for i, (name, _) in enumerate(named) if name in layer_lora.pairs]
    if not pairs:
        return w, None, None, None
    r = sum(p.lora_A.weight.shape[0] for _, p in pairs)
    a = torch.cat([p.lora_A.weight for _, p in pairs]).to(w.dtype)
    b = torch.zeros(w.shape[0], r, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    starts = [0]
    for m in ws:
        starts.append(starts[-1] + m.shape[0])
    col, segments, targeted = 0, [], dict(pairs)
    for i in range(len(ws)):
        rank = targeted[i].lora_A.weight.shape[0] if i in targeted else 0
        if rank:
            b[starts[i]:starts[i + 1], col:col + rank] = layer_lora.scale * targeted[i].lora_B.weight.to(b.dtype)
        segments.append((starts[i + 1], col, rank))
        col += rank
    return w, a, b.to(w.dtype), tuple(segments)


def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, bias: torch.Tensor | None = None, mm=F.linear) -> torch.Tensor:
    """x [M, K] -> x·Wᵀ (+ bias) + gate ⊙ ((x·Aᵀ)·B'ᵀ) [M, N] in x's dtype, each product rounded to it as eager
    matmuls round (the reference of `lora_linear_rows`). gate [M] (bool or 0/1; None: every row); `mm`: F.linear's
    signature (exact mode passes the batch-invariant matmul)."""
    y = mm(x, w, bias)
    if a is None:
        return y
    d = mm(mm(x, a), b)
    if gate is None:
        return y + d
    return torch.where(gate.reshape(-1, 1) != 0, y + d, y)


def lora_mm(x: torch.Tensor, factors: tuple, gate: torch.Tensor | None = None, mm=F.linear) -> torch.Tensor:
    """A fused projection of the "lowrank" layout (`Transformer.fuse_lora`): x [..., K], factors (W [N, K], A, B',
    bias, segments: `lowrank_factors`; workspace: `lora_workspace`'s or None), gate [...] -> [..., N].
    `lora_linear_rows` where it runs — CUDA, at most LORA_KERNEL_MAX_ROWS rows (a decode step's few; the kernel
    reads W once per 16 rows), no bias, no gradient, not under compilation, the ordinary matmul (not exact
    mode's) — else `lora_linear`. $IDLM_LORA_SHARED_XA=1 (read at each call, so at graph capture; opt-in until
    measured) runs the kernel with `shared_xa` on the workspace."""
    w, a, b, bias, segments, workspace = factors
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g = None if gate is None else gate.reshape(-1)
    if (mm is F.linear and x2.is_cuda and bias is None and x2.shape[0] <= LORA_KERNEL_MAX_ROWS
            and x2.dtype in (torch.float32, torch.bfloat16, torch.float16) and x2.dtype == w.dtype
            and not (torch.is_grad_enabled() and (x2.requires_grad or w.requires_grad))
            and not torch.compiler.is_compiling() and triton_available()):
        shared = workspace is not None and os.environ.get("IDLM_LORA_SHARED_XA", "0") == "1"
        y = lora_linear_rows(x2, w, a, b, g, segments, shared_xa=shared, workspace=workspace if shared else None)
    else:
        y = lora_linear(x2, w, a, b, g, bias, mm)
    return y.reshape(*lead, w.shape[0])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_t(a, b, IEEE: tl.constexpr):
        """a·bᵀ in float32: full-precision products for float32 tiles (IEEE: no TF32, like the eager reference)."""
        if IEEE:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(b))

    globals()["_dot_t"] = _dot_t  # (a jitted kernel resolves the helpers it calls among its module's globals)

    @triton.jit
    def lora_linear_kernel(X, W, A, B, G, OUT, XA, SYNC, M, N, K, s_x, s_w, s_a, s_b, s_o, E0, E1, O0, O1, O2, R0,
                           R1, R2, P, NB, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                           R: tl.constexpr, LORA: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr,
                           UPCAST: tl.constexpr, SHARED: tl.constexpr, RS: tl.constexpr):
        pid, pm = tl.program_id(0), tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        if SHARED:  # programs 0..P-1 of a row block: x·Aᵀ once, 16 ranks each, into XA [rows, RS]
            if pid < P:
                rp = pid * 16 + tl.arange(0, 16)
                xp = tl.zeros((BM, 16), dtype=tl.float32)
                for k0 in range(0, K, BK):
                    rk = k0 + tl.arange(0, BK)
                    x = tl.load(X + rm[:, None].to(tl.int64) * s_x + rk[None, :],
                                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
                    a = tl.load(A + rp[:, None] * s_a + rk[None, :], mask=(rp[:, None] < R) & (rk[None, :] < K),
                                other=0.0)
                    if UPCAST:
                        x, a = x.to(tl.float32), a.to(tl.float32)
                    xp += _dot_t(x, a, IEEE)
                tl.store(XA + rm[:, None] * RS + rp[None, :], xp.to(OUT.dtype.element_ty))
                tl.debug_barrier()  # every thread's XA stores before the release below
                tl.atomic_add(SYNC + 2 * pm, 1, sem="release")
        pn = pid - P  # the column block (P = 0 without SHARED)
        if pn >= 0:  # x·Wᵀ for BN columns plus the gated (x·Aᵀ)·B'ᵀ: x·Aᵀ computed here beside x·Wᵀ, or (SHARED)
            # read from XA once the row block's P producers have counted themselves in SYNC
            rn = pn * BN + tl.arange(0, BN)
            rr = tl.arange(0, BR)
            if LORA:  # this column block's A rows: its projection's (segments E/O/R), all R where it spans two
                n_first, n_last = pn * BN, tl.minimum(pn * BN + BN - 1, N - 1)
                seg = (n_first >= E0).to(tl.int32) + (n_first >= E1).to(tl.int32)
                whole = seg != (n_last >= E0).to(tl.int32) + (n_last >= E1).to(tl.int32)
                r0 = tl.where(whole, 0, tl.where(seg == 0, O0, tl.where(seg == 1, O1, O2)))
                rc = tl.where(whole, R, tl.where(seg == 0, R0, tl.where(seg == 1, R1, R2)))
                ra = r0 + rr  # the A rows (and B' columns) read, rr < rc of them
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            xa = tl.zeros((BM, BR), dtype=tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                x = tl.load(X + rm[:, None].to(tl.int64) * s_x + rk[None, :],
                            mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
                w = tl.load(W + rn[:, None].to(tl.int64) * s_w + rk[None, :],
                            mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
                if UPCAST:  # Triton's interpreter: bf16 / fp16 tiles as float32 (it keeps bf16 as raw bits)
                    x, w = x.to(tl.float32), w.to(tl.float32)
                acc += _dot_t(x, w, IEEE)
                if LORA and not SHARED:
                    a = tl.load(A + ra[:, None] * s_a + rk[None, :], mask=(rr[:, None] < rc) & (rk[None, :] < K),
                                other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                    xa += _dot_t(x, a, IEEE)
            dt = OUT.dtype.element_ty
            y = acc.to(dt)  # the base projection, rounded once (as a matmul's output)
            if LORA:
                b = tl.load(B + rn[:, None].to(tl.int64) * s_b + ra[None, :],
                            mask=(rn[:, None] < N) & (rr[None, :] < rc), other=0.0)
                if SHARED:  # the producers' x·Aᵀ (already rounded), once all P of this row block have stored theirs
                    count = tl.atomic_add(SYNC + 2 * pm, 0, sem="acquire")
                    while count < P:
                        count = tl.atomic_add(SYNC + 2 * pm, 0, sem="acquire")
                    xr = tl.load(XA + rm[:, None] * RS + ra[None, :], mask=(rm[:, None] < M) & (rr[None, :] < rc),
                                 other=0.0, cache_modifier=".cg")
                else:
                    xr = xa.to(dt)  # x·Aᵀ rounded as its matmul's output, then ·B'ᵀ
                if UPCAST:
                    xr, b = xr.to(tl.float32), b.to(tl.float32)
                d = _dot_t(xr, b, IEEE).to(dt)
                s = (y.to(tl.float32) + d.to(tl.float32)).to(dt)
                if GATED:
                    g = tl.load(G + rm, mask=rm < M, other=0)
                    y = tl.where(g[:, None] != 0, s, y)
                else:
                    y = s
            tl.store(OUT + rm[:, None].to(tl.int64) * s_o + rn[None, :], y,
                     mask=(rm[:, None] < M) & (rn[None, :] < N))
            if SHARED and LORA:  # the last column block of the row block to have read XA resets its two counts
                done = tl.atomic_add(SYNC + 2 * pm + 1, 1, sem="acq_rel")
                if done == NB - 1:
                    tl.atomic_xchg(SYNC + 2 * pm, 0)
                    tl.atomic_xchg(SYNC + 2 * pm + 1, 0)

    return lora_linear_kernel


def lora_linear_rows(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                     gate: torch.Tensor | None = None, segments: tuple | None = None, block_n: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None, shared_xa: bool = False,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`lora_linear` as one Triton launch (grid: column blocks x row blocks of BLOCK_M). x [M, K], w [N, K],
    a [R, K], b [N, R] (both or neither), gate [M]; float32, bf16 or fp16, all of one dtype. segments
    (`lowrank_factors`; None: one projection of rank R): a program whose columns lie in one projection reads
    only its A rows (B' is block-diagonal: the others would add zeros). block_n / block_k:
    the tile (powers of two >= 16; larger ones make Triton's interpreter faster in tests); num_warps: Triton's;
    each None: `kernel_tile`'s.

    shared_xa (opt-in, session 39, not yet measured on a GPU): x·Aᵀ computed once per row block by ceil(R/16)
    extra programs (16 ranks each) into a scratch buffer, which the column programs read once those have
    counted themselves in (a spin on a counter; the grid's few programs are all resident), instead of each
    column program reading its projection's whole A (twice its W tile at 16 columns and rank 32). workspace:
    `lora_workspace(M, R, ...)`'s (scratch, counters), reused call after call (the counters return to 0 at the
    end of every launch); None: a fresh one."""
    M, K = x.shape
    tile = kernel_tile(K)
    block_n, block_k, num_warps = block_n or tile[0], block_k or tile[1], num_warps or tile[2]
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"lora_linear_rows: x has {K} columns but the weight takes {w.shape[1]}")
    if (a is None) != (b is None):
        raise ValueError("lora_linear_rows: give both LoRA factors (A, B') or neither")
    r = 0
    if a is not None:
        r = a.shape[0]
        if a.shape[1] != K or b.shape != (N, r):
            raise ValueError(f"lora_linear_rows: LoRA factors {tuple(a.shape)} / {tuple(b.shape)} do not fit a "
                             f"[{N}, {K}] weight")
    if gate is not None and gate.numel() != M:
        raise ValueError(f"lora_linear_rows: {gate.numel()} gate values for {M} rows")
    if any(t is not None and t.dtype != x.dtype for t in (w, a, b)):
        raise ValueError("lora_linear_rows: x, the weight and the factors must share one dtype")
    x, w = x.contiguous(), w.contiguous()
    if a is not None:
        a, b = a.contiguous(), b.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    g = gate.reshape(M) if gate is not None else x  # bool or 0/1 values, read as they are (unread without a gate)
    grid = (-(-N // block_n), -(-M // BLOCK_M))
    segs = list(segments or [(N, 0, r)])
    if segments is not None and (not 1 <= len(segs) <= 3 or segs[-1][0] != N or sum(s[2] for s in segs) != r):
        raise ValueError(f"lora_linear_rows: segments {segments} do not describe {N} columns of rank {r}")
    # the A rows a program reads at most: one projection's rank where no column block straddles two projections
    # (every inner boundary a multiple of block_n), else all R (the straddling blocks read every projection's)
    straddles = any(e % block_n for e, _, _ in segs[:-1])
    br = max(16, 1 << (max(r if straddles else max(s[2] for s in segs), 1) - 1).bit_length())
    segs += [(N, r, 0)] * (3 - len(segs))  # (unused segments: empty, past the last column)
    (e0, o0, r0), (e1, o1, r1), (_, o2, r2) = segs
    shared = shared_xa and a is not None
    producers = -(-r // 16) if shared else 0
    scratch, sync = w, w  # (unread without shared_xa)
    if shared:
        scratch, sync = workspace if workspace is not None else lora_workspace(M, r, x.dtype, x.device)
        if (scratch.shape[0] < grid[1] * BLOCK_M or scratch.shape[1] != 16 * producers or scratch.dtype != x.dtype
                or sync.dtype != torch.int32 or sync.numel() < 2 * grid[1]):
            raise ValueError(f"lora_linear_rows: a workspace of {tuple(scratch.shape)} {scratch.dtype} / "
                             f"{sync.numel()} counters does not fit {M} rows of rank {r}: use lora_workspace")
    _kernel()[(producers + grid[0], grid[1])](
        x, w, a if a is not None else w, b if b is not None else w, g, out, scratch, sync, M, N, K,
        x.stride(0), w.stride(0), a.stride(0) if a is not None else 0, b.stride(0) if b is not None else 0,
        out.stride(0), e0, e1, o0, o1, o2, r0, r1, r2, producers, grid[0],
        BM=BLOCK_M, BN=block_n, BK=block_k, BR=br, R=r, LORA=a is not None, GATED=gate is not None,
        IEEE=x.dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1", SHARED=shared,
        RS=max(16, 16 * producers), num_warps=num_warps)
    return out


def lora_workspace(rows: int, rank: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scratch [row blocks·BLOCK_M, 16·ceil(rank/16)] of `dtype`, counters int32 [2·row blocks], zeros) that
    `lora_linear_rows(..., shared_xa=True)` takes for up to `rows` rows of a LoRA of total rank `rank`."""
    blocks = -(-rows // BLOCK_M)
    return (torch.zeros(blocks * BLOCK_M, 16 * -(-rank // 16), dtype=dtype, device=device),
            torch.zeros(2 * blocks, dtype=torch.int32, device=device))
