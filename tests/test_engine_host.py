"""Host work of `LLMEngine.step()` at large batch: exactness of the fast host paths, and a CPU harness.

On a GPU a decode step of a small model is bound by the per-request Python work around the one
CUDA-graph replay (scheduling, slots and block tables, the batch tensors, the decoder's
`step_inputs`/`finish`, stop checks, outputs). The tests here pin that work's results: the engine
with 64+ requests decoding together (staggered arrival, stop strings, small max_tokens, greedy and
seeded sampling, AR and ISD) equals the reference runner token for token; the state it reuses
between steps (the block-table mirror, a batch's per-request lists and params tensors) is rebuilt
whenever preemption, aborts, finishes or arrivals change it; each batched piece equals its per-row
original.

The harness (`python tests/test_engine_host.py [--sampled] [--continuous] [--profile]`) runs B
concurrent requests on a tiny random model (1 layer, vocabulary 8192) so the forward costs little, and
reports ms per decode step: `step` (wall), `device` (model forward, vocabulary projection and the
decoder's `compute`: what a GPU runs inside its graph; also the prefill forward and first-token
sampling), `rng` (the per-row random draws of seeded sampling) and `host` = step − device − rng.
Default: medians over the steps where all B requests decode; `--continuous`: 4·B requests of mixed
lengths through B slots (admitted as others finish, as `idlm data distill` runs), means over all steps.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import random
import statistics
import time

import pytest
import torch
from tiny import mixed_prompt, tiny_transformer  # tests/ is on the path under pytest and when run as a script

from idlm.decoding import ar, isd, make_decoder, sampling
from idlm.decoding.ar import ARState
from idlm.decoding.base import BlockBatch
from idlm.decoding.isd import ISDDecoder, ISDState
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stops import StopChecker
from idlm.engine.block_manager import PageManager, PageManagerError
from idlm.engine.llm_engine import EngineConfig, LLMEngine, _BatchRows
from idlm.engine.model_runner import DecodeBatch, ModelRunner, Row

HARNESS_VOCAB, HARNESS_MASK = 8192, 5
MASK = 5


# ----------------------------------------------------------------- exactness at large batch


def _large_workload(tok, sampled: bool, n: int = 96, seed: int = 0):
    """n prompts with per-request params: small and large max_tokens, stop strings (found through the
    tokenizer), stop ids, logprobs; all greedy, or all seeded sampling with one top-p."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append(mixed_prompt(tok, i, rng))
        kw = dict(temperature=1.0, top_p=0.9, seed=500 + i) if sampled else dict(temperature=0.0)
        kw["max_tokens"] = rng.choice([1, 2, 3]) if rng.random() < 0.25 else rng.randint(8, 40)
        r = rng.random()
        if r < 0.3:
            kw["stop"] = [rng.choice(["\n", " ", "e", "(", ":", "return"])]
        elif r < 0.4:
            kw["stop_token_ids"] = [rng.randrange(0, 600)]
        elif r < 0.5:
            kw["logprobs"] = rng.choice([0, 2])
        params.append(SamplingParams(**kw))
    return prompts, params


def _staggered(engine, prompts, params, per_step=32):
    """Submit `per_step` new requests before each step; (the requests (Sequences) in submission order, the
    largest number running at once)."""
    seqs, i, most = [], 0, 0
    while i < len(prompts) or engine.has_unfinished():
        for p, sp in zip(prompts[i: i + per_step], params[i: i + per_step]):
            seqs.append(engine.seqs[engine.add_request(p, sp)])
        i += per_step
        engine.step()
        most = max(most, engine.num_running)
    return seqs, most


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("decoder", ["ar", "isd"])
def test_large_batch_engine_equals_reference(tiny, decoder, sampled):
    """96 requests, 64+ decoding together (arriving 32 per step), through the batched host paths
    (block arrays, table mirror, per-batch caches, stop checks) give the reference runner's output."""
    model, tok = tiny
    prompts, params = _large_workload(tok, sampled)
    ref = generate(model, make_decoder(decoder, 4, model.config, tok), prompts, params, tokenizer=tok)
    engine = LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=4, page_size=8, num_pages=1200,
                                                max_num_seqs=96, max_num_batched_tokens=2048))
    seqs, most = _staggered(engine, prompts, params)
    assert most >= 64
    got = [s.output for s in seqs]
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [s.checker.text for s in seqs] == [o.text for o in ref]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in ref]
    assert [o.stats.forwards for o in got] == [o.stats.forwards for o in ref]
    for o, r in zip(got, ref):
        assert len(o.logprobs) == len(r.logprobs) and o.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in o.top_logprobs] == [[t for t, _ in top] for top in r.top_logprobs]
    stopped_by_string = [r.text for r, sp in zip(ref, params) if sp.stop and r.finish_reason == "stop"]
    assert len(stopped_by_string) >= 3  # the stop-string path ran
    assert sum(len(o.token_ids) == sp.max_tokens for o, sp in zip(got, params)) >= 10
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
    engine.block_manager.check_invariants()


def test_engine_text_streams_equal_reference_text(tiny):
    """The streamed text deltas of a large batch with stop strings add up to the reference runner's text."""
    model, tok = tiny
    prompts, params = _large_workload(tok, sampled=False, n=64, seed=1)
    ref = generate(model, make_decoder("isd", 4, model.config, tok), prompts, params, tokenizer=tok)
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, page_size=8, num_pages=800,
                                                max_num_seqs=64, max_num_batched_tokens=1024))
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    text = dict.fromkeys(rids, "")
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] += out.new_text
    assert [text[r] for r in rids] == [o.text for o in ref]


def test_text_comes_at_most_one_step_after_its_tokens(tiny):
    """Without stop strings or logprobs a request's text is detokenized while the device runs the next step
    (`LLMEngine._stream_text`): after each step the streamed text holds at least the text of the tokens
    streamed up to the step before and is a prefix of the text of all of them (tokenizer.decode as the
    oracle); with stop strings or logprobs the text comes with its tokens; at the end it is all there."""
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, page_size=8, num_pages=400, max_num_seqs=8))
    kinds = [dict(), dict(logprobs=1), dict(stop=["zzz"]), dict(temperature=1.0, seed=3)]
    rids = [engine.add_request(mixed_prompt(tok, i, random.Random(i)),
                               SamplingParams(max_tokens=30, ignore_eos=True, **{"temperature": 0.0, **kinds[i % 4]}))
            for i in range(8)]
    ids, text, before = {r: [] for r in rids}, dict.fromkeys(rids, ""), {r: [] for r in rids}
    lagged = 0
    while engine.has_unfinished():
        for r in rids:
            before[r] = list(ids[r])
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
            text[out.request_id] += out.new_text
        for i, r in enumerate(rids):
            now = tok.decode(ids[r], skip_special_tokens=True).rstrip("\ufffd")
            assert now.startswith(text[r])
            if kinds[i % 4].get("logprobs") is not None:
                assert text[r] == now  # with its tokens
            elif kinds[i % 4].get("stop"):  # with its tokens, less what could start the stop string "zzz"
                assert len(text[r]) >= len(now) - 2
            else:
                assert text[r].startswith(tok.decode(before[r], skip_special_tokens=True).rstrip("\ufffd"))
                lagged += text[r] != now
    assert lagged > 0  # the deferral ran
    assert [text[r] for r in rids] == [tok.decode(ids[r], skip_special_tokens=True) for r in rids]


def test_text_is_detokenized_while_the_device_runs_the_step(tiny):
    """The last step's pending text is flushed between the decode step's launch and the host sync (where
    the host would wait for the device), not after it."""
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(decoder="ar", page_size=8, num_pages=200, max_num_seqs=4))
    for i in range(4):
        engine.add_request(mixed_prompt(tok, i, random.Random(i)), SamplingParams(max_tokens=12, ignore_eos=True))
    real, seen = engine.runner.decode, []

    class Packed:  # the graph's output: its `.cpu()` is the host sync
        def __init__(self, t):
            self.t = t

        def cpu(self):
            seen.append(any(s.checker.text_pending for s in engine.seqs.values()))
            return self.t

    def decode(*args):
        packed, extra = real(*args)
        return Packed(packed), extra

    engine.runner.decode = decode
    while engine.has_unfinished():
        engine.step()
    assert len(seen) >= 10 and not any(seen)


# ----------------------------------------------------------------- caches: invalidation


def _churn(engine, n=300, seed=0):
    """Many requests of mixed params (greedy, seeded sampling with two top-p values, logprobs), arriving,
    aborted and preempted at random on a small pool; returns every request's output (submission order)."""
    rng = random.Random(seed)
    outs = []
    while len(outs) < n or engine.has_unfinished():
        for _ in range(rng.randint(0, 8)):
            if len(outs) < n:
                i = len(outs)
                prompt = [rng.randrange(6, 64) for _ in range(rng.randint(1, 24))]
                kind = rng.random()
                sp = (SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 20)) if kind < 0.3 else
                      SamplingParams(temperature=1.0, top_p=rng.choice([1.0, 0.8]), seed=i,
                                     max_tokens=rng.randint(1, 20), logprobs=2 if kind > 0.9 else None))
                outs.append(engine.seqs[engine.add_request(prompt, sp)].output)
        if engine.seqs and rng.random() < 0.1:
            engine.abort_request(rng.choice(sorted(engine.seqs)))
        if engine.scheduler.running and rng.random() < 0.15:
            engine.scheduler.preempt(rng.choice(engine.scheduler.running))
        engine.step()
        engine.block_manager.check_invariants()  # incl. the host block-table mirror
    return outs


def _churn_engine(decoder: str) -> LLMEngine:
    model = tiny_transformer(64, mask_token_id=MASK, max_position_embeddings=128)
    return LLMEngine(model, None, EngineConfig(decoder=decoder, stride=4, page_size=4, num_pages=48,
                                               max_num_seqs=24, max_num_batched_tokens=96), eos_token_ids=[3])


def _disable_caches(engine: LLMEngine) -> None:
    """Rebuild every per-batch list and re-derive every params tensor at each step (no reuse)."""
    engine._batch_rows = lambda seqs: _BatchRows(tuple(seqs))
    for dec in engine._decoders.values():
        dec.batch_params = dec.params_inputs


def _brute_force_mapping(bm: PageManager) -> None:
    """Wrap `decode_mapping` to check each result against the per-request `length`, `slots` and
    `block_table` (the mirror-free computation), at the moment the engine asks for it."""
    mapping = bm.decode_mapping

    def checked(seq_ids, n):
        starts, slots, tables = mapping(seq_ids, n)
        for b, r in enumerate(seq_ids):
            table = bm.block_table(r)
            assert starts[b] == bm.length(r) and slots[b].tolist() == bm.slots(r, bm.length(r), n)
            assert tables[b, : len(table)].tolist() == table and not tables[b, len(table):].any()
        return starts, slots, tables

    bm.decode_mapping = checked


@pytest.mark.parametrize("decoder", ["ar", "isd"])
def test_caches_are_invalidated_under_preemption_abort_and_finish(decoder):
    """Per-batch lists, decoders' params tensors and the block-table mirror are reused only while they are
    valid: with aborts, forced preemptions and finishes every few steps, the engine equals one that
    rebuilds all of them each step, and the mirror equals brute force after every step."""
    cached = _churn_engine(decoder)
    _brute_force_mapping(cached.block_manager)
    got = _churn(cached)
    plain = _churn_engine(decoder)
    _disable_caches(plain)
    want = _churn(plain)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.token_probs for o in got] == [o.token_probs for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert cached.scheduler.num_preemptions > 20 and cached.counters["aborted"] > 5
    for eng in (cached, plain):
        assert eng.block_manager.num_free_pages == eng.block_manager.num_pages
        assert not eng.block_manager._tables.any()


def test_stationary_batch_reuses_its_lists_and_params():
    """A batch that does not change keeps one params list (so decoders derive its tensors once); any
    change (a request finishing here) builds new ones."""
    engine = harness_engine("ar", 8)
    for i in range(8):
        engine.add_request([20 + i] * 4, SamplingParams(temperature=0, max_tokens=6 if i else 3, ignore_eos=True))
    seen = []
    while engine.has_unfinished():
        engine.step()
        if engine._batch is not None:
            seen.append(engine._batch.params)
    distinct = [p for i, p in enumerate(seen) if i == 0 or p is not seen[i - 1]]
    assert len(distinct) == 2 and len(seen) >= 5  # one list for 8 rows, one for the 7 left


# ----------------------------------------------------------------- batched pieces equal per-row ones


@pytest.mark.parametrize("tokenizer", [False, True])
def test_stop_checker_accept_equals_adding_token_by_token(tiny, tokenizer):
    _, tok = tiny
    rng = random.Random(0)
    for _ in range(400):
        kw = dict(max_tokens=rng.randint(1, 8), stop_token_ids=rng.sample(range(20), rng.randint(0, 2)),
                  ignore_eos=rng.random() < 0.5)
        if tokenizer and rng.random() < 0.5:
            kw["stop"] = [rng.choice(["a", "e ", "th"])]
        params = SamplingParams(**kw)
        tk = tok if tokenizer else None
        batched, single = StopChecker(params, [7], tk), StopChecker(params, [7], tk)
        while batched.finish_reason is None:
            step = [rng.randrange(0, 30) if rng.random() < 0.5 else rng.randrange(200, 400)
                    for _ in range(rng.randint(0, 4))]
            kept = batched.accept(step)
            n = 0  # tokens the per-token rule keeps: up to and including the one that finishes
            for t in step:
                n += 1
                if single.add(t):
                    break
            assert kept == n
            assert (batched.finish_reason, batched.n_tokens, batched.text) == \
                (single.finish_reason, single.n_tokens, single.text)


def _isd_states(rng, n, k):
    return [ISDState("V", rng.randrange(50), [rng.randrange(50) for _ in range(k)]) if rng.random() < 0.6 else
            ISDState("C", rng.randrange(50)) for _ in range(n)]


@pytest.mark.parametrize("lora", [False, True])
def test_isd_blocks_equal_stacked_block(lora):
    rng = random.Random(1)
    dec = ISDDecoder(4, MASK, lora=lora)
    states = _isd_states(rng, 40, 3) + [ISDState("V", 9, [1, 2])]  # a stale stride: restarts cold
    twins = copy.deepcopy(states)
    got, want = dec.blocks(states), BlockBatch.stack([dec.block(s) for s in twins])
    assert got.tokens.tolist() == want.tokens.tolist() and got.is_mask.tolist() == want.is_mask.tolist()
    assert (got.gate is None) == (want.gate is None) == (not lora)
    if lora:
        assert got.gate.tolist() == want.gate.tolist()
    assert got.visible is None and states == twins


def test_ar_and_sdar_blocks_equal_stacked_block(tiny):
    model, tok = tiny
    ar_dec = make_decoder("ar", 1, model.config, tok)
    states = [ARState(t) for t in (4, 8, 15)]
    assert ar_dec.blocks(states).tokens.tolist() == [[4], [8], [15]]
    sdar = make_decoder("sdar", 4, model.config, tok)
    logits = torch.zeros(2, model.config.vocab_size)
    sd_states, _ = sdar.start(logits, [SamplingParams(temperature=0)] * 2, [None, None])
    got = sdar.blocks(sd_states)
    want = [sdar.block(s) for s in sd_states]
    assert got.tokens.tolist() == [b.tokens for b in want] and got.visible.tolist() == [b.visible for b in want]


def test_decode_batch_tensors_equal_row_tensors():
    """The decode path's `_batch_tensors` (what the CUDA graph is fed) equals the row path's `_tensors`,
    padding included, with and without the R-ISD and SDAR extras."""
    model = tiny_transformer(64, mask_token_id=MASK)
    runner = ModelRunner(model, 4, 64, 128, cuda_graphs=False)
    rng = random.Random(2)
    for extras in ((), ("is_mask", "gate"), ("is_mask",), ("visible",)):
        rows = []
        for _ in range(5):
            start, q, pages = rng.randrange(0, 20), 3, rng.randint(6, 9)
            table = rng.sample(range(64), pages)
            rows.append(Row([rng.randrange(64) for _ in range(q)], start,
                            [table[p // 4] * 4 + p % 4 for p in range(start, start + q)], table,
                            is_mask=[rng.random() < 0.5 for _ in range(q)] if "is_mask" in extras else None,
                            gate=[rng.random() < 0.5 for _ in range(q)] if "gate" in extras else None,
                            visible=[2, 2, 2] if "visible" in extras else None))
        for B, M in ((5, 9), (8, 16)):
            want = runner._tensors(rows, 3, B, M)
            got = runner._batch_tensors(DecodeBatch.from_rows(rows), B, M)
            assert sorted(got) == sorted(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_params_tensors_equal_torch_tensor_of_lists():
    """The numpy-built per-row parameter tensors hold exactly what torch.tensor of the Python values holds
    (float32 rounding, ±inf beyond its range, int64 top-k)."""
    rng = random.Random(3)
    values = [rng.random() * 10.0 ** rng.randint(-300, 300) for _ in range(2000)] + [1e-5, 0.1, 1 / 3, 2.0 ** -149]
    params = [SamplingParams(temperature=v, top_p=min(1.0, max(1e-300, v)), top_k=rng.randint(0, 2 ** 62),
                             verify_alpha=v + 1e-300) for v in values]
    want = (torch.tensor([p.temperature for p in params], dtype=torch.float32),
            torch.tensor([p.top_k for p in params], dtype=torch.long),
            torch.tensor([p.top_p for p in params], dtype=torch.float32))
    for got, ref in zip(sampling.params_tensors(params, "cpu"), want):
        assert got.dtype == ref.dtype and torch.equal(got, ref)
    alpha = ISDDecoder(4, MASK).params_inputs(params).tensors["alpha"]
    assert torch.equal(alpha, torch.tensor([p.verify_alpha for p in params], dtype=torch.float32))


def test_decode_mapping_needs_reserved_room():
    bm = PageManager(8, 4)
    bm.allocate("a", [1, 2, 3])
    bm.commit("a", 3, [1, 2, 3])
    with pytest.raises(PageManagerError, match="call reserve"):
        bm.decode_mapping(["a"], 2)
    assert bm.reserve("a", 2)
    starts, slots, tables = bm.decode_mapping(["a"], 2)
    assert starts.tolist() == [3] and slots.tolist() == [bm.slots("a", 3, 2)]
    assert tables.tolist() == [bm.block_table("a")]


# ----------------------------------------------------------------- timing smoke check


def test_host_step_timing_smoke():
    """Loose (CI machines vary): a full-batch AR step of 64 requests needs far less than 25 ms of host work
    (about 0.5 ms on a laptop-class core)."""
    r = bench("ar", 64, tokens=12)
    assert r["steps"] >= 8 and r["host_ms"] < 25


# ----------------------------------------------------------------- harness


def harness_engine(decoder: str, batch: int, stride: int = 4, **config) -> LLMEngine:
    """An engine over a 1-layer random model (vocabulary 8192, MASK id 5) with room for `batch`
    requests of up to 256 tokens without preemption."""
    model = tiny_transformer(HARNESS_VOCAB, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=512, mask_token_id=HARNESS_MASK)
    cfg = dict(decoder=decoder, stride=stride, page_size=16, num_pages=batch * 17 + 16, max_num_seqs=batch,
               max_num_batched_tokens=max(8192, batch * 64), max_model_len=512)
    cfg.update(config)
    return LLMEngine(model, None, EngineConfig(**cfg), eos_token_ids=[])


class _Timer:
    """Seconds spent inside wrapped functions (`wrap`), summed."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def _timers(engine: LLMEngine) -> tuple[_Timer, _Timer]:
    """(device, rng) timers. device: what a GPU runs inside its graph (`ModelRunner._device_step`: forward,
    vocabulary projection, decoder.compute), the eager prefill forward (`forward_logits`) and the first token's
    sampling (`Decoder.start`); rng: the per-row
    random draws of `step_inputs` (a launch per seeded row on a GPU, real compute here). Both are real
    compute on this CPU, so `host` excludes them."""
    device, rng = _Timer(), _Timer()
    engine.runner._device_step = device.wrap(engine.runner._device_step)
    engine.runner.forward_logits = device.wrap(engine.runner.forward_logits)
    for dec in engine._decoders.values():  # the first token's sampling, after prefill
        dec.start = device.wrap(dec.start)
    for module in (ar, isd):
        for name in ("exponential_noise", "uniforms"):
            if hasattr(module, name):
                setattr(module, name, rng.wrap(getattr(module, name)))
    return device, rng


def _unwrap_rng() -> None:
    for module in (ar, isd):
        for name in ("exponential_noise", "uniforms"):
            if hasattr(module, name):
                setattr(module, name, getattr(sampling, name))


def _params(sampled: bool, seed: int, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                          seed=seed if sampled else None, max_tokens=max_tokens, ignore_eos=True)


def bench(decoder: str, batch: int, tokens: int = 64, sampled: bool = False, profile: bool = False,
          seed: int = 0) -> dict:
    """Run `batch` requests of `tokens` tokens (prompts of 16..32 random ids) and time the decode steps
    in which every request decodes (prefill steps and the draining tail excluded): medians in ms."""
    engine = harness_engine(decoder, batch)
    rng = random.Random(seed)
    for i in range(batch):
        engine.add_request([rng.randrange(16, HARNESS_VOCAB) for _ in range(rng.randint(16, 32))],
                           _params(sampled, i, tokens))
    while any(s.prefilling or s.state is None for s in engine.seqs.values()):
        engine.step()
    device, rng_timer = _timers(engine)
    prof = cProfile.Profile() if profile else None
    rows = []  # (step, device, rng) seconds of each full-batch step
    try:
        while engine.has_unfinished():
            full = engine.num_running == batch and not engine.num_waiting
            d0, r0, t0 = device.seconds, rng_timer.seconds, time.perf_counter()
            if prof is not None and full:
                prof.enable()
            engine.step()
            if prof is not None:
                prof.disable()
            if full:
                rows.append((time.perf_counter() - t0, device.seconds - d0, rng_timer.seconds - r0))
    finally:
        _unwrap_rng()

    def ms(values) -> float:
        return round(1e3 * statistics.median(values), 3)

    out = {"decoder": decoder, "batch": batch, "sampled": sampled, "steps": len(rows),
           "step_ms": ms(r[0] for r in rows), "device_ms": ms(r[1] for r in rows), "rng_ms": ms(r[2] for r in rows),
           "host_ms": ms(r[0] - r[1] - r[2] for r in rows)}
    if prof is not None:
        out["profile"] = prof
    return out


def bench_continuous(decoder: str, batch: int, tokens: int = 64, sampled: bool = False, profile: bool = False,
                     seed: int = 0) -> dict:
    """Offline generation as `idlm data distill` runs it: 4 × batch requests queued at once (prompts of
    16..128 ids, max_tokens tokens/2..3·tokens/2), at most `batch` running, new ones admitted (prefilled)
    as others finish. Means over every step, and host time per generated token."""
    engine = harness_engine(decoder, batch, max_num_batched_tokens=max(2048, batch * 8))
    rng = random.Random(seed)
    for i in range(4 * batch):
        engine.add_request([rng.randrange(16, HARNESS_VOCAB) for _ in range(rng.randint(16, 128))],
                           _params(sampled, i, rng.randint(tokens // 2, 3 * tokens // 2)))
    device, rng_timer = _timers(engine)
    prof = cProfile.Profile() if profile else None
    steps, t0 = 0, time.perf_counter()
    try:
        if prof is not None:
            prof.enable()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        if prof is not None:
            prof.disable()
    finally:
        _unwrap_rng()
    wall = time.perf_counter() - t0
    host = wall - device.seconds - rng_timer.seconds
    generated = engine.counters["generated_tokens"]
    out = {"decoder": decoder, "batch": batch, "sampled": sampled, "continuous": True, "steps": steps,
           "step_ms": round(1e3 * wall / steps, 3), "device_ms": round(1e3 * device.seconds / steps, 3),
           "rng_ms": round(1e3 * rng_timer.seconds / steps, 3), "host_ms": round(1e3 * host / steps, 3),
           "host_us_per_token": round(1e6 * host / generated, 2)}
    if prof is not None:
        out["profile"] = prof
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoders", default="ar,isd")
    ap.add_argument("--batches", default="256,64,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sampled", action="store_true", help="seeded sampling (T=0.8, top-p 0.95) instead of greedy")
    ap.add_argument("--continuous", action="store_true",
                    help="4 x batch requests through `batch` slots, admitted as others finish (means over all steps)")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps of each setting")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    for dec in args.decoders.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            r = (bench_continuous if args.continuous else bench)(dec, b, args.tokens, args.sampled, args.profile)
            prof = r.pop("profile", None)
            print(r, flush=True)
            if prof is not None:
                for key in ("tottime", "cumtime"):
                    pstats.Stats(prof).sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()


def test_freeze_gc_freezes_what_lives_and_frees_what_was_dropped():
    """`freeze_gc` (after warm-up, before benchmark timing): live objects leave the collector's view, and an
    object frozen earlier that has since become cyclic garbage (engines hold cycles) is still freed."""
    import gc
    import weakref

    from idlm.engine.llm_engine import freeze_gc

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle, as an engine's pool and graphs form
    dropped = weakref.ref(a)
    freeze_gc()
    assert gc.get_freeze_count() > 0 and dropped() is not None
    del a, b
    freeze_gc()  # unfreezes, collects, freezes again
    assert dropped() is None
    gc.unfreeze()


def test_host_overhead_script_smoke(tmp_path):
    """scripts/host_overhead.py CPU-sized: both cases measured with the collector live and after freeze_gc."""
    from tiny import run_script

    last = run_script("host_overhead.py", CASES="ar:1:3,isd:4:3", MAX_TOKENS="8")
    assert set(last["cases"]) == {"ar:1:3", "isd:4:3"}
    for case in last["cases"].values():
        for run in case.values():
            assert run["steps"] > 0 and run["host_ms_per_step"] > 0


def test_replay_packing_fills_what_the_graph_unpacks():
    """`_fill` (numpy, the replay path) writes a step's host inputs into the staging buffers so that `_unpack`
    gives back each input, its rows past its own padded with its row 0 (`_pad_rows`), in its own dtype:
    torch tensors and numpy arrays, bool / int / float, 1-d and 2-d and 3-d, fewer rows than the bucket. The
    bool inputs sit side by side in the int64 group and come out of one conversion (views of one tensor)."""
    import numpy as np

    from idlm.engine import model_runner as mr

    g = torch.Generator().manual_seed(3)
    rows = 4
    host = {"tokens": np.arange(4 * 3).reshape(4, 3), "starts": np.array([5, 6, 7, 8]),
            "dec.is_v": torch.tensor([True, False]), "dec.specs": torch.randint(0, 9, (2, 3), generator=g),
            "dec.temperature": torch.rand(2, generator=g), "dec.q_old": torch.rand(2, 3, 5, generator=g),
            "gate": np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=bool),
            "dec.block": torch.tensor([False, True])}
    layout, staging, buffers = mr._pack(host, rows, "cpu", pin=False)
    got = mr._unpack(layout, buffers, {}, rows)
    for name, v in host.items():
        want = mr._pad_rows(v if isinstance(v, torch.Tensor) else torch.from_numpy(v), rows)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    bools = [got[k] for k in ("dec.is_v", "gate", "dec.block")]
    assert len({b.untyped_storage().data_ptr() for b in bools}) == 1  # one conversion for all three
    # a replay overwrites the same buffers with the next step's inputs
    host2 = {k: (~v if v.dtype in (bool, torch.bool) else v + 1) for k, v in host.items()}
    mr._fill({k: t.numpy() for k, t in staging.items()}, layout, host2, rows)
    got = mr._unpack(layout, {k: t.clone() for k, t in staging.items()}, {}, rows)
    for name, v in host2.items():
        want = mr._pad_rows(v if isinstance(v, torch.Tensor) else torch.from_numpy(v), rows)
        assert torch.equal(got[name], want), name


def test_replay_fill_skips_the_same_read_only_input_and_rewrites_a_new_one():
    """With `filled` (a graph entry's record), `_fill` writes an input only when it is not the object it wrote
    last time there: the decoders' per-params tensors, shared by every step of an unchanged batch, are
    written once; a new object (the next step's arrays, a changed batch's params) is written, whatever its
    values."""
    import numpy as np

    from idlm.engine import model_runner as mr

    rows = 2
    params = torch.tensor([0.5, 0.7])  # the same object every step, as `Decoder.batch_params` hands it out
    host = {"tokens": np.array([[1, 2], [3, 4]]), "dec.temperature": params}
    layout, staging, buffers = mr._pack(host, rows, "cpu", pin=False)
    views, filled = {k: t.numpy() for k, t in staging.items()}, {}
    mr._fill(views, layout, host, rows, filled)
    staging["f"].fill_(-1.0)  # what a skipped input leaves is whatever the buffer holds
    mr._fill(views, layout, {"tokens": np.array([[5, 6], [7, 8]]), "dec.temperature": params}, rows, filled)
    got = mr._unpack(layout, {k: t.clone() for k, t in staging.items()}, {}, rows)
    assert got["tokens"].tolist() == [[5, 6], [7, 8]]  # a new array: written
    assert got["dec.temperature"].tolist() == [-1.0, -1.0]  # the same tensor: not written again
    mr._fill(views, layout, {"tokens": np.array([[5, 6], [7, 8]]), "dec.temperature": params.clone()}, rows, filled)
    got = mr._unpack(layout, {k: t.clone() for k, t in staging.items()}, {}, rows)
    assert torch.equal(got["dec.temperature"], params)  # an equal but new tensor: written


def test_host_pack_script_smoke():
    """scripts/host_pack.py CPU-sized: the replay packing and the torch-ops packing it replaced, timed."""
    from tiny import run_script

    last = run_script("host_pack.py", CASES="isd:4:2", REPS="20")
    assert set(last) == {"summary", "isd4_b2_T0", "isd4_b2_T1"}
    assert all(pack > 0 and old > 0 for pack, old in (last["isd4_b2_T0"], last["isd4_b2_T1"]))
