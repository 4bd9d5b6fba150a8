"""`PagedAttention`'s row-by-row causal path for prefill chunks (`host_rows`): the same outputs as the masked
batch path for every real query token — whole prompts, later chunks after a kept prefix (bottom-right
causal), grouped-query heads, right padding — and the engine unchanged by it."""

import pytest
import torch

from idlm.layers import paged_attention as pa
from idlm.layers.paged_attention import PagedAttention, PagedKVCache


def _chunk(Hq, Hkv, D, page, rows, seed=0):
    """rows [(start, n)]: a pool holding each row's earlier keys on shuffled pages, and a right-padded
    query chunk (padded tokens write to the trash slot)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(rows), max(n for _, n in rows)
    per_row = max(-(-(s + T) // page) for s, _ in rows) + 1  # padded positions map to pages too
    pool = PagedKVCache(1, B * per_row + 1, page, Hkv, D)
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    tables = torch.randperm(B * per_row, generator=g).view(B, per_row)
    starts = torch.tensor([s for s, _ in rows])
    pos = starts[:, None] + torch.arange(T)
    slots = tables.gather(1, pos // page) * page + pos % page
    for b, (_, n) in enumerate(rows):
        slots[b, n:] = pool.trash_slot
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    return pool, slots, tables, starts, q, k, v


def _copy(pool):
    other = PagedKVCache(1, pool.num_blocks, pool.block_size, pool.k.shape[2], pool.k.shape[3])
    other.k.copy_(pool.k)
    other.v.copy_(pool.v)
    return other


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("rows", [[(0, 37)], [(0, 5), (21, 16)], [(40, 9), (0, 30), (3, 1)]])
def test_row_causal_path_equals_the_masked_path(Hq, Hkv, rows):
    pool, slots, tables, starts, q, k, v = _chunk(Hq, Hkv, 16, 8, rows)
    ref_pool = _copy(pool)
    want = PagedAttention(ref_pool, slots, tables, starts).attend(0, q, k, v)
    attn = PagedAttention(pool, slots, tables, starts, host_rows=rows)
    called = []
    original = attn._attend_rows
    attn._attend_rows = lambda *a: called.append(1) or original(*a)
    got = attn.attend(0, q, k, v)
    if len(rows) <= pa.ROW_CAUSAL_MAX_ROWS or max(n for _, n in rows) >= pa.ROW_CAUSAL_MIN_TOKENS:
        assert called  # this chunk took the row path
    # both wrote the chunk's K/V to the same slots (the trash slot, where every padded token writes, holds
    # whichever padded token's K/V came last)
    torch.testing.assert_close(pool.k[:, :pool.trash_slot], ref_pool.k[:, :pool.trash_slot])
    for b, (_, n) in enumerate(rows):  # real tokens equal; padded ones are never read
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], rtol=1e-5, atol=1e-5)


def test_row_causal_path_is_taken_for_long_chunks_of_many_rows(monkeypatch):
    rows = [(0, 12), (4, 3), (0, 1)]
    monkeypatch.setattr(pa, "ROW_CAUSAL_MIN_TOKENS", 10)
    pool, slots, tables, starts, q, k, v = _chunk(4, 2, 16, 8, rows, seed=1)
    ref = PagedAttention(_copy(pool), slots, tables, starts).attend(0, q, k, v)
    got = PagedAttention(pool, slots, tables, starts, host_rows=rows).attend(0, q, k, v)
    for b, (_, n) in enumerate(rows):
        torch.testing.assert_close(got[b, :, :n], ref[b, :, :n], rtol=1e-5, atol=1e-5)
    # SDAR rows (a visible map) always take the masked path
    vis = torch.arange(12).repeat(3, 1)
    attn = PagedAttention(_copy(pool), slots, tables, starts, vis, host_rows=rows)
    attn._attend_rows = lambda *a: pytest.fail("a visible map must use the masked path")
    attn.attend(0, q, k, v)


def test_engine_prefill_unchanged_by_the_row_path(tiny, monkeypatch):
    """Greedy tokens and logprobs of one long and two short prompts with the row path forced on for every
    prefill vs forced off (ISD N = 4; the prompts also share a prefix, so later chunks start past 0)."""
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    model, tok = tiny
    base = tok.encode("The quick brown fox jumps over the lazy dog. " * 6)
    prompts = [base, base[:40] + tok.encode(" and then"), tok.encode("Hello")]
    params = [SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)] * 3

    def run(min_tokens, max_rows):
        monkeypatch.setattr(pa, "ROW_CAUSAL_MIN_TOKENS", min_tokens)
        monkeypatch.setattr(pa, "ROW_CAUSAL_MAX_ROWS", max_rows)
        eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, max_num_seqs=4, num_pages=128,
                                                 max_num_batched_tokens=32, enable_prefix_caching=True))
        outs = [eng.run([p], [sp])[0] for p, sp in zip(prompts, params)]  # one by one: prefix hits
        outs += eng.run(prompts, params)  # and batched
        return [(o.token_ids, o.logprobs) for o in outs]

    on, off = run(1, 64), run(10**9, 0)
    for (t1, l1), (t2, l2) in zip(on, off):
        assert t1 == t2
        assert l1 == pytest.approx(l2, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (SDPA's flash kernels)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_row_causal_path_on_cuda(dtype, tol):
    """On the GPU the row path runs SDPA's flash / memory-efficient kernels (the masked path: the math one):
    Qwen3-8B's head layout, a whole 300-token prompt and a 512-token chunk after 200 kept keys. The H200
    gave max |difference| 0 and 1.9e-6 in fp32 and 0.0156 (one bf16 rounding step) in bf16."""
    for rows in ([(0, 300)], [(0, 64), (200, 512)]):
        pool, slots, tables, starts, q, k, v = _chunk(32, 8, 128, 16, rows)
        ref = _copy(pool)
        for p in (pool, ref):
            p.k, p.v = p.k.cuda().to(dtype), p.v.cuda().to(dtype)
        slots, tables, starts = slots.cuda(), tables.cuda(), starts.cuda()
        q, k, v = (x.cuda().to(dtype) for x in (q, k, v))
        want = PagedAttention(ref, slots, tables, starts).attend(0, q, k, v)
        got = PagedAttention(pool, slots, tables, starts, host_rows=rows).attend(0, q, k, v)
        for b, (_, n) in enumerate(rows):
            torch.testing.assert_close(got[b, :, :n], want[b, :, :n], rtol=tol, atol=tol)
