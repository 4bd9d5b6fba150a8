"""A Triton kernel for attention of short query blocks over the paged KV pool (the decode fast path).

A decode step of the engine has 1 (AR) or 2N−1 (ISD, R-ISD) query tokens per request and reads the
request's whole KV through its block table. The reference path (`PagedAttention` without the kernel)
gathers the pages into a dense tensor and runs SDPA under a mask: a dozen kernels per layer, which at
small batch is most of a step. This kernel does the same computation in one launch, reading K/V
straight from the pool:

- grid (batch row b, KV head h): the program holds the G = Hq/Hkv query heads of h for all T query
  tokens of row b, a [G·T, D] tile (grouped-query attention without repeating K/V);
- it walks key positions 0..max(last)+1 in tiles of BLOCK_N, mapping position j to the slot
  block_table[b, j // page]·page + j % page, with an online (flash) softmax in float32;
- query t sees keys j <= last[b, t] (causal: start + t; SDAR's block-bidirectional rows: start +
  visible[t]), except, with `hide`, the keys in its hidden range [lo, hi) (a tree of query rows: ISD's
  rejection branches), so masks never materialise.

Split KV (flash-decoding). With one program per (row, KV head), a small batch occupies a handful of
the GPU's SMs while each program walks the whole context alone (8 programs for a Qwen3-8B-shaped
batch of 1). With `splits` S > 1 the grid is (row, KV head, split): split s takes an equal share of the
row's keys, keeps its own online-softmax state and writes it out unnormalised (running max m, sum l,
accumulator [rows, D], all float32); a second kernel (or, with $IDLM_ATTN_FUSED_COMBINE=1, the last split
of the same launch to finish: `fused_combine`) combines the S states of each query row:
out = Σ_s e^(m_s − m) acc_s / Σ_s e^(m_s − m) l_s with m = max_s m_s (a split that saw no key has
m = −inf and adds nothing). Only the splits whose share starts inside the row's context store and combine
(both kernels count them from `last`): a context that fits one split writes its output from the forward
kernel, and the combine of a short context in a wide block table (a CUDA graph's) reads one or two states,
not S. `choose_splits` picks S from the work: no split once B·Hkv programs fill the
SMs, else enough splits to fill them without giving a split fewer than MIN_SPLIT_KEYS keys of the
longest possible context. S depends only on (B, Hkv, pages): a CUDA graph key fixes it.
On by default since the H200 runs of 2026-12-01 (docs/engine.md): a Qwen3-8B shape at batch 1 took
9.6 ms a step at 32k context with it and 58.0 ms without, 7.3 vs 19.1 ms at 8k, 6.9 vs 7.5 ms at 1k, with
no fault in those runs (the crash that had kept it off was `store_kv`'s stride bug, fixed).
$IDLM_KV_SPLITS=1 turns it off, =S forces S (measurements); exact mode never splits.

Everything is on the device with shapes fixed by (B, T, pages), so CUDA graphs capture it. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors; the tests compare them with the reference path.
"""

from __future__ import annotations

import functools
import os

import torch

MAX_TILE_ROWS = 128  # G·T rows per program; beyond this (long prefill chunks) use the reference path
# split KV: no split gets fewer keys of the longest context than this (two key tiles). At 1k context on
# the H200 with the prefetching 64-key tiles, batch 1: 8 splits 14.3 µs, 16 splits 16.7 µs; batch 8: 3-4
# splits best; these are the counts this minimum gives (scripts/attn_sweep.py, docs/engine.md "Kernel tuning")
MIN_SPLIT_KEYS = 128
MAX_SPLITS = 32
# a launch of at most this many (row, KV head) programs takes 128-key tiles and 4 warps (`kernel_tuning`): on
# the H200 (scripts/attn_sweep.py, session 28) SmolLM2's layout (3 KV heads, D = 64) at 320 keys ran 1 / 7 / 16
# query tokens of batch 1 in 7.0 / 8.1 / 10.8 µs against 7.8 / 10.3 / 15.6 with 64-key tiles and 2 warps
# (4 splits each), batch 8 x 7 tokens (24 programs) 9.6 vs 11.9; the Qwen3-8B layout at batch 1 (8 programs) 13.3 vs
# 14.3 µs, while at batch 8 (64 programs) 64-key tiles and 2 warps stay faster (19.2 vs 24.0)
SMALL_GRID = 24
# the second (combine) launch of split KV takes a (row, KV head)'s query tile in chunks of this many rows, one
# program each: one program for a whole tile read its splits' states serially on one SM each — with R-ISD's
# 25-row guessed-corrections block on SmolLM2 (a 128-row tile, 3 KV heads) 6.5 µs a layer against 2.7 for the
# 16-row block's 64-row tile (H200, session 35 `bench_risd.py sprofile`)
COMBINE_ROWS = 16
# a split launch takes its query block in tiles of this many rows, a program each (`row_tile`): R-ISD's rejection
# branches on SmolLM2 (16 query tokens x 3 heads a KV head: a 64-row block) took 6.8 µs a layer against AR's 3.9 µs
# for its 16-row block (H200, session 35 `bench_risd.py sprofile`) while 3 KV heads x 8 splits left most of 132 SMs
# idle. H100, session 36 (scripts/attn_sweep.py, HEADS=9,3,64, docs/risd.md): 1 x 320 keys x 16 tokens 11.8 ->
# 8.3 µs, 1 x 1024 x 16 13.6 -> 11.2 µs; the engine's batch-1 step with branches 1.211x -> 1.146x AR's (greedy)
ROW_TILE = 16
# exact mode (issue 16): one tile shape for every query length, so a query row is computed by the same
# instructions in the same order whatever block, batch or prefill chunk it is in
EXACT_BLOCK_M, EXACT_BLOCK_N = 64, 32


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Can Triton kernels run on tensors of `device`? CUDA with triton installed, or any device under
    Triton's interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def head_dim_supported(d: int) -> bool:
    """The paged kernel's tiles need a head dim that is a power of two >= 16."""
    return d >= 16 and d & (d - 1) == 0


def kernel_supported(q: torch.Tensor, num_kv_heads: int, exact: bool = False) -> bool:
    """Can `paged_attention` run this query? q [B, Hq, T, D]. Exact mode tiles the query, so any T."""
    _, hq, t, d = q.shape
    return (triton_usable(q.device) and head_dim_supported(d) and hq % num_kv_heads == 0
            and (exact or _tile_rows(hq // num_kv_heads, t) <= MAX_TILE_ROWS))


def _tile_rows(group: int, t: int) -> int:
    return max(16, 1 << (group * t - 1).bit_length())


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(q, k, v, pos, last, hlo, hhi, m_i, l_i, acc, scale, IEEE: tl.constexpr, TREE: tl.constexpr):
        """One key tile into a query tile's online-softmax state (m, l, acc): q [BLOCK_M, D], k/v [BLOCK_N, D].
        TREE: a query row also skips the key positions hlo <= pos < hhi (its hidden range)."""
        if IEEE:  # float32 pools: full-precision products (no TF32), like the reference path
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale  # [BLOCK_M, BLOCK_N] float32
        see = pos[None, :] <= last[:, None]
        if TREE:
            see = see & ((pos[None, :] < hlo[:, None]) | (pos[None, :] >= hhi[:, None]))
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp(s - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        return m_new, l_i, acc

    @triton.jit
    def _split_share(n_keys, SPLITS, BLOCK_N: tl.constexpr):
        """Keys per split of a row with n_keys keys: whole BLOCK_N tiles, at least one (a row with no key,
        last = −1 throughout, then counts one split, not 0 / 0). The forward and the combine both use it to
        count the splits that got keys."""
        return tl.maximum(tl.cdiv(tl.cdiv(n_keys, SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)

    @triton.jit
    def _combine(Out, PART_M, PART_L, PART_ACC, b, hk, n_kv, s_ob, s_ot, s_oh, T, SPLITS, USED, r0,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr,
                 CACHE: tl.constexpr):
        """The first USED of the S split states of (row b, KV head hk) into its output rows: the tile rows
        r0 .. r0 + BLOCK_R − 1 of the BLOCK_M the forward kept (padding rows past T are neither read nor
        written). CACHE: the states' load cache modifier (".cg": from L2, for states other programs of the
        same launch wrote — the fused combine)."""
        rows = r0 + tl.arange(0, BLOCK_R)
        t = rows // GROUP
        ok = t < T
        h = hk * GROUP + rows % GROUP
        d = tl.arange(0, D)
        first = (b * n_kv + hk) * SPLITS * BLOCK_M
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for sp in range(0, USED):
            m = tl.maximum(m, tl.load(PART_M + first + sp * BLOCK_M + rows, mask=ok, other=float("-inf"),
                                      cache_modifier=CACHE))
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # rows no split saw a key for
        l_sum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for sp in range(0, USED):
            at = first + sp * BLOCK_M + rows
            # 0 for a split that saw nothing
            w = tl.exp(tl.load(PART_M + at, mask=ok, other=float("-inf"), cache_modifier=CACHE) - m_safe)
            l_sum += w * tl.load(PART_L + at, mask=ok, other=0.0, cache_modifier=CACHE)
            acc += w[:, None] * tl.load(PART_ACC + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                                        cache_modifier=CACHE)
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(Out + b * s_ob + t[:, None] * s_ot + h[:, None] * s_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _write_out(Out, acc, l_i, b, t, h, d, row_ok, s_ob, s_ot, s_oh):
        """A tile's normalised output rows into out [B, T, Hq, D]."""
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * s_ob + t[:, None] * s_ot + h[:, None] * s_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _store_state(PART_M, PART_L, PART_ACC, m_i, l_i, acc, b, hk, sp, rows, d, SPLITS,
                     FULL_M: tl.constexpr, D: tl.constexpr):
        """A split's unnormalised state of the block rows `rows`: [B, Hkv, S, FULL_M] (m, l), [.., D] (acc)."""
        base = ((b * tl.num_programs(1) + hk) * SPLITS + sp) * FULL_M
        tl.store(PART_M + base + rows, m_i)
        tl.store(PART_L + base + rows, l_i)
        tl.store(PART_ACC + (base + rows)[:, None] * D + d[None, :], acc)

    # a jitted function finds the functions it calls among its module's globals (not in this closure);
    # triton is imported lazily, so the helpers are put there when the kernels are first built
    globals()["_tile"] = _tile
    globals()["_split_share"] = _split_share
    globals()["_combine"] = _combine
    globals()["_write_out"] = _write_out
    globals()["_store_state"] = _store_state

    @triton.jit
    def paged_attn_fwd(Q, K, V, Out, TABLES, LAST, HIDE, PART_M, PART_L, PART_ACC, COUNTERS, scale,
                       s_qb, s_qh, s_qt,  # q [B, Hq, T, D], unit stride in D
                       s_ks, s_kh,  # k/v pool of one layer [slots, Hkv, D], unit stride in D
                       s_ob, s_ot, s_oh,  # out [B, T, Hq, D]
                       s_tb, s_lb, s_hb,  # block tables [B, M], last [B, T], hide [B, T, 2] (contiguous rows)
                       T, PAGE, SPLITS,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                       IEEE: tl.constexpr, SPLIT: tl.constexpr, TQ: tl.constexpr, PREFETCH: tl.constexpr,
                       FUSED_COMBINE: tl.constexpr, MIN_CHUNK: tl.constexpr, TREE: tl.constexpr,
                       MT: tl.constexpr, FULL_M: tl.constexpr):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        # axis 2: (sp, mt). sp: the split (SPLIT) or else the query tile: tokens sp·TQ .. sp·TQ + TQ − 1; mt: which
        # BLOCK_M rows of the block this program takes (row tiles: MT of them cover its G·T rows, whose states a
        # split keeps FULL_M apart, the padded block's rows; MT = 1: all of them)
        sp = tl.program_id(2) // MT
        mt = tl.program_id(2) % MT
        # block row r = query token t0 + r // GROUP, head hk·GROUP + r % GROUP
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        t0 = 0 if SPLIT else sp * TQ
        t = t0 + rows // GROUP
        h = hk * GROUP + rows % GROUP
        row_ok = (rows // GROUP < TQ) & (t < T)
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + h[:, None] * s_qh + t[:, None] * s_qt + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        last = tl.load(LAST + b * s_lb + t, mask=row_ok, other=-1)  # [BLOCK_M]
        hlo = last  # (unused without TREE)
        hhi = last
        if TREE:  # each query row's hidden key range [lo, hi)
            hlo = tl.load(HIDE + b * s_hb + 2 * t, mask=row_ok, other=0)
            hhi = tl.load(HIDE + b * s_hb + 2 * t + 1, mask=row_ok, other=0)
        if SPLIT and MT > 1:  # the whole block's keys, so every row tile cuts the same splits (the combine's)
            every = tl.arange(0, FULL_M) // GROUP
            n_keys = tl.max(tl.load(LAST + b * s_lb + every, mask=every < T, other=-1), axis=0) + 1
        else:
            n_keys = tl.max(last, axis=0) + 1
        lo = 0
        hi = n_keys
        if SPLIT:  # this split's share of the row's keys, whole BLOCK_N tiles (the last share may be short)
            chunk = _split_share(n_keys, SPLITS, BLOCK_N)
            if FUSED_COMBINE:  # no share below MIN_CHUNK keys: a short context uses fewer splits (1: no combine)
                chunk = tl.maximum(chunk, MIN_CHUNK)
            lo = sp * chunk
            hi = tl.minimum(n_keys, lo + chunk)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        if PREFETCH:
            # the same tiles and arithmetic, loads issued earlier: a tile's slots come from the previous
            # iteration (the first tile's from before the loop) and its K and V are both requested before
            # any math, with the next tile's page ids — so one memory latency per tile, not three in a row
            # (page ids -> K -> V; on the H200 a tile took ~6 µs at batch 1, latency-bound)
            first = lo + cols  # (not `pos`: the loop assigns it, so Triton would carry it with this type)
            page = tl.load(TABLES + b * s_tb + first // PAGE, mask=first < hi, other=0)
            slot = page.to(tl.int64) * PAGE + first % PAGE
            for start in range(lo, hi, BLOCK_N):
                pos = start + cols
                key_ok = pos < hi
                k = tl.load(K + slot[:, None] * s_ks + hk * s_kh + d[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(V + slot[:, None] * s_ks + hk * s_kh + d[None, :], mask=key_ok[:, None], other=0.0)
                nxt = pos + BLOCK_N
                page = tl.load(TABLES + b * s_tb + nxt // PAGE, mask=nxt < hi, other=0)
                slot = page.to(tl.int64) * PAGE + nxt % PAGE
                m_i, l_i, acc = _tile(q, k, v, pos, last, hlo, hhi, m_i, l_i, acc, scale, IEEE, TREE)
        else:
            for start in range(lo, hi, BLOCK_N):
                pos = start + cols  # key positions [BLOCK_N]
                key_ok = pos < hi
                page = tl.load(TABLES + b * s_tb + pos // PAGE, mask=key_ok, other=0)
                slot = page.to(tl.int64) * PAGE + pos % PAGE
                k = tl.load(K + slot[:, None] * s_ks + hk * s_kh + d[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(V + slot[:, None] * s_ks + hk * s_kh + d[None, :], mask=key_ok[:, None], other=0.0)
                m_i, l_i, acc = _tile(q, k, v, pos, last, hlo, hhi, m_i, l_i, acc, scale, IEEE, TREE)
        if SPLIT:
            used = tl.maximum(tl.cdiv(n_keys, chunk), 1)  # splits that got keys; the others stop here
            if used == 1:  # a context that fits one split: its output directly, nothing to combine
                if sp == 0:
                    _write_out(Out, acc, l_i, b, t, h, d, row_ok, s_ob, s_ot, s_oh)
            elif sp < used:
                _store_state(PART_M, PART_L, PART_ACC, m_i, l_i, acc, b, hk, sp, rows, d, SPLITS, FULL_M, D)
                if FUSED_COMBINE:
                    tl.debug_barrier()  # every thread's state stored before the ticket (release, cumulative)
                    counter = COUNTERS + b * tl.num_programs(1) + hk
                    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
                    # the last (used split, row tile) of (b, hk) to finish combines the block: no second launch
                    if ticket == used * MT - 1:
                        _combine(Out, PART_M, PART_L, PART_ACC, b, hk, tl.num_programs(1), s_ob, s_ot, s_oh, T,
                                 SPLITS, used, 0, GROUP, FULL_M, FULL_M, D, ".cg")
                        tl.atomic_xchg(counter, 0)  # ready for the next launch (a CUDA graph's next replay)
        else:
            _write_out(Out, acc, l_i, b, t, h, d, row_ok, s_ob, s_ot, s_oh)

    @triton.jit
    def paged_attn_combine(Out, PART_M, PART_L, PART_ACC, LAST, s_ob, s_ot, s_oh, s_lb, T, SPLITS,
                           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        """The second launch of split KV: the forward's used splits of (row, KV head) into its output, grid
        (row, KV head, BLOCK_M / BLOCK_R row chunks). The number used is recomputed from `last` as the
        forward did (the splits past it stored nothing; with one the forward wrote the output itself), so a
        short context in a wide block table costs a few loads."""
        b = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        t = rows // GROUP
        n_keys = tl.max(tl.load(LAST + b * s_lb + t, mask=t < T, other=-1), axis=0) + 1
        chunk = _split_share(n_keys, SPLITS, BLOCK_N)
        used = tl.maximum(tl.cdiv(n_keys, chunk), 1)
        r0 = tl.program_id(2) * BLOCK_R
        if (used > 1) & (r0 < T * GROUP):  # (a chunk of padding rows only: nothing to do)
            _combine(Out, PART_M, PART_L, PART_ACC, b, tl.program_id(1), tl.num_programs(1),
                     s_ob, s_ot, s_oh, T, SPLITS, used, r0, GROUP, BLOCK_M, BLOCK_R, D, "")

    return paged_attn_fwd, paged_attn_combine


@functools.cache
def _store_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def store_kv_rows(K, V, KP, VP, SLOTS, s_k, s_v, s_slot, s_idx, W: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)  # one query token: its Hkv·D values of K and of V to its slot
        slot = tl.load(SLOTS + r * s_idx).to(tl.int64)
        for start in range(0, W, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < W
            k = tl.load(K + r * s_k + i, mask=ok)
            v = tl.load(V + r * s_v + i, mask=ok)
            tl.store(KP + slot * s_slot + i, k.to(KP.dtype.element_ty), mask=ok)
            tl.store(VP + slot * s_slot + i, v.to(VP.dtype.element_ty), mask=ok)

    return store_kv_rows


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """pool[slots[r]] = row r of k / v, both pools in one launch (instead of two indexing kernels):
    k_pool/v_pool [slots, Hkv, D] (one layer, contiguous per slot), slots [R] (any stride: in a CUDA graph an
    AR step's slots are a strided view into the packed input buffer), k/v [R, Hkv·D] rows with unit stride
    inside a row (cast to the pool's dtype)."""
    R, W = k.shape
    if slots.dim() != 1 or slots.shape[0] != R:
        raise ValueError(f"store_kv needs one slot per row: slots {tuple(slots.shape)} for {R} rows")
    if k.stride(1) != 1 or v.stride(1) != 1 or k_pool.stride(1) * k_pool.shape[1] != k_pool.stride(0) \
            or k_pool.stride(2) != 1 or v_pool.stride() != k_pool.stride() or W != k_pool.shape[1] * k_pool.shape[2]:
        raise ValueError("store_kv needs rows with unit stride and a pool contiguous per slot")
    block = min(1024, 1 << (W - 1).bit_length())
    _store_kernel()[(R,)](k, v, k_pool, v_pool, slots, k.stride(0), v.stride(0), k_pool.stride(0), slots.stride(0),
                          W=W, BLOCK=block, num_warps=4)


def choose_splits(batch: int, kv_heads: int, max_keys: int, sm_count: int) -> int:
    """Split-KV factor S for a decode launch of batch x kv_heads programs whose rows may see up to
    max_keys keys: 1 once the programs fill the SMs; else the fewest splits that fill them, no more than
    leave each split MIN_SPLIT_KEYS keys of the longest context, at most MAX_SPLITS."""
    programs = batch * kv_heads
    if programs >= sm_count:
        return 1
    want = -(-sm_count // programs)
    return max(1, min(want, max_keys // MIN_SPLIT_KEYS, MAX_SPLITS))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on CPU: an H100/H200's 132)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132


def kv_splits(batch: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    """The split-KV factor of a launch from $IDLM_KV_SPLITS: unset, empty or "auto" -> `choose_splits` (the
    default: see the module docstring), an integer S >= 1 -> S (1: off)."""
    value = os.environ.get("IDLM_KV_SPLITS", "").strip().lower()
    if not value or value == "auto":
        return choose_splits(batch, kv_heads, max_keys, device_sm_count(device))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"IDLM_KV_SPLITS must be 'auto' or an integer >= 1, got {value!r}") from None


def kernel_tuning() -> tuple[bool, int | None, int | None]:
    """Tuning knobs of the decode kernel, from the environment (for measurements: `scripts/attn_sweep.py`
    sweeps them on the GPU to choose defaults): $IDLM_ATTN_PREFETCH "1" (each key tile's loads issued one
    step ahead) or "0"; $IDLM_ATTN_BLOCK_N keys per tile (a power of two 16..256; default: 64, or 32 for
    tiles of more than 64 query rows); $IDLM_ATTN_WARPS warps per program (1, 2, 4 or 8; default: 2, or 4
    for tiles of more than 64 query rows). The defaults are the H200 sweep's (docs/engine.md, "Kernel
    tuning": prefetch, 64 keys, 2 warps were the fastest setting over five decode shapes of a Qwen3-8B
    layout, 0.79x the old default's time on average); a launch of at most SMALL_GRID (row, KV head) programs
    over a 16-bit pool takes 128 keys and 4 warps (session 28's sweep). Exact mode ignores them (its tiles
    are fixed).
    -> (prefetch, block_n or None, warps or None)."""
    def read(name: str, default: str, ok) -> str:
        value = os.environ.get(name, "").strip() or default
        if not ok(value):
            raise ValueError(f"{name}={value!r} is not valid (see idlm.layers.paged_kernel.kernel_tuning)")
        return value

    def power_of_two_in(lo: int, hi: int):
        return lambda v: v.isdigit() and lo <= int(v) <= hi and int(v) & (int(v) - 1) == 0

    prefetch = read("IDLM_ATTN_PREFETCH", "1", lambda v: v in ("0", "1")) == "1"
    block_n = read("IDLM_ATTN_BLOCK_N", "0", lambda v: v == "0" or power_of_two_in(16, 256)(v))
    warps = read("IDLM_ATTN_WARPS", "0", lambda v: v == "0" or power_of_two_in(1, 8)(v))
    return prefetch, int(block_n) or None, int(warps) or None


def default_tiles(programs: int, block_m: int, head_dim: int, sixteen_bit: bool) -> tuple[int, int]:
    """(keys per tile, warps) of a decode launch of `programs` (row, KV head) programs with `block_m`-row
    query tiles: 32 keys and 4 warps for tiles of more than 64 rows; else 128 keys and 4 warps for a
    latency-bound launch (at most SMALL_GRID programs, 16-bit pools, query tiles of at most 64 x 64 or
    32 x 128 values: the sizes the H200 sweep ran), 64 keys and 2 warps otherwise."""
    if block_m > 64:
        return 32, 4
    small = programs <= SMALL_GRID and sixteen_bit and block_m * head_dim <= 4096
    return (128, 4) if small else (64, 2)


def min_chunk() -> int:
    """$IDLM_ATTN_MIN_CHUNK (default MIN_SPLIT_KEYS): with the fused combine, the fewest keys a split of a
    launch takes; a row whose context is shorter than S of them uses fewer splits, and one that fits in one
    writes its output directly. The split count of a CUDA graph is fixed by its block-table width (up to
    1,024 keys at the narrowest), while a short chat context has a few hundred: without a floor, eight
    splits each read a tile or none and then combine. 0: no floor (each split a BLOCK_N-rounded share)."""
    value = os.environ.get("IDLM_ATTN_MIN_CHUNK", "").strip() or str(MIN_SPLIT_KEYS)
    if not value.isdigit():
        raise ValueError(f"IDLM_ATTN_MIN_CHUNK={value!r} is not valid: a number of keys >= 0")
    return int(value)


def row_tile() -> int:
    """$IDLM_ATTN_ROW_TILE: query rows per program of a split launch (a power of two 16..128, default ROW_TILE;
    "0": the whole block in one tile). With R, a block of G·T rows runs as ceil(G·T / R) programs per (row, KV
    head, split), each over the same keys (their states kept as the whole padded block's, for the combine). Only
    split launches take row tiles (unsplit ones are batches that fill the GPU already)."""
    value = os.environ.get("IDLM_ATTN_ROW_TILE", "").strip() or str(ROW_TILE)
    rows = int(value) if value.isdigit() else -1
    if not (rows == 0 or (16 <= rows <= MAX_TILE_ROWS and rows & (rows - 1) == 0)):
        raise ValueError(f"IDLM_ATTN_ROW_TILE={value!r} is not valid: 0 or a power of two 16..{MAX_TILE_ROWS}")
    return rows


def fused_combine() -> bool:
    """$IDLM_ATTN_FUSED_COMBINE "1": split KV combines in the forward kernel's last split of each (row, KV
    head) — an atomic ticket per (row, head), the last to arrive reads the others' states — instead of a
    second launch (36 x ~5 µs a step for a Qwen3-8B shape at batch 1, docs/engine.md). Off ("0") by default
    until a GPU run has checked it: the interpreter runs programs one after another, so the CPU tests show
    the arithmetic and the ticket logic, not the GPU's memory ordering."""
    value = os.environ.get("IDLM_ATTN_FUSED_COMBINE", "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"IDLM_ATTN_FUSED_COMBINE={value!r} is not valid: '0' or '1'")
    return value == "1"


def split_counters(num: int, device) -> torch.Tensor:
    """Zeroed int32 tickets for the fused combine, one per (row, KV head) of a launch (each launch leaves
    them zero again). Made once, with the KV pool (`PagedKVCache.split_counters`)."""
    return torch.zeros(num, dtype=torch.int32, device=device)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    last: torch.Tensor, page_size: int, splits: int | None = None, exact: bool = False,
                    counters: torch.Tensor | None = None, hide: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (any strides with unit stride in D), k_pool/v_pool [slots, Hkv, D] (one layer),
    block_tables [B, M] page ids, last [B, T] the last key position each query sees (−1: none)
    -> out [B, Hq, T, D] (a transposed view of a contiguous [B, T, Hq, D], so the caller's
    `transpose(1, 2).reshape(B, T, Hq·D)` is free). splits: the split-KV factor (None: `kv_splits`).
    counters: zeroed int32 tickets (`split_counters`, at least B·Hkv): with $IDLM_ATTN_FUSED_COMBINE=1 a split
    launch combines in its last split instead of a second kernel (`fused_combine`). hide [B, T, 2]: a range
    [lo, hi) of key positions each query does not see besides those past `last` (None: none).

    exact: every query row bit-identical whatever T, the batch and the other rows (issue 16): fixed
    EXACT_BLOCK_M x EXACT_BLOCK_N tiles, the query split into tiles of EXACT_BLOCK_M / G tokens (one
    program each, so any T — prefill chunks too), keys walked from 0 in the same tiles, no split KV.
    A key tile that a row cannot see adds exact zeros to its state, so a row that sees keys 0..j gets
    the same bits in a 1-token AR step, a 2N−1-token verify block or a prefill chunk."""
    B, Hq, T, D = q.shape
    Hkv = k_pool.shape[1]
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("paged_attention needs unit stride in the head dimension and equal K/V pool layouts")
    if block_tables.stride(1) != 1 or last.stride(1) != 1:  # rows may be strided (graph views), entries not
        raise ValueError("paged_attention needs block tables and `last` with unit stride along each row")
    group = Hq // Hkv
    if hide is not None:
        if hide.shape != (B, T, 2):
            raise ValueError(f"hide must be [B, T, 2] = {(B, T, 2)}, got {tuple(hide.shape)}")
        hide = hide.contiguous()
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    prefetch, tuned_n, tuned_warps = kernel_tuning()
    if exact:
        if splits not in (None, 1):
            raise ValueError(f"exact paged attention does not split KV (splits={splits})")
        splits, block_m, block_n = 1, max(EXACT_BLOCK_M, _tile_rows(group, 1)), EXACT_BLOCK_N
        full_m, tq = block_m, block_m // group
        programs = -(-T // tq)
    else:
        full_m = _tile_rows(group, T)  # the block's G·T rows, padded
        tq = full_m // group  # tq >= T: one query tile
        if splits is None:
            splits = kv_splits(B, Hkv, block_tables.shape[1] * page_size, q.device)
        tile = row_tile()  # a split launch may take the block in row tiles, a program each
        block_m = tile if splits > 1 and 0 < tile < full_m else full_m
        default_n, default_warps = default_tiles(B * Hkv, block_m, D, q.dtype != torch.float32)
        block_n, warps = tuned_n or default_n, tuned_warps or default_warps
        programs = splits
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    mt = -(-group * T // block_m) if block_m < full_m else 1  # row tiles per (row, KV head, split): none of padding
    fwd, combine = _kernel()
    if splits > 1:
        part_m = torch.empty(B, Hkv, splits, full_m, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, Hkv, splits, full_m, D, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    fuse = splits > 1 and counters is not None and counters.numel() >= B * Hkv and fused_combine()
    fwd[(B, Hkv, programs * mt)](
        q, k_pool, v_pool, out, block_tables, last, last if hide is None else hide, part_m, part_l, part_acc,
        counters if fuse else out, D ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1),
        out.stride(0), out.stride(1), out.stride(2), block_tables.stride(0), last.stride(0),
        0 if hide is None else hide.stride(0),
        T, page_size, splits, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        IEEE=q.dtype == torch.float32, SPLIT=splits > 1, TQ=tq, PREFETCH=prefetch and not exact,
        FUSED_COMBINE=fuse, MIN_CHUNK=max(min_chunk(), block_n), TREE=hide is not None, MT=mt, FULL_M=full_m,
        num_warps=4 if exact else warps,
    )
    if splits > 1 and not fuse:
        block_r = min(full_m, COMBINE_ROWS)
        combine[(B, Hkv, full_m // block_r)](
            out, part_m, part_l, part_acc, last, out.stride(0), out.stride(1), out.stride(2), last.stride(0), T,
            splits, GROUP=group, BLOCK_M=full_m, BLOCK_N=block_n, D=D, BLOCK_R=block_r, num_warps=4)
    return out.transpose(1, 2)
