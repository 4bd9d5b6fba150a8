"""An asyncio streaming front-end for the synchronous `LLMEngine` (the server's engine).

Why it exists: the HTTP server streams each request's committed tokens to its client as soon as an
engine step commits them, while many clients arrive and leave at any time. `LLMEngine` is a plain,
single-threaded step loop and is not thread-safe, and a step blocks for a whole forward pass, so it
cannot run on the event loop. `AsyncLLM` therefore gives the engine to one background thread, the
*engine loop*, which alone ever touches it:

- asyncio callers never call the engine; they put commands (add / abort / stop) on a thread-safe
  queue. Before every step the loop thread drains that queue, so requests join and leave between
  steps (continuous batching), and when no request is unfinished it blocks on the queue (no spin);
- each request owns an `asyncio.Queue` on its caller's event loop; after a step the loop thread hands
  every `RequestOutput` to its request's queue with `loop.call_soon_threadsafe`;
- admission runs in the loop thread too and its outcome comes back through a future, so an
  invalid request (`ConfigError`, ...) or a full queue (`QueueFullError`, HTTP 429) is raised to the
  caller before any output, and the engine state never needs a lock. `add_requests` admits several
  requests (an HTTP request's prompts x n) all or none, and returns as soon as they are queued, so a
  server can start its response (and watch for the client leaving) before any token exists;
- a consumer that stops early (breaks out of `async for`, is cancelled, disconnects) aborts its
  request in a `finally`, so its KV pages are freed at the next drain;
- a request whose step fails inside the engine is finished alone with finish_reason "error"
  (`LLMEngine` isolates it); if the loop thread itself crashes, the crash is logged, every pending
  stream raises `RuntimeError` naming the cause, later calls fail at once, `is_healthy` turns false
  and the `on_death` callbacks run (the server uses one to exit non-zero);
- `stats()` reads a snapshot the loop thread publishes after every iteration (never the live engine).

A `RequestOutput`'s `new_token_ids` / `new_text` are owned by the consumer; its `output` is the
request's live `GenerationOutput`, complete (with `text`, when there is a tokenizer) once `finished`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import LLMEngine, RequestOutput
from idlm.errors import ConfigError, IdlmError

logger = logging.getLogger("idlm.engine")


class QueueFullError(IdlmError):
    """Too many requests are waiting for a seat in the engine (the server answers HTTP 429)."""


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs go: a queue on its caller's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seq: object | None = None  # the engine's Sequence, set by the loop thread on admission


@dataclass
class _Failure:
    """Put on a stream when the engine loop died."""
    error: BaseException


@dataclass
class _Add:
    """Admit these requests, all or none."""
    jobs: list[tuple[object, SamplingParams | None, str]]  # (prompt, params, request id)
    streams: list[_Stream]
    future: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str
    stream: _Stream | None = None  # set: abort only while this very stream is live (consumer left)
    future: concurrent.futures.Future | None = None


_STOP = object()


class AsyncLLM:
    """One engine, one background thread stepping it, any number of asyncio streams."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 on_death: Callable[[BaseException], None] | None = None):
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 0):
            raise ConfigError(f"invalid max_waiting={max_waiting!r}: must be an integer >= 0 or None",
                              param="max_waiting")
        self.engine = engine
        self.max_waiting = max_waiting
        # called (from the loop thread) once if the engine loop crashes
        self.on_death: list[Callable[[BaseException], None]] = [on_death] if on_death else []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders start/stop/death against command submission
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None
        # loop-thread state (only the loop thread touches these once started)
        self._streams: dict[str, _Stream] = {}
        self._backlog = False  # the last step left requests waiting (no seat or no pages)
        self._steps = 0
        self._outbox: list[tuple[_Stream, object]] = []  # items for the streams, handed over after _publish
        self._snapshot: dict = {}
        self._publish()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> AsyncLLM:
        with self._lock:
            if self._closed:
                raise RuntimeError("AsyncLLM was shut down; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idlm-engine-loop", daemon=True)
                self._thread.start()
        return self

    def _begin_stop(self) -> threading.Thread | None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._thread is not None and self._error is None:
                    self._commands.put(_STOP)
            return self._thread

    async def shutdown(self) -> None:
        """Abort every unfinished request (their streams end with finish_reason "abort") and stop the loop."""
        thread = self._begin_stop()
        if thread is not None and thread is not threading.current_thread():
            await asyncio.to_thread(thread.join)

    def close(self, timeout: float | None = None) -> None:
        """`shutdown` for synchronous code (blocks until the loop thread has stopped)."""
        thread = self._begin_stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def __aenter__(self) -> AsyncLLM:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    @property
    def is_healthy(self) -> bool:
        """True until the engine loop crashed or the front-end was shut down."""
        t = self._thread
        return self._error is None and not self._closed and (t is None or t.is_alive())

    def stats(self) -> dict:
        """A snapshot published by the loop thread: KV usage, engine counters, running/waiting counts."""
        return dict(self._snapshot)

    # ----------------------------------------------------------------- requests

    def _submit(self, cmd) -> None:
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"the engine loop died: {self._error!r}") from self._error
            if self._closed:
                raise RuntimeError("AsyncLLM was shut down")
            self._commands.put(cmd)

    def _submit_quietly(self, cmd) -> None:
        try:
            self._submit(cmd)
        except RuntimeError:
            pass  # nothing to abort in a dead or stopped engine

    @property
    def capacity(self) -> int | None:
        """The most requests that can be in the engine at once (running + waiting); None: unbounded."""
        return None if self.max_waiting is None else self.engine.config.max_num_seqs + self.max_waiting

    async def add_requests(self, jobs: list[tuple[str | list[int], SamplingParams | None]],
                           request_ids: list[str] | None = None) -> list[RequestStream]:
        """Admit several requests, all or none, and return their streams as soon as they are queued.

        Raises the engine's validation error (`ConfigError`, ...; nothing is queued) or
        `QueueFullError` (they would not all fit under `max_waiting`), and `RuntimeError` if the
        engine loop is dead. Closing a stream (or cancelling this call) aborts its request.
        """
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        rids = [uuid.uuid4().hex for _ in jobs] if request_ids is None else [str(r) for r in request_ids]
        if len(rids) != len(jobs):
            raise ConfigError(f"{len(jobs)} requests but {len(rids)} request ids")
        streams = [_Stream(loop, asyncio.Queue()) for _ in jobs]
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Add([(p, sp, r) for (p, sp), r in zip(jobs, rids)], streams, fut))
        try:
            await asyncio.wrap_future(fut)
        except BaseException:
            if not (fut.cancelled() or (fut.done() and fut.exception() is not None)):
                # cancelled while (or after) being admitted: the aborts follow the add in the queue
                for rid, stream in zip(rids, streams):
                    self._submit_quietly(_Abort(rid, stream))
            raise
        return [RequestStream(self, rid, stream) for rid, stream in zip(rids, streams)]

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its `RequestOutput`s as steps commit tokens, the last one finished.

        Raises the engine's validation error (`ConfigError`, ...) or `QueueFullError` before any
        output, and `RuntimeError` if the engine loop is (or becomes) dead. Leaving early aborts the request.
        """
        (stream,) = await self.add_requests([(prompt, params)], None if request_id is None else [request_id])
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id; its stream ends with finish_reason "abort". False if unknown or finished."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._submit(_Abort(str(request_id), None, fut))
        except RuntimeError:
            return False
        return await asyncio.wrap_future(fut)

    # ----------------------------------------------------------------- the engine loop (its own thread)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                cmds = [] if engine.has_unfinished() else [self._commands.get()]  # idle: block
                while True:
                    try:
                        cmds.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for cmd in cmds:
                    if cmd is _STOP:
                        self._stop_all()
                        return
                    if isinstance(cmd, _Add):
                        self._do_add(cmd)
                    else:
                        self._do_abort(cmd)
                if engine.has_unfinished():
                    outs = engine.step()
                    self._steps += 1
                    self._backlog = engine.num_waiting > 0
                    for out in outs:
                        self._route(out)
                # publish first: a caller that sees an output then sees stats at least as new
                self._publish()
                if self._flush():
                    self._publish()
        except BaseException as e:  # noqa: BLE001 - any crash must reach the callers
            self._die(e)

    def _queued_after(self, m: int) -> int:
        """Requests queued but not about to run once m more are added. Requests added since the last
        step count as running while seats are free and nothing was left waiting by that step (they
        will be admitted next step, unless KV pages run short, which the next step reveals)."""
        eng = self.engine
        if self._backlog:
            return eng.num_waiting + m
        return max(0, eng.num_waiting + m - max(0, eng.config.max_num_seqs - eng.num_running))

    def _do_add(self, cmd: _Add) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return  # the caller was cancelled before we got here
        try:
            if self.max_waiting is not None and self._queued_after(len(cmd.jobs)) > self.max_waiting:
                raise QueueFullError(f"too many requests waiting (max_waiting={self.max_waiting}); retry later")
            rids = self.engine.add_requests(cmd.jobs)  # all or none: a failure leaves the engine unchanged
        except Exception as e:
            cmd.future.set_exception(e)
            return
        for rid, stream in zip(rids, cmd.streams):
            stream.seq = self.engine.seqs[rid]
            self._streams[rid] = stream
        cmd.future.set_result(rids)

    def _do_abort(self, cmd: _Abort) -> None:
        stream = self._streams.get(cmd.request_id)
        if cmd.stream is not None and stream is not cmd.stream:
            return  # that consumer's request was never added or has already finished
        ok = self.engine.abort_request(cmd.request_id)
        if stream is not None:
            self._end(cmd.request_id, stream)
        if cmd.future is not None and cmd.future.set_running_or_notify_cancel():
            cmd.future.set_result(ok)

    def _end(self, rid: str, stream: _Stream) -> None:
        """Close an aborted request's stream with a final, finished output."""
        del self._streams[rid]
        self._outbox.append((stream, RequestOutput(rid, [], "", True, stream.seq.output)))

    def _route(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
            if self.engine.tokenizer is not None:
                out.output.text = stream.seq.checker.text
        self._outbox.append((stream, out))

    def _flush(self) -> bool:
        """Hand the outbox to the event loops; True if a request lost its listener and was aborted."""
        aborted = False
        for stream, item in self._outbox:
            if self._put(stream, item) or item.finished:
                continue
            rid = item.request_id  # its event loop is closed: nobody listens any more
            if self._streams.get(rid) is stream:
                del self._streams[rid]
                aborted |= self.engine.abort_request(rid)
        self._outbox.clear()
        return aborted

    @staticmethod
    def _put(stream: _Stream, item) -> bool:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            return True
        except RuntimeError:  # event loop closed
            return False

    def _stop_all(self) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort_request(rid)
            self._end(rid, stream)
        self._publish()
        self._flush()

    def _die(self, error: BaseException) -> None:
        logger.error("the engine loop died; every request fails from now on", exc_info=error)
        with self._lock:  # no command can be queued after this
            self._error = error
            self._snapshot = {**self._snapshot, "healthy": False, "error": repr(error)}
        # every open stream fails, including those whose last output was routed but not handed over
        streams = {id(s): s for s, _ in self._outbox} | {id(s): s for s in self._streams.values()}
        self._outbox.clear()
        self._streams.clear()
        for stream in streams.values():
            self._put(stream, _Failure(error))
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            fut = getattr(cmd, "future", None)
            if fut is not None and fut.set_running_or_notify_cancel():
                if isinstance(cmd, _Add):
                    fut.set_exception(RuntimeError(f"the engine loop died: {error!r}"))
                else:
                    fut.set_result(False)
        for callback in self.on_death:
            try:
                callback(error)
            except Exception:  # noqa: BLE001 - a callback must not hide the death
                logger.exception("an on_death callback failed")

    def _publish(self) -> None:
        eng = self.engine
        self._snapshot = {**eng.kv_usage(), "num_running": eng.num_running, "num_waiting": eng.num_waiting,
                          "num_streams": len(self._streams), "steps": self._steps,
                          "counters": dict(eng.counters), "decode_stats": eng.decode_stats.to_dict(),
                          "healthy": self._error is None, "error": None}


class RequestStream:
    """One admitted request's outputs, an async iterator whose last item is finished.

    Raises `RuntimeError` if the engine loop dies. `aclose()` before the end aborts the request (its
    KV pages are freed at the next drain); a consumer should call it in a `finally`.
    """

    def __init__(self, llm: AsyncLLM, request_id: str, stream: _Stream):
        self.request_id = request_id
        self._llm, self._stream = llm, stream
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, _Failure):
            self._done = True
            raise RuntimeError(f"the engine loop died: {item.error!r}") from item.error
        self._done = item.finished
        return item

    @property
    def done(self) -> bool:
        return self._done

    def close(self) -> None:
        """Abort the request unless it finished (synchronous: safe in any cleanup path)."""
        if not self._done:
            self._done = True
            self._llm._submit_quietly(_Abort(self.request_id, self._stream))

    async def aclose(self) -> None:
        self.close()
