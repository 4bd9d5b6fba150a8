"""Running one HTTP request's engine requests: admission, merging, cancellation and shutdown.

Why it exists: every generation endpoint does the same things with its `AsyncLLM` streams, whatever
its wire format, and each is easy to get subtly wrong, so they are written once here:

- admission (`RequestRunner.admit`): all or none, after the fan-out checks (prompts x n against
  `max_seqs_per_request` and against what the engine can ever hold), while accepting;
- merging (`merged`): the choices' outputs in arrival order, ending with `Expired` when the
  shutdown timeout runs out;
- non-streaming (`collect`): races the work against the client leaving (which aborts everything)
  and maps failures to HTTP errors;
- streaming (`stream_events`, `SSEResponse`): SSE lines that end with an `error` event where needed,
  the usage chunk and `[DONE]`; a client that leaves, even before the first byte, aborts everything;
- `Lifecycle`: graceful shutdown (drain, then expire).
Cleanup never awaits (`close_all`): inside a cancelled scope every await would be cancelled again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from idlm.engine.async_engine import AsyncLLM, RequestStream
from idlm.server import protocol as P
from idlm.server.metrics import ServerMetrics


class Lifecycle:
    """Graceful shutdown of one app. `drain(timeout)` may be called from a signal handler: new
    generation requests get 503 at once, and `timeout` seconds later `expired` is set, which ends
    every open response with an error (their requests are aborted)."""

    def __init__(self):
        self.draining = False
        self.expired = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts

    def drain(self, timeout: float) -> None:
        self.draining = True
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        if timeout <= 0:
            loop.call_soon_threadsafe(self.expired.set)
        else:
            loop.call_soon_threadsafe(loop.call_later, timeout, self.expired.set)


class ClientGone(Exception):
    """The client disconnected (during upload or while its response was being computed)."""


class Expired(Exception):
    """The shutdown timeout ran out while this response was open."""


def close_all(streams: list[RequestStream]) -> None:
    """Abort every unfinished request. Synchronous on purpose: it must run to the end even inside a
    cancelled scope (a client that left), where every await would be cancelled again."""
    for s in streams:
        s.close()


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Timer:
    """TTFT / TPOT / generated tokens of one choice."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.t0, self.first = metrics, time.perf_counter(), None

    def saw(self, item) -> None:
        if self.first is None and item.new_token_ids:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.t0)
        if item.finished:
            n = len(item.output.token_ids)
            self.metrics.generation_tokens.inc(n)
            if n > 1 and self.first is not None:
                self.metrics.tpot.observe((time.perf_counter() - self.first) / (n - 1))


class RequestRunner:
    def __init__(self, llm: AsyncLLM, metrics: ServerMetrics, lifecycle: Lifecycle, max_seqs_per_request: int):
        self.llm, self.metrics, self.life = llm, metrics, lifecycle
        self.max_seqs_per_request = max_seqs_per_request

    def check_accepting(self) -> None:
        if self.life.draining:
            raise P.shutting_down()
        if not self.llm.is_healthy:
            raise P.engine_dead()

    def check_fanout(self, count: int) -> None:
        """Refuse, before any tokenizing, a request starting more sequences (prompts x n) than allowed."""
        if count > self.max_seqs_per_request:
            raise P.ApiError(400, f"this request would start {count} sequences (prompts x n); the server "
                                  f"allows {self.max_seqs_per_request} per request", param="n",
                             code="too_many_sequences")
        cap = self.llm.capacity
        if cap is not None and count > cap:
            raise P.ApiError(400, f"this request needs {count} sequences at once but the server holds at most "
                                  f"{cap} (running + waiting); it could never run", param="n",
                             code="too_many_sequences")

    async def admit(self, endpoint: str, jobs: list[tuple[list[int], Any]]) -> list[RequestStream]:
        """Queue every job of one request, all or none; errors become HTTP errors."""
        try:
            self.check_accepting()
            self.check_fanout(len(jobs))
            return await self.llm.add_requests(jobs)
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                self.metrics.requests.labels(endpoint, P.outcome(e)).inc()
            raise P.map_engine_error(e) from None

    async def merged(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, RequestOutput) from every stream in arrival order, until all finished;
        raises Expired when the shutdown timeout runs out, and a stream's own error."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream):
            try:
                async for item in s:
                    q.put_nowait((i, item))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait((i, e))

        async def watch():
            await self.life.expired.wait()
            q.put_nowait((-1, Expired()))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)] + [asyncio.create_task(watch())]
        left = len(streams)
        try:
            while left:
                i, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                left -= item.finished
        finally:
            for t in tasks:  # no await here: see close_all
                t.cancel()

    async def collect(self, request: Request, endpoint: str, streams: list[RequestStream]) -> list:
        """Non-streaming: every request to its end -> finished outputs; the client leaving aborts them."""
        timers = [_Timer(self.metrics) for _ in streams]
        outs: list = [None] * len(streams)

        async def run():
            async for i, item in self.merged(streams):
                timers[i].saw(item)
                if item.finished:
                    outs[i] = item.output

        work, gone = asyncio.create_task(run()), asyncio.create_task(wait_disconnect(request))
        result = "success"
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                result = "disconnected"
                raise ClientGone()
            try:
                work.result()
            except Expired:
                result = "shutdown"
                raise P.shutting_down() from None
            except RuntimeError as e:
                result = "error"
                raise P.map_engine_error(e) from None
            failed = next((o for o in outs if o.finish_reason == "error"), None)
            if failed is not None:
                result = "error"
                raise P.server_error(f"the request failed in the engine: {failed.error}", code="request_failed")
            return outs
        finally:
            for t in (work, gone):
                t.cancel()
            close_all(streams)
            self.metrics.requests.labels(endpoint, result).inc()

    async def stream_events(self, endpoint: str, streams: list[RequestStream], render, chunk,
                            usage_prompt_tokens: int | None) -> AsyncIterator[str]:
        """Streaming: SSE lines from `render(i, item)` for every output; the stream ends with the usage
        chunk (`usage_prompt_tokens` not None: stream_options.include_usage) and `data: [DONE]`, after an
        `error` event if the request failed, the engine died or the server is shutting down. Closing
        the generator (client gone) aborts every unfinished request."""
        timers = [_Timer(self.metrics) for _ in streams]
        result = "disconnected"  # unless we reach the end
        completion_tokens = 0
        try:
            try:
                async for i, item in self.merged(streams):
                    timers[i].saw(item)
                    if item.finished:
                        completion_tokens += len(item.output.token_ids)
                        if item.output.finish_reason == "error":
                            raise P.server_error(f"the request failed in the engine: {item.output.error}",
                                                 code="request_failed")
                    for line in render(i, item):
                        yield line
                result = "success"
            except Expired:
                result = "shutdown"
                yield sse(P.shutting_down().body())
            except (P.ApiError, RuntimeError) as e:
                result = "error"
                err = e if isinstance(e, P.ApiError) else P.map_engine_error(e)
                yield sse(err.body())
            if usage_prompt_tokens is not None:
                yield chunk([], P.usage(usage_prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            close_all(streams)
            self.metrics.requests.labels(endpoint, result).inc()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that watches for the client leaving from the first byte on (whatever the ASGI
    spec version) and always closes its body iterator, so an abandoned stream aborts its requests at once.
    `on_close` (synchronous) runs at the end even if the iterator never started."""

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client left while we were sending
                    tg.cancel_scope.cancel()

                async def watch():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.body_iterator.aclose()
                except Exception:  # noqa: BLE001 - closing an abandoned stream must not raise
                    pass
            if self._on_close is not None:
                self._on_close()
