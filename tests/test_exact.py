"""Exact mode (issue 16): every kernel of the decode and prefill path gives a token row the same bits
whatever the query length, the batch and the other rows. Run on CPU through Triton's interpreter."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="exact mode's kernels are Triton kernels (dev extra)")

from blas import NOT_ROW_INVARIANT, row_invariant_matmul  # noqa: E402

from idlm.layers.attention import last_visible  # noqa: E402
from idlm.layers.paged_attention import PagedKVCache  # noqa: E402
from idlm.layers.paged_kernel import EXACT_BLOCK_M, paged_attention  # noqa: E402

# the bit-invariance tests need a BLAS whose matmul computes a tile's rows alike (tests/blas.py)
bit_invariance = pytest.mark.skipif(not row_invariant_matmul(), reason=NOT_ROW_INVARIANT)


def _pool(rows_pages, page, hkv, d, seed=0):
    """A one-layer pool with random K/V and a random page table of `rows_pages` pages per row."""
    g = torch.Generator().manual_seed(seed)
    pool = PagedKVCache(1, rows_pages * 4 + 1, page, hkv, d)
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    return pool, g


@bit_invariance
@pytest.mark.parametrize("hq,hkv,d,page", [(6, 2, 16, 8), (9, 3, 32, 16), (4, 4, 16, 4)])
def test_exact_attention_row_bits_do_not_depend_on_block_batch_or_chunk(hq, hkv, d, page):
    """The attention output of request A's query at position j, with A's keys 0..j: computed as a 1-token
    AR step, inside a 7-token verify block, inside a long prefill chunk (several query tiles), and
    beside other requests at other positions, in a different row order -> the same bits."""
    pages = -(-200 // page)  # 200 positions
    pool, g = _pool(pages, page, hkv, d)
    table_a = torch.randperm(pages * 4, generator=g)[:pages]
    table_b = torch.randperm(pages * 4, generator=g)[:pages]
    j = 61
    q_of = torch.randn(pages * page, hq, d, generator=g)  # A's query vectors by position

    def run(tables, starts, T):
        """Rows of T queries from `starts`; row r uses A's queries when its table is A's."""
        q = torch.stack([q_of[s: s + T] if tables[r] is table_a else torch.randn(T, hq, d, generator=g)
                         for r, s in enumerate(starts)]).transpose(1, 2)  # [B, Hq, T, D]
        st = torch.tensor(starts)
        out = paged_attention(q, pool.k[0], pool.v[0], torch.stack(tables), last_visible(st, T, None), page,
                              exact=True)
        return out  # [B, Hq, T, D]

    alone = run([table_a], [j], 1)[0, :, 0]
    verify = run([table_a], [j - 3], 7)[0, :, 3]
    prefill_len = max(j + 4, 2 * (EXACT_BLOCK_M // (hq // hkv)) + 5)  # at least three query tiles
    prefill = run([table_a], [0], prefill_len)[0, :, j]
    batched = run([table_b, table_a, table_b], [17, j - 2, 90], 7)[1, :, 2]
    assert torch.equal(alone, verify)
    assert torch.equal(alone, batched)
    assert torch.equal(alone, prefill)
    # and the values are attention's: the reference softmax over A's keys 0..j
    pos = torch.arange(j + 1)
    slots = table_a[pos // page] * page + pos % page
    k, v = pool.k[0][slots], pool.v[0][slots]  # [j+1, Hkv, D]
    qh = q_of[j].view(hkv, hq // hkv, d)
    att = torch.softmax(torch.einsum("hgd,khd->hgk", qh, k) * d ** -0.5, dim=-1)
    want = torch.einsum("hgk,khd->hgd", att, v).reshape(hq, d)
    torch.testing.assert_close(alone, want, rtol=1e-5, atol=1e-5)


def test_exact_attention_refuses_split_kv():
    pool, g = _pool(2, 4, 1, 16)
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(ValueError, match="split"):
        paged_attention(q, pool.k[0], pool.v[0], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1,
                        dtype=torch.long), 4, splits=2, exact=True)


# ----------------------------------------------------------------- the engine in exact mode

from tiny import tiny_transformer  # noqa: E402

from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.errors import ConfigError  # noqa: E402

MASK = 3


def _engine(model, decoder, stride=4, exact=True, max_num_seqs=8):
    return LLMEngine(model, None, EngineConfig(decoder=decoder, stride=stride, num_pages=96, page_size=4,
                                               max_num_seqs=max_num_seqs, exact=exact, cuda_graphs=False))


def _run(engine, prompts, n=10):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for _ in prompts]
    return [(o.token_ids, o.logprobs) for o in engine.run(prompts, params)]


@bit_invariance
@pytest.mark.parametrize("split_k", [False, True])
def test_exact_engine_logprobs_identical_alone_batched_and_across_decoders(split_k, monkeypatch):
    """The same greedy request: its tokens and the bits of every token's logprob (a function of that
    position's logits row) are the same alone, inside a batch of other requests (other lengths, prefill
    chunks of other sizes), and for ISD N = 2 / 4 (verify rows of 2N−1-token blocks) as for AR; also with
    every projection's K split (`invariant.split_k`, which only large weights take on their own)."""
    if split_k:
        import idlm.layers.invariant as inv

        monkeypatch.setattr(inv, "MIN_SPLIT_ELEMENTS", 0)
        monkeypatch.setattr(inv, "BLOCK_K", 16)  # the tiny model's K of 64: four chunks to split
    torch.manual_seed(0)
    model = tiny_transformer(64, head_dim=16, mask_token_id=MASK)
    target = torch.randint(4, 64, (9,)).tolist()
    others = [torch.randint(4, 64, (n,)).tolist() for n in (23, 4, 40)]
    alone = _run(_engine(model, "ar"), [target])[0]
    batched = _run(_engine(model, "ar"), [others[0], target, *others[1:]])[1]
    assert alone == batched
    for stride in (2, 4):
        isd = _run(_engine(model, "isd", stride), [others[1], target])[1]
        assert isd == alone, f"ISD N={stride}"


@bit_invariance
def test_exact_engine_seeded_sampled_request_alone_equals_batched():
    """A seeded T = 1 request (top-p 0.9) draws from per-request counter-based streams, so once its logits
    are batch-invariant its tokens and logprob bits are the same alone and inside a batch (ISD N = 4)."""
    torch.manual_seed(1)
    model = tiny_transformer(64, head_dim=16, mask_token_id=MASK)
    target = torch.randint(4, 64, (7,)).tolist()
    others = [torch.randint(4, 64, (n,)).tolist() for n in (19, 5)]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True, logprobs=0)
    q = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    alone = _engine(model, "isd").run([target], [p])[0]
    batched = _engine(model, "isd").run([others[0], target, others[1]], [q, p, q])[1]
    assert (alone.token_ids, alone.logprobs) == (batched.token_ids, batched.logprobs)


@pytest.mark.parametrize("decoder", ["ar", "risd"])
def test_exact_engine_with_graph_input_layout(decoder):
    """Exact mode's kernels fed the CUDA graph's packed (strided) input views (`packed_inputs`, no graph
    needed) give the same tokens and logprob bits as contiguous inputs, batch of several requests."""
    from idlm.layers.lora import LoRAAdapter, LoRAConfig

    torch.manual_seed(2)
    model = tiny_transformer(64, head_dim=16, mask_token_id=MASK)
    lora = LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False) \
        if decoder == "risd" else None
    prompts = [torch.randint(4, 64, (n,)).tolist() for n in (6, 17, 3)]
    outs = []
    for packed in (False, True):
        eng = LLMEngine(model, None, EngineConfig(decoder=decoder, stride=4, num_pages=96, page_size=4, exact=True,
                                                  cuda_graphs=False), lora=lora)
        eng.runner.packed_inputs = packed
        outs.append(_run(eng, prompts, n=8))
    assert outs[0] == outs[1]


def test_exact_mode_refuses_sdpa_attention():
    with pytest.raises(ConfigError, match="exact"):
        EngineConfig(exact=True, attention="sdpa")


@bit_invariance
@pytest.mark.slow
def test_bench_exact_script_smoke(tmp_path):
    """scripts/bench_exact.py (the GPU driver of issue 16) CPU-sized: every stage runs, and in exact mode
    every R-ISD / ISD output equals AR's, every logprob of the request is bit-identical alone and batched,
    and the preempted run equals the unpreempted one."""
    import json

    from tiny import run_script

    run_script("bench_exact.py", "agree,bits,preempt", SMOKE="1", TRITON_INTERPRET="1", OUT=str(tmp_path))
    res = json.loads((tmp_path / "bench_exact.json").read_text())
    for key, row in res["agree"].items():
        if key.startswith("exact/"):
            assert row["identical"] == row["of"], key
    bits = res["bits"]["exact"]
    assert bits["batch7"] == bits["batch64"] == bits["isd4_batch8"] == bits["of"] > 0
    pre = res["preempt"]["exact"]
    assert pre["preemptions"] > 0 and pre["identical_logprob_bits"] == pre["of"]


@pytest.mark.parametrize("layout", ["pair", "select", "lowrank"])
def test_exact_forward_with_a_fused_lora_matches_the_fast_one(layout):
    """Exact mode's forward (batch-invariant matmuls and norms) through either fused-LoRA layout gives the
    values of the ordinary forward (fp32, Qwen3 shape: the "select" layout picks each row's half before the
    exact per-head norms there)."""
    from idlm.layers.lora import LoRAAdapter, LoRAConfig

    model = tiny_transformer(64, head_dim=16, mask_token_id=MASK)
    lora = LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    model.fuse_projections().fuse_lora(lora, layout)
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    gate = torch.tensor([[False, True, True, False, True, True, True], [False] * 4 + [True] * 3])
    with torch.no_grad():
        fast = model(ids, lora=lora, lora_gate=gate.float(), is_mask=gate)
        exact = model(ids, lora=lora, lora_gate=gate.float(), is_mask=gate, exact=True)
    torch.testing.assert_close(exact, fast, rtol=1e-5, atol=1e-5)
