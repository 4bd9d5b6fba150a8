"""The asyncio streaming front-end (`AsyncLLM`) over the synchronous engine.

A tiny random model (greedy, so deterministic) serves as its own oracle: every stream, concatenated,
must equal a plain synchronous `LLMEngine.run` of the same requests. The rest checks the contracts
the server relies on: errors before any output, early exit and abort free the KV pages, a full
queue answers `QueueFullError`, and a crashed engine loop fails every stream loudly.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tiny import tiny_transformer

from idlm.decoding.sampling import SamplingParams
from idlm.engine.async_engine import AsyncLLM, QueueFullError
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError, IdlmError

VOCAB, MASK, CONTEXT = 64, 63, 256
TIMEOUT = 30


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(VOCAB, std=0.6, seed=0, mask_token_id=MASK, eos_token_id=0,
                            max_position_embeddings=CONTEXT)


def make_engine(model, **kw) -> LLMEngine:
    cfg = dict(decoder="isd", stride=4, page_size=16, num_pages=64, max_num_batched_tokens=512, cuda_graphs=False)
    cfg.update(kw)
    return LLMEngine(model, None, EngineConfig(**cfg))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


async def collect(llm: AsyncLLM, prompt, params, request_id=None) -> list:
    return [out async for out in llm.generate(prompt, params, request_id)]


async def wait_until(cond, timeout: float = 5.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def pool_full(llm: AsyncLLM) -> bool:
    s = llm.stats()
    return s["pages_free"] == s["pages_total"] and s["num_running"] == 0 and s["num_waiting"] == 0


def test_concurrent_streams_equal_the_synchronous_engine(model):
    ps = prompts(8)
    params = [greedy(n) for n in (5, 12, 17, 24, 30, 9, 40, 3)]
    ref = make_engine(model).run(ps, params)

    async def main():
        async with AsyncLLM(make_engine(model)) as llm:
            streams = await asyncio.wait_for(
                asyncio.gather(*(collect(llm, p, sp) for p, sp in zip(ps, params))), TIMEOUT)
            return streams, llm.stats(), llm.is_healthy

    streams, stats, healthy = asyncio.run(main())
    assert healthy
    for items, sp, r in zip(streams, params, ref):
        assert len(items) > 1  # streamed over several steps, not delivered at the end
        assert [o.finished for o in items] == [False] * (len(items) - 1) + [True]
        assert items[-1].finish_reason == "length"
        got = [t for o in items for t in o.new_token_ids]
        assert got == items[-1].output.token_ids
        assert got == r.token_ids
        assert len(got) == sp.max_tokens
    assert len({o.request_id for items in streams for o in items}) == 8
    assert stats["pages_free"] == stats["pages_total"]
    assert stats["counters"]["finished"] == 8 and stats["counters"]["aborted"] == 0
    assert stats["num_streams"] == 0


def test_breaking_out_early_aborts_the_request_and_frees_its_pages(model):
    async def main():
        async with AsyncLLM(make_engine(model)) as llm:
            seen = []
            async for out in llm.generate(prompts(1)[0], greedy(200)):
                seen.append(out)
                if len(seen) == 2:
                    break
            assert not seen[-1].finished
            freed = await wait_until(lambda: pool_full(llm) and llm.stats()["counters"]["aborted"] == 1)
            stats = llm.stats()
            # the engine stopped long before max_tokens
            generated = stats["counters"]["generated_tokens"]
            after = await collect(llm, prompts(1, seed=3)[0], greedy(8))  # still serving
            return freed, stats, generated, after

    freed, stats, generated, after = asyncio.run(main())
    assert freed, stats
    assert stats["counters"]["finished"] == 0 and stats["num_streams"] == 0
    assert generated < 200
    assert after[-1].finished and len([t for o in after for t in o.new_token_ids]) == 8


def test_cancelled_consumer_task_aborts_the_request(model):
    async def main():
        async with AsyncLLM(make_engine(model)) as llm:
            got_one = asyncio.Event()

            async def consume():
                async for _ in llm.generate(prompts(1)[0], greedy(200)):
                    got_one.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(got_one.wait(), TIMEOUT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await wait_until(lambda: pool_full(llm) and llm.stats()["counters"]["aborted"] == 1), llm.stats()

    freed, stats = asyncio.run(main())
    assert freed, stats


def test_invalid_request_raises_before_any_output_and_the_engine_keeps_serving(model):
    async def main():
        async with AsyncLLM(make_engine(model)) as llm:
            errors = []
            for bad in ([1] * (CONTEXT + 10), [], [VOCAB + 5]):
                with pytest.raises(ConfigError) as e:
                    await collect(llm, bad, greedy(4))
                errors.append(str(e.value))
            with pytest.raises(ConfigError, match="already in use"):  # the running request is not disturbed
                await asyncio.gather(collect(llm, [1, 2, 3], greedy(30), "dup"), collect(llm, [4], greedy(3), "dup"))
            ok = await asyncio.wait_for(collect(llm, [1, 2, 3], greedy(6)), TIMEOUT)
            await wait_until(lambda: pool_full(llm))
            return errors, ok, llm.stats(), llm.is_healthy

    errors, ok, stats, healthy = asyncio.run(main())
    assert "context" in errors[0] and "empty" in errors[1] and "vocabulary" in errors[2]
    assert healthy and ok[-1].finished and ok[-1].finish_reason == "length"
    assert len([t for o in ok for t in o.new_token_ids]) == 6
    assert stats["counters"]["finished"] == 2 and stats["counters"]["aborted"] == 0  # "dup" #1 ran to the end
    assert stats["pages_free"] == stats["pages_total"]


def test_full_queue_rejects_with_queue_full_error_and_serves_the_rest(model):
    ps = prompts(8, seed=1)

    async def main():
        async with AsyncLLM(make_engine(model, max_num_seqs=1), max_waiting=2) as llm:
            res = await asyncio.wait_for(
                asyncio.gather(*(collect(llm, p, greedy(16)) for p in ps), return_exceptions=True), TIMEOUT)
            later = await collect(llm, ps[0], greedy(16))  # the queue drained: accepted again
            return res, later, llm.stats()

    res, later, stats = asyncio.run(main())
    rejected = [r for r in res if isinstance(r, BaseException)]
    served = [r for r in res if not isinstance(r, BaseException)]
    assert rejected and all(isinstance(r, QueueFullError) and isinstance(r, IdlmError) for r in rejected)
    assert len(served) >= 3  # one running + max_waiting queued
    assert len(served) < 8
    for items in served:
        assert items[-1].finished and len([t for o in items for t in o.new_token_ids]) == 16
    assert later[-1].finished
    assert stats["pages_free"] == stats["pages_total"]


def test_abort_from_another_task_ends_the_stream_and_frees_pages(model):
    async def main():
        async with AsyncLLM(make_engine(model)) as llm:
            two = asyncio.Event()
            items = []

            async def consume():
                async for out in llm.generate(prompts(1)[0], greedy(200), request_id="victim"):
                    items.append(out)
                    if len(items) == 2:
                        two.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(two.wait(), TIMEOUT)
            aborted = await llm.abort("victim")
            await asyncio.wait_for(task, TIMEOUT)  # the stream ends by itself
            again = await llm.abort("victim")
            freed = await wait_until(lambda: pool_full(llm))
            return aborted, again, items, freed, llm.stats()

    aborted, again, items, freed, stats = asyncio.run(main())
    assert aborted and not again
    assert items[-1].finished and items[-1].finish_reason == "abort"
    assert sum(len(o.new_token_ids) for o in items) < 200
    assert freed and stats["counters"]["aborted"] == 1


def test_engine_crash_fails_every_stream_and_later_calls(model):
    engine = make_engine(model)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("boom in step")
        return real_step()

    engine.step = flaky_step

    async def main():
        llm = AsyncLLM(engine).start()
        res = await asyncio.wait_for(
            asyncio.gather(*(collect(llm, p, greedy(100)) for p in prompts(3)), return_exceptions=True), TIMEOUT)
        with pytest.raises(RuntimeError, match="boom in step"):
            await collect(llm, [1, 2], greedy(3))
        healthy, stats = llm.is_healthy, llm.stats()
        await llm.shutdown()
        return res, healthy, stats

    res, healthy, stats = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "boom in step" in str(r) for r in res), res
    assert isinstance(res[0].__cause__, ValueError)
    assert not healthy and not stats["healthy"] and "boom" in stats["error"]


def test_shutdown_ends_open_streams_and_refuses_new_requests(model):
    async def main():
        llm = AsyncLLM(make_engine(model)).start()
        first = asyncio.Event()
        items = []

        async def consume():
            async for out in llm.generate([1, 2, 3], greedy(200)):
                items.append(out)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), TIMEOUT)
        await asyncio.wait_for(llm.shutdown(), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
        with pytest.raises(RuntimeError, match="shut down"):
            await collect(llm, [1], greedy(2))
        return items, llm.stats(), llm.is_healthy

    items, stats, healthy = asyncio.run(main())
    assert items[-1].finished and items[-1].finish_reason == "abort"
    assert stats["pages_free"] == stats["pages_total"] and not healthy


def test_idle_loop_blocks_instead_of_spinning(model):
    llm = AsyncLLM(make_engine(model)).start()
    try:
        asyncio.run(collect(llm, [1, 2, 3], greedy(4)))
        clock = time.pthread_getcpuclockid(llm._thread.ident)  # the engine loop thread's CPU time
        cpu0 = time.clock_gettime(clock)
        time.sleep(0.3)
        busy = time.clock_gettime(clock) - cpu0
        assert busy < 0.05, busy
    finally:
        llm.close()
    assert llm.stats()["pages_free"] == llm.stats()["pages_total"]


def test_max_waiting_must_be_a_non_negative_integer(model):
    with pytest.raises(ConfigError, match="max_waiting"):
        AsyncLLM(make_engine(model), max_waiting=-1)
