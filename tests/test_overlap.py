"""Overlapped decode steps (`EngineConfig.overlap`): the engine launches step n + 1 — its block formed on the
device from step n's packed output (`Decoder.next_inputs`, `ModelRunner.decode_next`) — before it reads
step n's results. These tests run the graph path on CPU (`ModelRunner.use_graphs` with `_EagerGraph`: each
"replay" recomputes into the same output tensors) and hold the overlap to independent oracles: the
reference decoder's tokens, the synchronous engine's, and the host's own block / slot mapping for every
step the device formed. Pages must never leak, whatever finishes, aborts or arrives mid-flight.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny import tiny_transformer

from idlm.decoding import make_decoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stride_policy import StrideChoice
from idlm.engine import llm_engine
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError
from idlm.layers.lora import LoRAAdapter, LoRAConfig

VOCAB, MASK, PAGES = 64, 3, 96
# (decoder, stride, branches: False, True, or 1 + G for branches with G guessed corrections per draft, or
# (1 + G, W) with guessed groups of W rows)
CASES = [("ar", 1, False), ("isd", 3, False), ("risd", 3, False), ("isd", 3, True), ("risd", 4, True), ("isd", 3, 3),
         ("risd", 4, 2), ("isd", 4, (2, 1))]


def _layout(branches) -> dict:
    """A CASES entry's `branches` as the options of `make_decoder` / `EngineConfig`."""
    groups, rows = branches if isinstance(branches, tuple) else (branches, None)
    return dict(branches=bool(groups), guesses=max(0, int(groups) - 1), guess_rows=rows)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_transformer(VOCAB, head_dim=16, mask_token_id=MASK)
    lora = LoRAAdapter(m.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    return m, lora


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 40, (n,), generator=g)]


def _engine(model, decoder, stride, branches, overlap=True, **kw) -> LLMEngine:
    m, lora = model
    cfg = dict(decoder=decoder, stride=stride, num_pages=PAGES, page_size=4, overlap=overlap, **_layout(branches))
    cfg.update(kw)
    eng = LLMEngine(m, None, EngineConfig(**cfg), lora=lora if decoder == "risd" else None)
    eng.runner.use_graphs = True  # the graph path on CPU (`_EagerGraph`)
    return eng


def _check_pool(eng: LLMEngine) -> None:
    eng.block_manager.check_invariants()
    assert not eng.has_unfinished() and eng.block_manager.num_free_pages == PAGES


@pytest.mark.parametrize("decoder,stride,branches", CASES)
def test_overlapped_greedy_equals_the_reference_and_the_synchronous_engine(model, decoder, stride, branches):
    m, lora = model
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=5 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    ref = generate(m, make_decoder(decoder, stride, m.config, **_layout(branches)), prompts, params,
                   lora=lora if decoder == "risd" else None)
    outs = {}
    for overlap in (False, True):
        eng = _engine(model, decoder, stride, branches, overlap)
        outs[overlap] = [o.token_ids for o in eng.run(prompts, params)]
        _check_pool(eng)
        if overlap:  # requests finish at different steps: chains break and restart, and most steps chain
            assert eng.counters["overlapped_steps"] > eng.counters["decode_forwards"] // 2
        else:
            assert eng.counters["overlapped_steps"] == 0
    assert outs[True] == outs[False] == [o.token_ids for o in ref]


def _check_device_blocks(monkeypatch) -> list[int]:
    """After every chained launch (once the step before it is applied): the chained step's inputs as the
    device formed them (tokens, starts, positions, KV slots, MASK and gate rows, the decoder's is_v and drafts,
    sampled rows' draw numbers) must equal what the host builds from the states (`Decoder.blocks`,
    `PageManager.decode_mapping`, `Decoder.step_inputs`). -> per checked step (live rows, a row of its own
    shorter stride among them)."""
    checked = []
    complete = llm_engine.LLMEngine._complete

    def check(self, inf, updates, release):
        complete(self, inf, updates, release)
        if release:  # (a drain: nothing launched after it)
            return
        rows, dec = inf.rows, inf.decoder
        live = [i for i, s in enumerate(rows.seqs) if self._live(s)]
        g, B, _ = self.runner._last
        blocks = dec.blocks(rows.states)
        starts, slots, _ = self.block_manager.decode_mapping([rows.request_ids[i] for i in live], dec.query_len)
        tensors, _ = dec.step_inputs(rows.states, rows.params, copy.deepcopy(rows.rngs), VOCAB, "cpu")
        offsets = np.arange(dec.query_len) if blocks.offsets is None else blocks.offsets[live]
        got = {k: v[:B][live].numpy() for k, v in g.raw.items()}
        assert (got["tokens"] == blocks.tokens[live]).all()
        assert (got["starts"] == starts).all() and (got["slots"] == slots).all()
        assert (got["positions"] == starts[:, None] + offsets).all()
        if dec.uses_lora:
            assert (got["is_mask"] == blocks.is_mask[live]).all() and (got["gate"] == blocks.gate[live]).all()
        if "dec.is_v" in got:
            is_v = tensors["is_v"].numpy()[live]
            assert (got["dec.is_v"].astype(bool) == is_v).all()
            assert (got["dec.specs"][is_v] == tensors["specs"].numpy()[live][is_v]).all()  # (C rows: never read)
        if "dec.k_row" in got:
            assert (got["dec.k_row"] == tensors["k_row"].numpy()[live]).all()
        if "dec.guesses" in got:  # guessed corrections (V rows: what their guess rows hold)
            is_v = tensors["is_v"].numpy()[live]
            assert (got["dec.guesses"][is_v] == tensors["guesses"].numpy()[live][is_v]).all()
        if "dec.draw" in got:  # (the host's counters are past the launched step's draw: `take_draws`)
            assert (got["dec.draw"] == tensors["draw"].numpy()[live] - 1).all()
        # (the live rows, and whether some ran a shorter stride of its own than the step's)
        checked.append((len(live), bool("dec.k_row" in got and (got["dec.k_row"] < dec.stride - 1).any())))

    monkeypatch.setattr(llm_engine.LLMEngine, "_complete", check)
    return checked


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("decoder,stride,branches", CASES)
def test_device_formed_blocks_equal_the_host_blocks(model, decoder, stride, branches, temperature, monkeypatch):
    checked = _check_device_blocks(monkeypatch)
    eng = _engine(model, decoder, stride, branches)
    prompts = _prompts(5, seed=1)
    eng.run(prompts, [SamplingParams(temperature=temperature, seed=i, max_tokens=6 + 5 * i, ignore_eos=True)
                      for i in range(5)])
    _check_pool(eng)
    assert len(checked) >= 10 and max(n for n, _ in checked) == 5


@pytest.mark.parametrize("decoder", ["isd", "risd"])
def test_adaptive_stride_steps_overlap_between_its_choices(model, decoder, monkeypatch):
    """`stride="auto"`: the steps between two choices chain (same N, each row its own N: `dec.k_row`), the
    choosing step runs synchronously; greedy tokens are plain AR's, the device-formed blocks the host's."""
    m, lora = model
    checked = _check_device_blocks(monkeypatch)
    prompts = _prompts(6, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=20 + 5 * i, ignore_eos=True) for i in range(6)]
    ref = generate(m, make_decoder("ar", 1, m.config), prompts, params)
    eng = _engine(model, decoder, "auto", False, step_cost=(1e-3, 1e-4, 1e-5), auto_interval=3, auto_max_stride=4)
    # every choice: a step of N = 4 whose rows run their own N = 1..4 (as `_choose_stride` gives them)
    eng._choose_stride = lambda decodes: StrideChoice(4, 1.0, {4: 1.0}, [1 + int(s.request_id) % 4 for s in decodes])
    assert [o.token_ids for o in eng.run(prompts, params)] == [o.token_ids for o in ref]
    _check_pool(eng)
    # (the same choice every interval: the choosing steps chain too, only batch changes break the chain)
    assert eng.counters["overlapped_steps"] > eng.counters["decode_forwards"] // 2
    assert len(checked) > 5
    assert any(own for _, own in checked)  # chained steps whose rows ran their own, shorter strides


def test_a_choice_that_changes_the_stride_is_made_once(model):
    """A choice made while chaining (from committed steps only) that changes N or a row's own N stops the
    chain: the synchronous step runs it as made — the policy is not asked twice for one step."""
    m, _ = model
    prompts = _prompts(4, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) for _ in prompts]
    ref = generate(m, make_decoder("ar", 1, m.config), prompts, params)
    eng = _engine(model, "isd", "auto", False, step_cost=(1e-3, 1e-4, 1e-5), auto_interval=2, auto_max_stride=4,
                  auto_refresh=0)
    asked, applied = [], []
    apply = eng._choose

    def choose(decodes):  # N = 4 and 3 in turn, every row at the step's N (`_prechoose` asks ahead too)
        asked.append(1)
        return StrideChoice(4 - len(asked) % 2, 1.0, {3: 1.0, 4: 1.0})

    def applying(decodes):
        applied.append(eng._auto_steps)
        apply(decodes)

    eng._choose_stride, eng._choose = choose, applying
    assert [o.token_ids for o in eng.run(prompts, params)] == [o.token_ids for o in ref]
    _check_pool(eng)
    assert len(applied) > 4 and applied == sorted(set(applied))  # one choice per choosing step
    assert set(eng.stride_mix) >= {3, 4} and eng.counters["overlapped_steps"] > 0


@pytest.mark.parametrize("decoder", ["isd", "risd"])
def test_auto_with_branches_switching_layouts_keeps_greedy_ar(model, decoder):
    """An auto engine with branches whose choices alternate between the plain and the branch layout (at N = 3
    and 2) keeps greedy AR's tokens through overlapped steps: each change of layout ends the chain and runs a
    synchronous step with the other decoder (counted as a stride change), every page comes back."""
    m, lora = model
    prompts = _prompts(5, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=28, ignore_eos=True) for _ in prompts]
    ref = generate(m, make_decoder("ar", 1, m.config), prompts, params)
    eng = _engine(model, decoder, "auto", True, step_cost=(1e-3, 1e-4, 1e-5), auto_interval=2, auto_max_stride=4,
                  auto_refresh=0)
    asked = []

    def choose(decodes):  # plain N = 3, branch N = 3, plain N = 2, branch N = 2, ...
        asked.append(1)
        turn = len(asked) % 4
        return StrideChoice(3 - turn // 2, 1.0, {2: 1.0, 3: 1.0}, branches=turn % 2 == 1)

    eng._choose_stride = choose
    assert [o.token_ids for o in eng.run(prompts, params)] == [o.token_ids for o in ref]
    _check_pool(eng)
    steps = eng.counters["decode_forwards"]
    assert 0 < eng.counters["branch_steps"] < steps and set(eng.stride_mix) >= {2, 3}
    assert eng.counters["stride_changes"] > 2 and eng.chain_breaks.get("stride", 0) > 0
    assert eng.counters["overlapped_steps"] > 0
    assert {(2, False), (2, True), (3, False), (3, True)} <= set(eng._decoders)


def test_auto_warmup_with_branches_runs_both_layouts(model):
    """`warmup` of an auto engine with branches runs every stride >= 2 in both layouts (the policy may pick
    either), the plain AR step once; afterwards both layouts' trackers are fresh."""
    eng = _engine(model, "isd", "auto", True, step_cost=(1e-3, 1e-4, 1e-5), auto_max_stride=3)
    seconds = eng.warmup(max_tokens=4, all_batches=False)
    assert set(seconds) == {1, 2, 3}
    assert {(1, False), (2, False), (2, True), (3, False), (3, True)} == set(eng._decoders)
    assert all(not cost.measured and not times.seconds(1) for cost, times in eng._trackers.values())
    assert eng.counters["branch_steps"] == 0  # (warm-up leaves no trace in the counters)


@pytest.mark.parametrize("decoder,stride,branches", CASES)
def test_a_finish_does_not_end_the_chain_and_the_pages_it_frees_are_safe(model, decoder, stride, branches):
    """A request that finishes while steps are chained: its pages go back at once (and, page size 4, the rows
    still running take them as they grow), its row runs on as a padding row — KV slots the trash slot, results
    dropped — until the rows left fit a smaller batch bucket. Every request keeps the reference decoder's
    greedy tokens, no chain breaks for the finish itself, every page comes back."""
    m, lora = model
    prompts = _prompts(4, seed=21)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (40, 44, 5, 30)]
    ref = generate(m, make_decoder(decoder, stride, m.config, **_layout(branches)), prompts, params,
                   lora=lora if decoder == "risd" else None)
    eng = _engine(model, decoder, stride, branches)
    padded, launch = [], eng.runner.decode_next

    def spy(dec, tables=None, padding=None):
        if padding:
            padded.append(list(padding))
        return launch(dec, tables, padding=padding)

    eng.runner.decode_next = spy
    assert [o.token_ids for o in eng.run(prompts, params)] == [o.token_ids for o in ref]
    _check_pool(eng)
    assert padded and padded[0] == [2]  # the third request (5 tokens) ended first
    assert eng.chain_breaks.get("batch", 0) == 0 and eng.chain_breaks.get("bucket", 0) >= 1


def test_a_padding_row_writes_only_the_trash_slot(model):
    """`ModelRunner.decode_next(padding=...)`: the rows named get the trash slot as every KV slot of the step,
    and keep it (a padding row's positions and slots stay: `advanced_inputs`); other rows' slots move on."""
    eng = _engine(model, "isd", 3, False)
    prompts = _prompts(3, seed=5)
    for p in prompts:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while eng.counters["overlapped_steps"] < 2:
        eng.step()
    runner, dec = eng.runner, eng._inflight.decoder
    g = runner._last[0]
    lo, hi = next((a, b) for name, a, b, _, _ in g.layout["i"] if name == "slots")
    before = g.buffers["i"][:, lo:hi].clone()
    runner.decode_next(dec, padding=[1])
    after = g.buffers["i"][:, lo:hi]
    assert (after[1] == runner.kv.trash_slot).all()
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
    runner.decode_next(dec)
    assert (g.buffers["i"][1, lo:hi] == runner.kv.trash_slot).all()
    with pytest.raises(ValueError, match="padding row 7"):
        runner.decode_next(dec, padding=[7])


def test_abort_and_arrivals_mid_flight_leak_nothing(model):
    """A request aborted while its step is in flight, and requests added between steps: the others' tokens
    are the synchronous engine's, every page comes back."""
    prompts = _prompts(6, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in prompts]

    def run(overlap: bool) -> dict[str, list[int]]:
        eng = _engine(model, "risd", 3, False, overlap)
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts[:4], params)]
        outs, steps = {}, 0
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = list(o.output.token_ids)
            steps += 1
            if steps == 4:
                assert eng.abort_request(ids[1])
            if steps == 6:
                ids += [eng.add_request(p, sp) for p, sp in zip(prompts[4:], params[4:])]
        _check_pool(eng)
        assert eng.counters["aborted"] == 1
        if overlap:
            assert eng.counters["overlapped_steps"] > 0
        return outs

    sync, over = run(False), run(True)
    assert over == sync and len(over) == 5 and "1" not in over


def test_stops_and_a_tight_pool(model):
    """EOS stops at different steps (a chained step after a stop is wasted, and its statistics untouched) and
    a pool small enough to preempt: tokens, statistics and pages as without overlap."""
    prompts = _prompts(8, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=30) for _ in prompts]
    m, lora = model
    # EOS ids the outputs do reach: the tokens that the greedy outputs emit first, at their 4th-10th token
    free = generate(m, make_decoder("isd", 3, m.config), prompts, params)
    eos = sorted({o.token_ids[3 + i] for i, o in enumerate(free[:6])})
    res = {}
    for overlap in (False, True):
        eng = LLMEngine(m, None, EngineConfig(decoder="risd", stride=3, num_pages=20, page_size=4, overlap=overlap,
                                              max_num_seqs=8, max_num_batched_tokens=24), lora=lora, eos_token_ids=eos)
        eng.runner.use_graphs = True
        outs = eng.run(prompts, params)
        eng.block_manager.check_invariants()
        assert eng.block_manager.num_free_pages == 20
        res[overlap] = ([o.token_ids for o in outs], [o.finish_reason for o in outs],
                        [o.stats.to_dict() for o in outs], eng.decode_stats.to_dict())
        assert eng.scheduler.num_preemptions > 0
        if overlap:
            assert eng.counters["overlapped_steps"] > 0
    assert res[True] == res[False]
    assert "stop" in res[True][1]


@pytest.mark.parametrize("decoder,stride,branches", CASES)
def test_overlapped_seeded_sampling_equals_the_synchronous_engine(model, decoder, stride, branches):
    """Sampled steps overlap too: each row's draw number moves on by one a step on the device (and on the host),
    an ISD row's kept q̃ is the last step's output. A seeded request's tokens and drafts' statistics
    are the synchronous engine's — rows at T = 1, 0.7 with top-p, argmax drafts and greedy, in one batch."""
    prompts, draws = _prompts(6, seed=6), {}
    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.0),
             dict(temperature=1.0, draft="argmax"), dict(temperature=0.8, top_k=5), dict(temperature=1.0)]
    params = [SamplingParams(seed=11 + i, max_tokens=8 + 4 * i, ignore_eos=True,
                             **{k: v for k, v in kw.items() if decoder != "ar" or k != "draft"})
              for i, kw in enumerate(kinds)]
    res = {}
    for overlap in (False, True):
        eng = _engine(model, decoder, stride, branches, overlap)
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        seqs = [eng.seqs[i] for i in ids]
        while eng.has_unfinished():
            eng.step()
        res[overlap] = ([s.output.token_ids for s in seqs], [s.output.stats.to_dict() for s in seqs])
        draws[overlap] = [s.rng.draw for s in seqs]
        _check_pool(eng)
        if overlap:
            assert eng.counters["overlapped_steps"] > eng.counters["decode_forwards"] // 2
    assert res[True] == res[False]
    # (a request's last chained step, launched before its stop was seen, took one more draw number)
    assert all(0 <= o - s <= 1 for o, s in zip(draws[True], draws[False]))


def test_logprobs_run_synchronously(model):
    """Steps whose rows want logprobs are not overlapped; a batch without them is."""
    eng = _engine(model, "isd", 3, False)
    prompts = _prompts(3, seed=4)
    eng.run(prompts, [SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)] * 3)
    assert eng.counters["overlapped_steps"] == 0
    eng.run(prompts, [SamplingParams(temperature=0.5, seed=3, max_tokens=12, ignore_eos=True)] * 3)
    assert eng.counters["overlapped_steps"] > 0
    _check_pool(eng)


def test_overlap_option_is_checked():
    with pytest.raises(ConfigError, match="overlap"):
        EngineConfig(decoder="ar", stride=1, overlap="yes")


def test_steps_chain_while_requests_wait_for_a_seat(model):
    """Requests that wait for a seat (max_num_seqs full) do not stop the chain; one that can be admitted does:
    the tokens are the synchronous engine's."""
    prompts = _prompts(7, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=9 + 5 * i, ignore_eos=True) for i in range(7)]
    outs = {}
    for overlap in (False, True):
        eng = _engine(model, "risd", 4, True, overlap, max_num_seqs=2)
        outs[overlap] = [o.token_ids for o in eng.run(prompts, params)]
        _check_pool(eng)
        if overlap:
            assert eng.counters["overlapped_steps"] > eng.counters["decode_forwards"] // 2
    assert outs[True] == outs[False]


@pytest.mark.parametrize("decoder,stride,branches", CASES)
def test_a_row_preempted_while_its_step_is_in_flight_resumes_exactly(model, decoder, stride, branches):
    """A request preempted (its pages freed, recomputed later) while its step is in flight: that step's results
    are dropped — its tokens and its decoder state alike — and the request resumes from what it had applied;
    greedy tokens stay the reference decoder's."""
    m, lora = model
    prompts = _prompts(4, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in prompts]
    ref = generate(m, make_decoder(decoder, stride, m.config, **_layout(branches)), prompts, params,
                   lora=lora if decoder == "risd" else None)
    eng = _engine(model, decoder, stride, branches)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs, steps, preempted = {}, 0, 0
    while eng.has_unfinished():
        outs.update((o.request_id, o.output) for o in eng.step() if o.finished)
        steps += 1
        if steps % 5 == 0 and eng._inflight is not None and eng.scheduler.running:
            eng.scheduler.preempt(eng.scheduler.running[0])
            preempted += 1
    assert preempted >= 2
    assert [outs[i].token_ids for i in ids] == [o.token_ids for o in ref]
    _check_pool(eng)


def test_stride_changes_and_chain_breaks_are_counted(model):
    """`counters["stride_changes"]` equals the changes in the sequence of the steps' strides as seen from
    outside (each `step()`'s `stride_mix` gain); every decode step is chained or synchronous, and the
    in-flight steps drained instead of chained say why (`chain_breaks`): here the stride changing and requests
    finishing into a smaller batch bucket. `bench.offline.step_split` reports the same split."""
    from idlm.bench.offline import step_split, step_stride

    eng = _engine(model, "isd", "auto", False, step_cost=(1e-3, 1e-4, 1e-5), auto_interval=2, auto_max_stride=4,
                  auto_refresh=0)
    turns = []

    def choose(decodes):  # N = 4 and 3 in turn
        turns.append(1)
        return StrideChoice(4 - len(turns) % 2, 1.0, {3: 1.0, 4: 1.0})

    eng._choose_stride = choose
    before = dict(eng.counters)
    for i, p in enumerate(_prompts(4, seed=9)):  # of different lengths: they finish at different steps
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=12 + 6 * i, ignore_eos=True))
    strides = []
    while eng.has_unfinished():
        mix = dict(eng.stride_mix)
        eng.step()
        n = step_stride(eng, mix)
        if n is not None:
            strides.append(n)
    _check_pool(eng)
    changes = sum(a != b for a, b in zip(strides, strides[1:]))
    assert changes > 2 and eng.counters["stride_changes"] == changes
    split = step_split(eng, before)
    assert split["chained_steps"] + split["sync_steps"] == eng.counters["decode_forwards"] == len(strides)
    assert split["chained_steps"] > 0 and split["stride_changes"] == changes
    # (a finish ends a chain only where the rows left fit a smaller batch bucket)
    assert eng.chain_breaks.get("stride", 0) > 0 and eng.chain_breaks.get("bucket", 0) > 0
