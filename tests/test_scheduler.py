"""Scheduler admission policy: batched admission while requests decode (`admit_batch`)."""

from types import SimpleNamespace

from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stops import StopChecker
from idlm.engine.block_manager import PageManager
from idlm.engine.scheduler import Scheduler, admits_now
from idlm.engine.sequence import Sequence


def test_admits_now_table():
    assert admits_now(running=0, waiting=5, max_num_seqs=8, admit_batch=4)  # idle: at once
    assert not admits_now(running=6, waiting=5, max_num_seqs=8, admit_batch=4)  # 2 free < 4
    assert admits_now(running=4, waiting=5, max_num_seqs=8, admit_batch=4)  # 4 free
    assert admits_now(running=6, waiting=2, max_num_seqs=8, admit_batch=4)  # every waiting one fits
    assert admits_now(running=7, waiting=1, max_num_seqs=8, admit_batch=1)  # admit_batch 1: as before


AR_STEP = SimpleNamespace(query_len=1)  # a stand-in for the step's decoder: the scheduler reads query_len only


def _seq(i: int, n: int = 4) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=4)
    return Sequence(f"r{i}", list(range(10, 10 + n)), params, StopChecker(params, {0}, None), params.rng())


def test_scheduler_defers_admission_until_a_group_fits():
    bm = PageManager(num_pages=64, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=256, admit_batch=2)
    seqs = [_seq(i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule(lambda b: AR_STEP)
    assert [s.request_id for s, _ in out.prefills] == ["r0", "r1", "r2", "r3"]  # idle: fill every seat
    assert out.decoder is None and out.query_len == 0  # nothing decodes yet: no decoder asked for
    for s, n in out.prefills:
        s.num_computed += n
    sched.finish(seqs[0])  # one seat free, two waiting, admit_batch 2: wait
    out = sched.schedule(lambda b: AR_STEP)
    assert out.prefills == [] and len(out.decodes) == 3 and out.decoder is AR_STEP and out.query_len == 1
    sched.finish(seqs[1])  # two seats free: both admitted in one prefill
    out = sched.schedule(lambda b: AR_STEP)
    assert [s.request_id for s, _ in out.prefills] == ["r4", "r5"]
    assert bm.num_free_pages < bm.num_pages


def test_each_decode_row_reserves_the_step_decoders_query_len():
    bm = PageManager(num_pages=64, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=256)
    seqs = [_seq(i) for i in range(2)]
    for s in seqs:
        sched.add(s)
    for s, n in sched.schedule(lambda b: AR_STEP).prefills:
        s.num_computed += n
    before = [bm.capacity(s.request_id) for s in seqs]
    asked = []
    isd7 = SimpleNamespace(query_len=7)
    out = sched.schedule(lambda rows: asked.append(list(rows)) or isd7)
    assert asked == [seqs] and out.decoder is isd7 and out.query_len == 7
    assert before == [4, 4] and all(bm.capacity(s.request_id) >= max(8, bm.length(s.request_id) + 7) for s in seqs)
