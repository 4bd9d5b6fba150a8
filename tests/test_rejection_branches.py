"""ISD / R-ISD rejection branches (`idlm.decoding.isd`, "Rejection branches"): one forward also drafts, for
every draft that may be rejected, the next drafts from its correction on, through a tree of query rows.

Oracles:
- a brute-force visibility matrix for the layout (`branch_layout`) and for `cache_mask`'s hidden ranges;
- the reference gather + SDPA path for the Triton kernel's hidden ranges (interpreter on CPU), split and not;
- a plain cold-start forward: branch j's logits equal those of the cold block [s_{j−1}, MASK…] a rejection at
  j would run next, at the same positions over the same kept prefix (that is what the rows are for);
- greedy AR: greedy ISD and R-ISD with branches emit its tokens, through the reference runner and the engine;
- the reference runner for the engine (greedy and seeded sampling, the kernel and the graph input layout);
- (the chi-square of sampling with branches against the enumerated AR law: tests/test_isd_distribution.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_isd import MASK, greedy, random_prompts, tiny_config
from tiny import tiny_transformer

from idlm.decoding import make_decoder
from idlm.decoding.ar import ARDecoder
from idlm.decoding.base import DecodeStats
from idlm.decoding.isd import ISDDecoder, ISDState, branch_layout
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError
from idlm.layers.attention import KVCache, cache_mask
from idlm.layers.lora import LoRAAdapter, LoRAConfig
from idlm.layers.paged_attention import PagedAttention, PagedKVCache
from idlm.models.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_config()).init_weights(std=0.6, seed=0).eval()


def _visible(offsets, hide):
    """Brute force: the block rows each query row sees (causal by index, minus its hidden range)."""
    q = len(offsets)
    return [[i <= t and not hide[t][0] <= i < hide[t][1] for i in range(q)] for t in range(q)]


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_branch_layout_sees_the_accepted_prefix_and_its_own_rows(n):
    offsets, hide = branch_layout(n)
    k, main = n - 1, 2 * n - 1
    assert len(offsets) == len(hide) == n * n
    vis = _visible(offsets, hide)
    for t in range(main):  # the plain rows: causal, at their own index
        assert offsets[t] == t and vis[t] == [i <= t for i in range(n * n)]
    for j in range(k):
        for i in range(k):
            t = main + j * k + i
            assert offsets[t] == j + 1 + i  # from the position of the correction of s_j on
            want = [r <= j or main + j * k <= r <= t for r in range(n * n)]  # rows 0..j, then its own earlier rows
            assert vis[t] == want, (n, j, i)


def test_cache_mask_hides_each_querys_range():
    starts = torch.tensor([3, 0])
    hide = torch.tensor([[[0, 0], [1, 2], [1, 3]], [[0, 0], [0, 1], [2, 2]]])
    got = cache_mask(starts, 3, 8, hide=hide)[:, 0]
    for b in range(2):
        for t in range(3):
            lo, hi = (int(x) + int(starts[b]) for x in hide[b, t])
            want = [j <= starts[b] + t and not lo <= j < hi for j in range(8)]
            assert got[b, t].tolist() == want


@pytest.mark.parametrize("splits", ["1", "3"])
def test_kernel_hidden_ranges_equal_the_reference_path(splits, monkeypatch):
    """The paged kernel's `hide` (interpreter) against gather + SDPA under the same mask, N = 3 layout."""
    pytest.importorskip("triton", reason="the paged kernel needs the triton package (dev extra)")
    monkeypatch.setenv("IDLM_KV_SPLITS", splits)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, page, n = 3, 4, 2, 16, 4, 3
    offsets, hide = branch_layout(n)
    T = len(offsets)
    starts = torch.tensor([37, 0, 90])
    pages = max(-(-(int(s) + T) // page) for s in starts) + 1
    pool = PagedKVCache(1, B * pages + 2, page, Hkv, D)
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    tables = torch.randperm(B * pages, generator=g).view(B, pages)
    pos = starts[:, None] + torch.arange(T)
    slots = tables.gather(1, pos // page) * page + pos % page
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    hidden = torch.tensor(hide).expand(B, T, 2)
    pool2 = PagedKVCache(1, pool.num_blocks, page, Hkv, D)
    pool2.k.copy_(pool.k)
    pool2.v.copy_(pool.v)
    want = PagedAttention(pool, slots, tables, starts, hide=hidden).attend(0, q, k, v)
    got = PagedAttention(pool2, slots, tables, starts, hide=hidden, kernel=True).attend(0, q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    causal = PagedAttention(pool, slots, tables, starts).attend(0, q, k, v)
    assert not torch.allclose(causal[:, :, 2 * n - 1:], want[:, :, 2 * n - 1:])  # the branch rows did hide keys
    torch.testing.assert_close(causal[:, :, : 2 * n - 1], want[:, :, : 2 * n - 1])  # the plain rows did not


@pytest.mark.parametrize("lora", [False, True])
def test_branch_logits_equal_the_cold_block_a_rejection_would_run(model, lora):
    """Branch j of a verify block [pending, s_0..s_{K−1}, MASK…] drafts as the MASK rows of a plain causal block
    [pending, s_0..s_{j−1}, MASK × K] over the same prefix: its first MASK stands where the correction of s_j
    goes (unseen, like a cold start's first MASK). Same positions, same visible tokens, so the same logits.
    fp32, a tiny random model (with an R-ISD adapter: gate on)."""
    n, k = 4, 3
    prompt = random_prompts((9,), seed=3)[0]
    adapter = None
    if lora:
        adapter = LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=1, zero_b=False)
    dec = ISDDecoder(n, MASK, lora=lora, branches=True)
    state = ISDState("V", last=7, specs=[11, 12, 13])
    blk = dec.block(state)
    kw = {}

    def forward(tokens, offsets, start, is_mask, gate, hide=None):
        cache = KVCache.for_model(model.config, 1, 64)
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache.view(starts=torch.tensor([0])))
        ids = torch.tensor([tokens])
        if lora:
            kw.update(lora=adapter, lora_gate=torch.tensor([gate]), is_mask=torch.tensor([is_mask]))
        view = cache.view(starts=torch.tensor([start]), hide=None if hide is None else torch.tensor([hide]))
        h = model(ids, (start + torch.tensor(offsets))[None], view, **kw)
        return model.compute_logits(h)[0]

    P = len(prompt)
    with torch.no_grad():
        got = forward(blk.tokens, blk.offsets, P, blk.is_mask, blk.gate, blk.hide)
        for j in range(k):
            cold = [7, *state.specs[:j]] + [MASK] * k
            want = forward(cold, list(range(j + 1 + k)), P, [False] * (j + 1) + [True] * k,
                           [False] * (j + 1) + [True] * k)
            rows = slice(2 * n - 1 + j * k, 2 * n - 1 + (j + 1) * k)
            torch.testing.assert_close(got[rows], want[j + 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_greedy_with_branches_equals_greedy_ar_and_never_restarts_cold(model, n):
    prompts = random_prompts()
    ar = generate(model, ARDecoder(), prompts, greedy(40))
    for mode in ("sample", "argmax"):
        outs = generate(model, ISDDecoder(n, MASK, branches=True), prompts, greedy(40, draft=mode))
        assert [o.token_ids for o in outs] == [a.token_ids for a in ar], (n, mode)
        s = DecodeStats.total([o.stats for o in outs])
        assert s.rounds["cold"] == len(prompts)  # only each request's first round (after the prefill)
        assert s.rounds["verify_rejected"] > 0  # rejections happened and were followed by verify rounds


def test_risd_greedy_with_branches_equals_the_base_models_ar(model):
    base = Transformer(tiny_config(mask=False)).init_weights(std=0.6, seed=2).eval()
    adapter = LoRAAdapter(base.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    prompts = random_prompts(seed=5)
    ar = generate(base, ARDecoder(), prompts, greedy(30))
    outs = generate(base, ISDDecoder(3, None, lora=True, branches=True), prompts, greedy(30), lora=adapter)
    assert [o.token_ids for o in outs] == [a.token_ids for a in ar]


def test_branches_raise_the_tpf_of_a_trained_drafter(tiny):
    """The embedded idlm-tiny drafts well: with branches a rejection is followed by a verify round of branch
    drafts instead of a cold round, so the same greedy tokens take fewer forwards."""
    m, tok = tiny
    prompts = [tok.encode(t) for t in ("The cat", "Once upon a time", "1 + 2 =", "Hello")]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = generate(m, make_decoder("isd", 4, m.config, tok), prompts, params)
    tree = generate(m, make_decoder("isd", 4, m.config, tok, branches=True), prompts, params)
    assert [o.token_ids for o in tree] == [o.token_ids for o in plain]
    p, t = DecodeStats.total([o.stats for o in plain]), DecodeStats.total([o.stats for o in tree])
    assert p.rounds["cold"] > len(prompts) and t.rounds["cold"] == len(prompts)
    assert t.tpf > p.tpf, (p.to_dict(), t.to_dict())


def _run_engine(model, prompts, params, lora=None, **kw):
    cfg = dict(decoder="isd", stride=4, page_size=8, num_pages=96, max_num_batched_tokens=256, max_num_seqs=32,
               branches=True)
    cfg.update(kw)
    eng = LLMEngine(model, None, EngineConfig(**cfg), lora=lora)
    outs = eng.run(prompts, params)
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages  # nothing leaked
    return outs, eng


@pytest.mark.parametrize("stride", [2, 4])
def test_engine_with_branches_equals_reference_greedy_and_seeded(tiny, stride):
    m, tok = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 200, (int(n),), generator=g).tolist() for n in (3, 17, 8, 30, 5, 12)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, top_k=0 if i % 3 else 20, seed=i,
                             max_tokens=10 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    ref = generate(m, make_decoder("isd", stride, m.config, tok, branches=True), prompts, params)
    got, eng = _run_engine(m, prompts, params, stride=stride)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.stats.forwards for o in got] == [o.stats.forwards for o in ref]
    assert eng.max_query_len == stride * stride


@pytest.mark.parametrize("guesses,rows", [(0, None), (2, None), (2, 1)])
@pytest.mark.parametrize("decoder", ["isd", "risd"])
def test_engine_branches_through_the_kernel_and_graph_inputs_equal_plain_inputs(decoder, guesses, rows):
    """The Triton kernel's hidden ranges (interpreter) and the CUDA graph's packed input layout (strided
    views), against the gather + SDPA path with plain inputs: same tokens, greedy and seeded sampled rows;
    with guessed corrections too (tests/test_guessed_corrections.py; a small vocabulary, so guesses are often
    right)."""
    pytest.importorskip("triton", reason="the paged kernel needs the triton package (dev extra)")
    torch.manual_seed(0)
    vocab = 16 if guesses else 64
    m = tiny_transformer(vocab, head_dim=16, mask_token_id=3)
    lora = None
    if decoder == "risd":
        lora = LoRAAdapter(m.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    prompts = [torch.randint(4, vocab, (n,)).tolist() for n in (5, 23, 11, 40)]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, seed=i, max_tokens=10 + i, ignore_eos=True)
              for i in range(len(prompts))]
    outs, guessed = {}, 0
    for attention, packed in (("sdpa", False), ("triton", True)):
        eng = LLMEngine(m, None, EngineConfig(decoder=decoder, stride=3, num_pages=64, page_size=4, branches=True,
                                              guesses=guesses, guess_rows=rows, attention=attention), lora=lora)
        eng.runner.packed_inputs = packed
        res = eng.run(prompts, params)
        outs[attention] = [o.token_ids for o in res]
        guessed += sum(o.stats.guessed for o in res)
        assert eng.block_manager.num_free_pages == 64
    assert outs["triton"] == outs["sdpa"]
    assert (guessed > 0) == bool(guesses)  # with guesses, some corrections met one


def test_branches_only_up_to_a_batch_size_stay_exact(tiny):
    """branches_max_batch: batches above it run the plain layout of the same stride, below it the branches —
    a request crosses between them as others finish, mid-decode, and its greedy tokens stay the reference's."""
    m, tok = tiny
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 200, (int(n),), generator=g).tolist() for n in (3, 17, 8, 30, 5, 12)]
    params = [SamplingParams(temperature=0, max_tokens=8 + 6 * i, ignore_eos=True) for i in range(len(prompts))]
    ref = generate(m, make_decoder("isd", 4, m.config, tok), prompts, params)
    got, eng = _run_engine(m, prompts, params, branches_max_batch=3)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert set(eng._decoders) == {(4, True), (4, False)}  # both layouts ran (the plain one is made on first use)
    q = eng.counters["decode_query_tokens"]
    rows = sum(o.stats.forwards for o in got)
    assert 7 * rows < q < 16 * rows


def test_branch_options_are_checked(tiny):
    m, _ = tiny
    with pytest.raises(ConfigError, match="branches"):
        EngineConfig(decoder="ar", branches=True)
    with pytest.raises(ConfigError, match="auto"):
        EngineConfig(decoder="isd", stride="auto", branches=True, branches_max_batch=8)
    with pytest.raises(ConfigError, match="branches"):
        EngineConfig(decoder="isd", stride=4, branches="yes")
    with pytest.raises(ConfigError, match="rejection branches"):
        make_decoder("sdar", 4, m.config, branches=True)
    with pytest.raises(ConfigError, match="branches_max_batch needs branches"):
        EngineConfig(decoder="isd", stride=4, branches_max_batch=8)
    with pytest.raises(ConfigError, match="branches_max_batch"):
        EngineConfig(decoder="isd", stride=4, branches=True, branches_max_batch=0)


class _RowStrides(ISDDecoder):
    """ISD whose rows run their own strides n <= N (what the adaptive stride's per-row choice sets), by row."""

    def __init__(self, strides, *args, **kw):
        super().__init__(*args, **kw)
        self._strides = strides

    def start(self, logits, params, rngs):
        states, results = super().start(logits, params, rngs)
        for s, n in zip(states, self._strides):
            s.n = n
        return states, results


@pytest.mark.parametrize("lora", [False, True])
def test_rows_of_their_own_stride_with_branches_equal_greedy_ar(model, lora):
    """A step of stride 4 with branches whose rows run n = 1..4: each row's branch groups use their first n − 1
    rows (`draft_index` per row); greedy output is AR's, sampled output is the seeded reference's per row."""
    prompts = random_prompts((3, 9, 5, 14, 7), seed=4)
    base, adapter = model, None
    if lora:
        base = Transformer(tiny_config(mask=False)).init_weights(std=0.6, seed=2).eval()
        adapter = LoRAAdapter(base.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    ar = generate(base, ARDecoder(), prompts, greedy(30))
    dec = _RowStrides([4, 3, 2, 1, 3], 4, None if lora else MASK, lora=lora, branches=True)
    outs = generate(base, dec, prompts, greedy(30), lora=adapter)
    assert [o.token_ids for o in outs] == [a.token_ids for a in ar]
    assert outs[3].stats.rounds.get("ar", 0) == outs[3].stats.forwards  # n = 1: plain AR steps inside the block


def test_policy_prices_branches():
    from idlm.decoding.stride_policy import StepCostModel, choose_stride, isd_tpf, query_len_of, tpf_table

    a = [0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5]
    assert query_len_of(4, branches=True) == 16 and query_len_of(4) == 7 and query_len_of(1, branches=True) == 1
    for n in range(2, 9):  # no cold steps: every step verifies, E = 1 + Σ_j Π_{i<=j} a_i
        want = 1 + sum(math.prod(a[:j + 1]) for j in range(n - 1))
        assert abs(isd_tpf(a[: n - 1], branches=True) - want) < 1e-12
        assert isd_tpf(a[: n - 1], branches=True) > isd_tpf(a[: n - 1])
    table = tpf_table([a], [1, 2, 4, 8], branches=True)[0]
    assert table[0] == 1.0 and abs(table[2] - isd_tpf(a[:3], branches=True)) < 1e-12
    # the rate of stride N: tokens (no cold steps) over the cost of N² query tokens a row
    cost = StepCostModel(1e-3, 0.0, 1e-4)
    tree = choose_stride([a] * 4, cost, ar_margin=0.0, hysteresis=0.0, branches=True)
    assert abs(tree.rates[4] - 4 * isd_tpf(a[:3], branches=True) / cost.cost(4, 16)) < 1e-9
    # nearly free query tokens: without cold steps a longer stride pays; dear ones: N² rows make it cost more
    cheap, dear = StepCostModel(1e-3, 0.0, 1e-6), StepCostModel(1e-3, 0.0, 1e-4)
    for rows, c, longer in (([a], cheap, True), ([a] * 4, dear, False)):
        plain = choose_stride(rows, c, ar_margin=0.0, hysteresis=0.0)
        tree = choose_stride(rows, c, ar_margin=0.0, hysteresis=0.0, branches=True)
        assert (tree.stride > plain.stride) if longer else (tree.stride < plain.stride), (plain, tree)


def test_choose_layout_takes_the_faster_layout_and_keeps_the_current_one_within_hysteresis():
    """`choose_layout`: the higher rate of the two layouts' choices; the current layout stays unless the other
    is more than the hysteresis faster; a plain AR step (N = 1) is one step whatever the layout."""
    from idlm.decoding.stride_policy import StrideChoice, choose_layout

    plain = StrideChoice(2, 100.0, {1: 80.0, 2: 100.0})
    faster = StrideChoice(3, 110.0, {1: 80.0, 3: 110.0}, branches=True)
    close = StrideChoice(3, 102.0, {1: 80.0, 3: 102.0}, branches=True)
    assert choose_layout([plain, faster]) is faster
    assert choose_layout([plain, faster], current=plain) is faster  # 10% > the 3% hysteresis
    assert choose_layout([plain, close]) is close
    assert choose_layout([plain, close], current=plain) is plain  # 2%: not worth a synchronous step
    assert choose_layout([close, plain], current=faster) is close  # the current layout's choice, any stride
    ar = choose_layout([StrideChoice(1, 80.0, {1: 80.0}), StrideChoice(1, 80.0, {1: 80.0}, branches=True)])
    assert ar.stride == 1 and not ar.branches
    assert not choose_layout([StrideChoice(1, 80.0, {1: 80.0}, branches=True)]).branches
    with pytest.raises(ValueError, match="at least one"):
        choose_layout([])


def test_branches_pay_at_batch_1_and_the_plain_layout_at_a_large_batch():
    """With the same acceptance (0.8 per position) and a step cost of base + per query token: at batch 1 the
    branch layout's longer stride is the best rate; at batch 64 its N² query rows cost more than the cold
    steps they remove, and the plain layout's N = 2 is chosen — over AR too (each choice checked against
    every rate by hand: the branch layout's best stride is more than the hysteresis behind)."""
    from idlm.decoding.stride_policy import StepCostModel, choose_layout, choose_stride, isd_tpf, query_len_of

    cost, a = StepCostModel(1e-3, 0.0, 3e-6), [0.8] * 7
    for batch, want_branches in ((1, True), (64, False)):
        rows = [a] * batch
        got = choose_layout([choose_stride(rows, cost, branches=br) for br in (False, True)])
        assert got.branches == want_branches and got.stride >= 2, (batch, got)
        by_hand = {(n, br): batch * isd_tpf(a[: n - 1], br) / cost.cost(batch, query_len_of(n, br))
                   for n in range(1, 9) for br in (False, True)}
        best = max(by_hand, key=by_hand.get)
        assert (got.stride, got.branches) == (best[0], best[1] and best[0] > 1)
    assert got.stride == 2  # batch 64: plain N = 2 (1.26x AR's rate here, branch N = 2 0.96x of it)


def test_auto_engine_with_branches_chooses_the_layout_by_batch(tiny):
    """The engine's `_choose_stride` with branches weighs both layouts (`choose_layout`): the branch layout for
    one request, the plain one for 64 at the same acceptance and step-cost model; each layout's rates come
    from its own measured step times (none yet here: the model alone)."""
    import numpy as np
    from test_engine import _small_engine

    m, tok = tiny
    eng = _small_engine(m, tok, "isd", "auto", step_cost=(1e-3, 0.0, 3e-6), num_pages=400, branches=True,
                        max_num_seqs=64)
    assert set(eng._trackers) == {False, True}
    eng._acceptance = lambda decodes: np.full((len(decodes), 7), 0.8)
    one, many = eng._choose_stride([None]), eng._choose_stride([None] * 64)
    assert one.branches and one.stride >= 4
    assert not many.branches and many.stride == 2
    plain_only = _small_engine(m, tok, "isd", "auto", step_cost=(1e-3, 0.0, 3e-6), num_pages=400, max_num_seqs=64)
    assert set(plain_only._trackers) == {False}
    plain_only._acceptance = eng._acceptance
    assert not plain_only._choose_stride([None]).branches


@pytest.mark.parametrize("cost", [(1e-3, 0.0, 1e-7), (1e-3, 0.0, 2e-5)])
def test_auto_stride_with_branches_equals_greedy_ar(tiny, cost):
    """`stride="auto"` with branches: the policy's strides (per row, N² blocks) keep greedy AR's tokens."""
    from test_engine import _engine_staggered, _small_engine, _workload

    m, tok = tiny
    prompts, params = _workload(tok, n=16, seed=13)
    want = _small_engine(m, tok, "ar", 4).run(prompts, params)
    eng = _small_engine(m, tok, "isd", "auto", step_cost=cost, auto_interval=2, num_pages=400, branches=True)
    for _, times in eng._trackers.values():  # the cost model alone decides (both layouts)
        times.seconds = lambda bucket: {}
    got = _engine_staggered(eng, prompts, params, per_step=4)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert eng.max_query_len == 64  # N = 8 with branches
    if cost[2] < 1e-6:
        assert max(eng.stride_mix) >= 4
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages


@pytest.mark.parametrize("truncate,draft_temp", [(False, None), (True, 0.5)])
def test_sampled_branch_step_equals_the_plain_step_on_the_picked_rows(truncate, draft_temp):
    """The sampled step with branches (N² rows; it filters the clean rows, verifies, then only the drafts' rows
    it picks) gives the bits of the plain step (2N − 1 rows, one filter call) whose MASK rows are the picked
    ones — the plain layout after a cold start or an all-accepted round, branch j's rows after a rejection at j."""
    from idlm.decoding.isd import draft_index, sampled_isd_step

    step = getattr(sampled_isd_step, "__wrapped__", sampled_isd_step)
    g = torch.Generator().manual_seed(5)
    B, n, V = 12, 4, 40
    k = n - 1
    logits = torch.randn(B, n * n, V, generator=g) * 2
    is_v = torch.arange(B) % 4 != 0  # some cold rows
    q_old = torch.softmax(torch.randn(B, k, V, generator=g), -1)
    specs = torch.multinomial(q_old.reshape(-1, V), 1, generator=g).view(B, k)
    specs[::3] = logits[::3, :k].argmax(-1)  # some rows accept drafts
    temp = torch.full((B,), 0.8)
    top_k = torch.full((B,), 8 if truncate else 0)
    top_p = torch.full((B,), 0.9 if truncate else 1.0)
    flags = torch.zeros(B, dtype=torch.bool)
    keys, draw = torch.randint(0, 2**31, (B, 2), generator=g), torch.arange(B) * 7
    dt = None if draft_temp is None else torch.full((B,), draft_temp)
    args = (is_v, specs, temp, top_k, top_p, flags, flags, torch.ones(B), keys, draw, q_old, truncate, None, dt)
    packed, q = step(logits, *args, True)
    n_acc = packed[:, 0].long()
    idx = draft_index(torch.where(is_v, n, 1), is_v, n_acc, k, n, n * n, True, False)
    plain = logits[:, : 2 * n - 1].clone()
    first = torch.where(is_v, n, 1)
    for b in range(B):  # the plain block whose MASK rows (C: 1..K, V: N..2N−2) are the rows the branch step picked
        plain[b, first[b]: first[b] + k] = logits[b, idx[b]]
    want_packed, want_q = step(plain, *args, False)
    assert (n_acc < k).any() and (is_v & (n_acc < k)).any()  # rejections happened: branch rows were picked
    assert torch.equal(packed, want_packed) and torch.equal(q, want_q)
