"""`stride="auto"`: the engine's adaptive stride (idlm/decoding/stride_policy.py) stays exact, reads only
committed history, reports its N mix, and calibrates its step-cost model on the engine's own runner."""

from __future__ import annotations

import pytest
from test_engine import _engine_staggered, _small_engine, _workload

from idlm.decoding.base import DecodeStats
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stride_policy import (
    StepCostModel,
    acceptance_estimate,
    choose_stride,
    default_prior,
    sampling_class,
)
from idlm.engine.calibrate import calibration_points
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError

WEIGHT_BOUND = (1e-3, 0.0, 1e-7)  # extra query tokens nearly free: long strides pay
TOKEN_BOUND = (1e-4, 0.0, 1e-3)  # every query token costs: plain AR steps


@pytest.mark.parametrize("cost", [WEIGHT_BOUND, TOKEN_BOUND, (1e-3, 0.0, 2e-5)])
def test_auto_stride_greedy_equals_ar(tiny, cost):
    model, tok = tiny
    prompts, params = _workload(tok, n=24, seed=11)
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    eng = _small_engine(model, tok, "isd", "auto", step_cost=cost, auto_interval=2, num_pages=200)
    eng._times.seconds = lambda bucket: {}  # the cost model alone decides (measured step times: below)
    got = _engine_staggered(eng, prompts, params, per_step=4)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(eng.stride_mix.values()) == eng.counters["decode_forwards"]
    if cost == TOKEN_BOUND:
        assert set(eng.stride_mix) == {1}
    if cost == WEIGHT_BOUND:
        assert max(eng.stride_mix) >= 4


def test_auto_stride_risd_greedy_equals_ar(tiny_ar):
    base, tok, lora = tiny_ar
    prompts, params = _workload(tok, n=16, seed=12)
    want = _small_engine(base, tok, "ar", 4).run(prompts, params)
    eng = _small_engine(base, tok, "risd", "auto", lora=lora, step_cost=(1e-3, 0.0, 2e-5), auto_interval=1,
                        num_pages=200)
    assert [o.token_ids for o in _engine_staggered(eng, prompts, params, per_step=4)] == [o.token_ids for o in want]


def test_an_auto_engine_bounded_to_plain_steps_serves_as_ar(tiny):
    """auto_max_stride=1: every decode step a plain AR step, each request's first token drawn by an ISD
    decoder's start (a plain step cannot start a request: this failed every request before) — greedy AR's
    tokens, and no step of another stride."""
    model, tok = tiny
    prompts, params = _workload(tok, n=12, seed=13)
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    eng = _small_engine(model, tok, "isd", "auto", auto_max_stride=1, num_pages=200)
    got = _engine_staggered(eng, prompts, params, per_step=4)
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert set(eng.stride_mix) == {1} and eng.counters["failed"] == 0


def test_auto_stride_seeded_sampling_is_batch_invariant(tiny):
    """Token for token the same seeded requests alone and in a batch, when every step is an AR step."""
    model, tok = tiny
    prompts, _ = _workload(tok, n=8, seed=13)
    sampled = [SamplingParams(temperature=0.9, seed=200 + i, max_tokens=10) for i in range(8)]

    def run(ps, ss):
        eng = _small_engine(model, tok, "isd", "auto", step_cost=TOKEN_BOUND)
        # the cost model alone decides (it rates plain AR steps best): a measured step time could make the policy
        # probe an ISD stride, whose steps draw other random numbers (a CI run under load once did)
        eng._times.seconds = lambda bucket: {}
        outs = eng.run(ps, ss)
        assert set(eng.stride_mix) == {1}
        return outs

    batch = run(prompts, sampled)
    alone = [run([p], [s])[0] for p, s in zip(prompts[:3], sampled[:3])]
    assert [o.token_ids for o in alone] == [o.token_ids for o in batch[:3]]


def test_the_choice_is_a_function_of_committed_statistics(tiny):
    """Every choice equals choose_stride recomputed from the rows' DecodeStats as they were before the
    step (committed history) and the measured cost of earlier steps, whatever the step then draws."""
    model, tok = tiny
    prompts, params = _workload(tok, n=16, seed=14)
    eng = _small_engine(model, tok, "isd", "auto", step_cost=(1e-3, 0.0, 2e-5), auto_interval=1, num_pages=200)
    seen = []
    original = eng._choose_stride

    def spy(decodes):
        snapshot = [(list(s.output.stats.accepted_per_position), list(s.output.stats.verified_per_position))
                    for s in decodes]
        pooled = eng.decode_stats
        for s in decodes:
            pooled = pooled.merge(s.output.stats)
        current = eng._auto.stride if eng._auto is not None else None
        scales = eng._cost.scales(eng.config.strides, len(decodes))  # measured step times of earlier steps
        measured = eng._times.seconds(eng.runner.bucket(len(decodes)))  # and step times at this bucket
        choice = original(decodes)
        seen.append((snapshot, (list(pooled.accepted_per_position), list(pooled.verified_per_position)),
                     current, scales, measured, choice.stride))
        return choice

    eng._choose_stride = spy
    _engine_staggered(eng, prompts, params, per_step=4)
    assert len(seen) > 5
    cost = StepCostModel(*eng.config.step_cost)
    assert any(m for *_, m, _ in seen)  # measured step times took part
    for rows, (acc, ver), current, scales, measured, stride in seen:
        prior = default_prior(acc, ver, 7)
        estimates = [acceptance_estimate(a, v, prior) for a, v in rows]
        assert choose_stride(estimates, cost, list(range(1, 9)), current=current, cost_scale=scales,
                             measured=measured, per_row=True).stride == stride


def test_auto_stride_options_are_checked(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="auto"):
        EngineConfig(decoder="ar", stride="auto")
    with pytest.raises(ConfigError, match="stride_schedule"):
        EngineConfig(decoder="isd", stride="auto", stride_schedule=[(8, 4)])
    with pytest.raises(ConfigError, match="auto_max_stride"):
        EngineConfig(decoder="isd", stride="auto", auto_max_stride=9)
    with pytest.raises(ConfigError, match="step_cost"):
        EngineConfig(decoder="isd", stride="auto", step_cost=(1.0, -1.0, 0.0))
    with pytest.raises(ConfigError, match="auto_refresh"):
        EngineConfig(decoder="isd", stride="auto", auto_refresh=-1)
    with pytest.raises(ConfigError, match="stride"):
        EngineConfig(decoder="isd", stride="fast")
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ConfigError, match="auto_ar_margin"):
            EngineConfig(decoder="isd", stride="auto", auto_ar_margin=bad)


def test_the_choice_is_made_while_the_device_runs_the_step_before(tiny):
    """With a steady batch, every choice after the first is made inside the previous decode step, between
    its launch and the host sync (`_prechoose`), and the next step takes it; greedy output stays AR's."""
    model, tok = tiny
    prompts, _ = _workload(tok, n=4, seed=15)
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)] * 4
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    eng = _small_engine(model, tok, "isd", "auto", step_cost=WEIGHT_BOUND, auto_interval=2, num_pages=200)
    where, inside = [], [False]
    choose, prechoose = eng._choose_stride, eng._prechoose

    def spy_choose(decodes):
        where.append(inside[0])
        return choose(decodes)

    def spy_prechoose(decodes):
        inside[0] = True
        try:
            prechoose(decodes)
        finally:
            inside[0] = False

    eng._choose_stride, eng._prechoose = spy_choose, spy_prechoose
    assert [o.token_ids for o in eng.run(prompts, params)] == [o.token_ids for o in want]
    steps = eng.counters["decode_forwards"]
    assert where.count(True) >= steps // 2 - 4  # nearly every choice (one per two steps) made inside a step
    assert where.count(False) <= 4  # the first, and where the batch left its bucket as requests finished


def test_a_failing_choice_inside_the_step_does_not_fail_the_step(tiny):
    """An error of the choice made inside a decode step (`_prechoose`) is not that step's: its requests go
    on, and the next step chooses afresh, where the error is raised to the caller as before."""
    model, tok = tiny
    prompts, _ = _workload(tok, n=2, seed=16)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 2
    eng = _small_engine(model, tok, "isd", "auto", step_cost=WEIGHT_BOUND, auto_interval=2, num_pages=200)
    choose, calls = eng._choose_stride, []

    def flaky(decodes):
        calls.append(len(calls))
        if len(calls) == 2:  # the first choice made inside a step
            raise ValueError("policy bug")
        return choose(decodes)

    eng._choose_stride = flaky
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = {}

    def step():
        for out in eng.step():
            outputs[out.request_id] = out.output

    for _ in range(3):  # prefill, the first choice (in schedule), the step whose in-step choice raises
        step()
    assert len(calls) == 2 and eng.counters["failed"] == 0 and eng.num_running == 2
    assert eng._prechosen is None  # the next choice is made afresh
    while eng.has_unfinished():
        step()
    assert len(calls) > 2 and eng.counters["failed"] == 0
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    assert [outputs[i].token_ids for i in ids] == [o.token_ids for o in want]


def test_calibration_measures_on_the_engine_runner(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    model, tok = tiny
    cfg = EngineConfig(decoder="isd", stride="auto", auto_max_stride=4, max_num_seqs=8, page_size=8, num_pages=200)
    eng = LLMEngine(model, tok, cfg)
    assert eng._cost.model.base + eng._cost.model.per_row + eng._cost.model.per_token > 0
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages  # calibration freed its pages
    cached = list((tmp_path / "step_cost").glob("*.json"))
    assert len(cached) == 1
    again = LLMEngine(model, tok, cfg)  # from the cache: the same model
    assert again._cost.model == eng._cost.model
    assert calibration_points(256, 8, 1000) == [(b, q) for b in (1, 64, 256) for q in (1, 7, 15)]
    assert calibration_points(4, 2, 2) == [(1, 1), (1, 3), (2, 1), (2, 3)]  # batch 2: the per-row term
    assert calibration_points(1, 4, 100) == [(1, 1), (1, 7)]


def test_an_auto_engine_of_one_sequence_starts(tiny, tmp_path, monkeypatch):
    """max_num_seqs 1 calibrates batch 1 at two query lengths only; the cost model still fits (it failed to
    start: "needs at least 3 samples")."""
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    model, tok = tiny
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride="auto", auto_max_stride=4, max_num_seqs=1,
                                             page_size=8, num_pages=100))
    assert eng._cost.model.per_row == 0 and eng._cost.model.base + eng._cost.model.per_token > 0
    out = eng.run([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_an_auto_engine_on_a_small_pool_calibrates_within_it(tiny, tmp_path, monkeypatch):
    """A KV pool too small for one calibration row of CONTEXT tokens plus the longest query (16 pages of 4
    tokens against 128 + 64 with branches at N = 8) times a shorter context and serves; a pool that cannot
    hold one decode block is refused by name. Both failed with the page manager's internal error ("outside
    its reserved slots") before."""
    from idlm.engine.calibrate import CONTEXT, calibration_context

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    model, tok = tiny
    assert calibration_context(100, 16, 64) == CONTEXT
    assert calibration_context(20, 4, 64) == 16  # what the pool leaves beside the query
    with pytest.raises(ConfigError, match="cannot hold one decode block of 64"):
        calibration_context(16, 4, 64)
    cfg = dict(decoder="isd", stride="auto", page_size=4, branches=True, max_num_seqs=4)
    eng = LLMEngine(model, tok, EngineConfig(num_pages=40, **cfg))
    assert eng.block_manager.num_free_pages == 40
    out = eng.run([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5
    with pytest.raises(ConfigError, match="KV pool .* cannot hold one decode block"):
        LLMEngine(model, tok, EngineConfig(num_pages=16, **cfg))


def test_a_close_stride_never_run_is_probed_once(tiny):
    """The policy's choice is N = 4 every time; N = 1 (a plain AR step, rated 0.8 of it) has never run, so
    the second interval runs N = 1 to measure it — once per batch bucket (a step's cost is its bucket's),
    never twice in a row at one bucket; N = 8 (rated 0.5) is never probed. Greedy output stays AR's
    whatever the strides."""
    from idlm.decoding.stride_policy import StrideChoice

    model, tok = tiny
    prompts, params = _workload(tok, n=6, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True) for p in params]
    eng = _small_engine(model, tok, "isd", "auto", step_cost=WEIGHT_BOUND, auto_interval=2)
    eng._choose_stride = lambda decodes: StrideChoice(4, 1.0, {1: 0.8, 4: 1.0, 8: 0.5})
    chosen = []
    step_decoder = eng._step_decoder
    buckets = []

    def spy(decodes):
        chosen.append(step_decoder(decodes).stride)
        buckets.append(eng.runner.bucket(len(decodes)))
        return eng._decoder(chosen[-1])

    eng._step_decoder = spy
    got = eng.run(prompts, params)
    assert chosen[:2] == [4, 4] and chosen[2:4] == [1, 1] and set(chosen) == {1, 4}
    probes = [(i, buckets[i]) for i in range(len(chosen)) if chosen[i] == 1 and (i == 0 or chosen[i - 1] != 1)]
    assert len({b for _, b in probes}) == len(probes)  # one probe per bucket
    assert 8 not in eng.stride_mix
    ar = _small_engine(model, tok, "ar", 1).run(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ar]


def test_a_probe_runs_only_the_steps_that_measure_it(tiny):
    """With an interval of 8 steps, a probe of the never-run plain AR step lasts `StepTimer.min_samples` (3)
    steps, then the policy chooses again (N = 4 for a full interval)."""
    from idlm.decoding.stride_policy import StrideChoice

    model, tok = tiny
    prompts, _ = _workload(tok, n=1, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)]
    eng = _small_engine(model, tok, "isd", "auto", step_cost=WEIGHT_BOUND, auto_interval=8)
    assert eng._times.min_samples == 3
    eng._choose_stride = lambda decodes: StrideChoice(4, 1.0, {1: 0.8, 4: 1.0})
    chosen = []
    step_decoder = eng._step_decoder

    def spy(decodes):
        chosen.append(step_decoder(decodes).stride)
        return eng._decoder(chosen[-1])

    eng._step_decoder = spy
    eng.run(prompts, params)
    assert len(chosen) >= 19
    assert chosen[:19] == [4] * 8 + [1] * 3 + [4] * 8


def test_warmup_runs_every_stride_and_leaves_no_trace(tiny):
    """`LLMEngine.warmup` runs each stride of an auto engine (greedy and sampled) and leaves the engine as
    it found it: no requests, statistics, counters, stride mix or learned step times; what it serves
    afterwards is what a fresh engine serves (greedy: AR's tokens)."""
    model, tok = tiny
    prompts, params = _workload(tok, n=6, seed=21)
    eng = _small_engine(model, tok, "isd", "auto", step_cost=(1e-3, 0.0, 2e-5), auto_interval=2, num_pages=200)
    before = (dict(eng.counters), eng.decode_stats.to_dict(), dict(eng.stride_mix))
    k_rows, batches = [], set()  # whether each warm-up step took the per-row inputs (an auto engine's only
    # variant); (stride, rows) of each step

    def spying(n, step_inputs):
        def spy(states, *args, **kwargs):
            tensors, static = step_inputs(states, *args, **kwargs)
            k_rows.append("k_row" in tensors)
            batches.add((n, len(states)))
            return tensors, static
        return spy

    for n in range(2, 9):
        eng._decoder(n).step_inputs = spying(n, eng._decoder(n).step_inputs)
    seconds = eng.warmup()
    assert k_rows and all(k_rows)
    assert (8, 2) in batches and (4, 2) not in batches  # two rows at the longest stride only (and at N = 1)
    assert sorted(seconds) == list(range(1, 9)) and all(s > 0 for s in seconds.values())
    assert (dict(eng.counters), eng.decode_stats.to_dict(), dict(eng.stride_mix)) == before
    assert eng.row_stride_mix == {} and eng._auto_rows == {}
    assert not eng.has_unfinished() and not eng.seqs
    assert eng._cost.scale == {} and eng._times.seconds(1) == {} and eng._auto is None
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages  # (cached pages count as free)
    eng.block_manager.check_invariants()
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    got = eng.run(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    eng.add_request(prompts[0], params[0])
    with pytest.raises(ConfigError, match="idle"):
        eng.warmup()


def test_warmup_all_batches_runs_every_stride_at_every_bucket(tiny):
    """`warmup(all_batches=True)` (an auto engine's default where CUDA graphs are captured) runs every
    stride at every batch bucket up to max_num_seqs, greedy and sampled (a sampled ISD step always carries the
    kept q̃ input, a C row's unread: one variant whatever the rows' modes): each step variant a graph is
    captured for, so none is captured while requests run. Here (CPU, no graphs) the runner's decode calls are
    recorded; the engine is left as it was found."""
    model, tok = tiny
    eng = _small_engine(model, tok, "isd", "auto", step_cost=(1e-3, 0.0, 2e-5), auto_max_stride=3, max_num_seqs=8,
                        num_pages=400)
    before = (dict(eng.counters), eng.decode_stats.to_dict(), dict(eng.stride_mix))
    seen = set()
    decode = eng.runner.decode

    def spy(batch, decoder, tensors, static):
        greedy = static.get("greedy", False) or "keys" not in tensors
        seen.add((decoder.stride, eng.runner.bucket(len(batch.tokens)), greedy, "q_old" in tensors))
        return decode(batch, decoder, tensors, static)

    eng.runner.decode = spy
    seconds = eng.warmup(all_batches=True)
    assert sorted(seconds) == [1, 2, 3]
    for n in (1, 2, 3):
        for bucket in (2, 4, 8):
            assert (n, bucket, True, False) in seen, (n, bucket)
            assert (n, bucket, False, n > 1) in seen, (n, bucket)  # (sampled drafts: their q̃ in every step)
            assert (n, bucket, False, n == 1) not in seen, (n, bucket)
    assert (dict(eng.counters), eng.decode_stats.to_dict(), dict(eng.stride_mix)) == before
    assert not eng.has_unfinished() and eng._times.seconds(2) == {} and eng._cost.scale == {}
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages
    eng.block_manager.check_invariants()


def test_warmup_of_a_fixed_stride_runs_that_stride_only(tiny):
    model, tok = tiny
    eng = _small_engine(model, tok, "isd", 3)
    assert list(eng.warmup()) == [3]
    assert eng.stride_mix == {} and eng.counters["decode_forwards"] == 0


def _per_row_engine(model, tok, decoder, row_n, lora=None, step=4, **kw):
    """An auto engine whose every choice is a step of stride `step` with each request's own stride
    row_n[request index] (request ids are "0", "1", ... in submission order)."""
    from idlm.decoding.stride_policy import StrideChoice

    eng = _small_engine(model, tok, decoder, "auto", lora=lora, step_cost=WEIGHT_BOUND, auto_interval=1,
                        num_pages=200, **kw)
    eng._choose_stride = lambda decodes: StrideChoice(step, 1.0, {step: 1.0},
                                                      [row_n[int(s.request_id)] for s in decodes])
    return eng


@pytest.mark.parametrize("decoder", ["isd", "risd"])
def test_rows_of_different_strides_in_one_step_keep_greedy_ar(tiny, tiny_ar, decoder):
    """Steps of stride 4 whose rows run N = 1, 2, 3 or 4 (blocks padded to 7 slots): greedy output is
    AR's, request by request, for ISD and R-ISD; the row mix is reported."""
    model, tok = tiny
    lora = None
    if decoder == "risd":
        model, tok, lora = tiny_ar
    prompts, params = _workload(tok, n=12, seed=31)
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens + 8) for p in params]
    row_n = [1, 2, 3, 4] * 3
    eng = _per_row_engine(model, tok, decoder, row_n, lora=lora)
    got = _engine_staggered(eng, prompts, params, per_step=4)
    want = _small_engine(model, tok, "ar", 4).run(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert set(eng.row_stride_mix) == {1, 2, 3, 4} and set(eng.stride_mix) == {4}
    assert sum(eng.row_stride_mix.values()) == sum(o.stats.forwards for o in got)  # each decode row once


def test_a_seeded_row_samples_as_at_its_own_fixed_stride(tiny):
    """A seeded T = 1 request that runs N = 2 or 3 inside steps of stride 4 (padded blocks, other rows of
    other strides beside it) draws exactly the tokens it draws alone at that fixed stride: its uniforms
    and distributions are its own (so the padded path inherits the fixed path's exactness)."""
    model, tok = tiny
    prompts, _ = _workload(tok, n=8, seed=32)
    sampled = [SamplingParams(temperature=1.0, top_p=0.95, seed=500 + i, max_tokens=16, ignore_eos=True)
               for i in range(8)]
    row_n = [2, 3, 4, 1, 3, 2, 1, 4]
    eng = _per_row_engine(model, tok, "isd", row_n)
    mixed = eng.run(prompts, sampled)
    assert set(eng.row_stride_mix) == {1, 2, 3, 4}
    packed = _per_row_engine(model, tok, "isd", row_n)
    packed.runner.packed_inputs = True  # the CUDA graph's input layout (k_row among the packed columns)
    assert [o.token_ids for o in packed.run(prompts, sampled)] == [o.token_ids for o in mixed]
    for i, n in enumerate(row_n):
        if n == 1:
            continue  # no fixed ISD stride of 1 (those rows are plain AR steps)
        alone = _small_engine(model, tok, "isd", n).run([prompts[i]], [sampled[i]])[0]
        assert alone.token_ids == mixed[i].token_ids, (i, n)


def test_row_strides_pick_each_rows_best_n():
    from idlm.decoding.stride_policy import row_strides

    accepts = [[0.9, 0.0] + [0.0] * 5, [0.95] * 7, [0.0] * 7]
    n, tpf = row_strides(accepts, range(1, 9), 8)
    assert list(n) == [2, 8, 1]  # far drafts never accepted: N = 2; all good: 8; none: a plain AR step
    assert list(row_strides(accepts, range(1, 9), 4)[0]) == [2, 4, 1]  # capped by the step's stride
    c = choose_stride(accepts, StepCostModel(1e-3, 0.0, 1e-7), per_row=True)
    assert c.stride == 8 and c.rows == [2, 8, 1]
    assert c.rates[8] == pytest.approx(float(tpf.sum()) / StepCostModel(1e-3, 0.0, 1e-7).cost(3, 15))


def test_a_step_is_never_longer_than_its_longest_row():
    """Every row commits most with N = 4 (later drafts are never accepted): longer strides would only pad
    the blocks, so the step is N = 4 — even when N = 8 is the current stride, and even when the cost model
    rates every stride's step alike (seen on the H200: N = 8 steps whose rows all ran 4)."""
    accepts = [[0.9, 0.9, 0.9] + [0.0] * 4] * 3
    flat = StepCostModel(1e-3, 0.0, 0.0)  # a longer query costs nothing more
    for current in (None, 8, 6):
        c = choose_stride(accepts, flat, per_row=True, current=current)
        assert c.stride == 4 and c.rows == [4, 4, 4], current
        assert c.rates[8] == c.rates[4]  # N = 8 runs as an N = 4 step
    # the step time measured at N = 4 is what every longer N is rated with
    c = choose_stride(accepts, flat, per_row=True, measured={4: 1.1e-3, 8: 1e-3})
    assert c.stride == 4 and c.rates[8] == pytest.approx(c.rates[4])


def test_acceptance_prior_is_pooled_per_sampling_class(tiny):
    """A request with no history starts from what requests sampled like it showed, not from every request:
    greedy requests that finished with 95% acceptance set the prior of a new greedy request, not of a new
    T = 1 one (which starts from the 0.5 fallback, its class having no counts yet). On the H200 a T = 1 cell
    run after greedy ones kept N = 4 (0.91x AR) on the greedy prior. Finished requests reach the pool
    through `_retire_stats`, and a request's own counts still outweigh its prior as they grow."""
    model, tok = tiny
    eng = _small_engine(model, tok, "isd", "auto", step_cost=(1e-3, 0.0, 2e-5), auto_max_stride=4)
    greedy, hot = SamplingParams(temperature=0.0, max_tokens=8), SamplingParams(temperature=1.0, max_tokens=8)
    assert sampling_class(greedy) != sampling_class(hot)
    assert sampling_class(SamplingParams(temperature=0.98)) == sampling_class(hot)  # (rounded: bounded keys)
    done = DecodeStats(verified_per_position=[100, 95, 90], accepted_per_position=[95, 90, 85])
    eng._class_stats[sampling_class(greedy)] = done
    ids = [eng.add_request([5, 6, 7, 8], greedy), eng.add_request([9, 10, 11], hot)]
    seqs = [eng.seqs[i] for i in ids]
    rows = eng._acceptance(seqs)
    assert rows.shape == (2, 3)
    assert rows[0] == pytest.approx([0.95, 90 / 95, 85 / 90])  # greedy: the greedy pool
    assert rows[1] == pytest.approx([0.5] * 3)  # T = 1: nothing of its class yet
    seqs[1].output.stats.record_verify(3, 0)  # its own history: one verify, first draft rejected
    rows = eng._acceptance(seqs)
    assert rows[1][0] == pytest.approx((0 + 8 * 0.0) / (1 + 8))  # its class's pool is now its own counts
    eng.abort_request(ids[1])  # retired: its counts join its class's pool only
    assert eng._class_stats[sampling_class(hot)].verified_per_position == [1, 0, 0]
    assert eng._class_stats[sampling_class(greedy)].verified_per_position == [100, 95, 90]


def test_traced_choices_records_why_and_restores_the_engine(tiny, tmp_path, monkeypatch):
    """`idlm.bench.offline.traced_choices` records each choice (batch, stride, its rate, every stride's rate,
    the measured step times) and leaves the engine's own method in place afterwards."""
    from idlm.bench.offline import sample_trace, traced_choices

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    model, tok = tiny
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride="auto", auto_max_stride=4, max_num_seqs=2,
                                             page_size=8, num_pages=200, auto_interval=2))
    with traced_choices(eng) as trace:
        eng.run([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert trace and all(len(t) == 6 for t in trace)
    batch, stride, rate, rates, measured, branches = trace[0]
    assert batch in (1, 2) and rates[stride] == rate  # (not always the highest rate: AR wins ties by a margin)
    assert isinstance(measured, dict) and branches is False  # (an engine without rejection branches)
    assert "_choose_stride" not in vars(eng)  # the class's method again
    assert sample_trace(list(range(100)), 24) == list(range(0, 100, 5))


def test_sampling_class_keeps_the_draft_temperature_apart():
    """Drafts drawn at another temperature are accepted at another rate: their own prior; None is the
    request's temperature, and greedy requests ignore it (their drafts are argmaxes)."""
    hot = SamplingParams(temperature=0.7)
    assert sampling_class(SamplingParams(temperature=0.7, draft_temperature=0.3)) != sampling_class(hot)
    assert sampling_class(SamplingParams(temperature=0.7, draft_temperature=0.7)) == sampling_class(hot)
    assert sampling_class(SamplingParams(temperature=0, draft_temperature=0.3)) == sampling_class(
        SamplingParams(temperature=0))
