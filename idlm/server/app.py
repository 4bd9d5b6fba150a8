"""The FastAPI app: OpenAI `/v1/completions` and `/v1/chat/completions` on top of `AsyncLLM`.

Why it exists: it is the one place that maps the OpenAI wire format onto idlm's `SamplingParams` and
`AsyncLLM.generate` streams and back (JSON or SSE), and that maps every failure onto an OpenAI-style
error body with the right HTTP status, so one bad request never takes the server down:

- 400: malformed JSON, wrong types, bad sampling values, prompt + max_tokens beyond the context
  (a too-long prompt is a 400 too, like OpenAI's `context_length_exceeded`), a `stride` other than
  the server's;
- 401: missing/wrong `Authorization: Bearer <key>` when an API key is set (all but /health);
- 404: unknown model; 413: body larger than `max_body_bytes` (Content-Length or actual bytes);
- 429: the engine queue is full (`QueueFullError`); 503: the engine loop is dead.

A streaming client that disconnects cancels the response task; the cancelled `AsyncLLM.generate`
aborts its request in its `finally`, so its KV pages are freed. `/metrics` serves Prometheus text
from a registry private to each app.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError

from idlm.decoding.sampling import SamplingParams
from idlm.engine.async_engine import AsyncLLM, QueueFullError
from idlm.errors import ConfigError, IdlmError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # capped by what is left of the context


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(status: int, message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status)


# --------------------------------------------------------------------------- request bodies


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None
    # idlm decoder options
    stride: int | None = None
    draft: str | None = None
    verify_alpha: float | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None


class _BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes", param=None, code="request_too_large")


class _GuardMiddleware:
    """Pure ASGI: API key check (all but /health) and the body size bound (Content-Length and actual bytes)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") != "/health":
            auth = headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                msg = "missing API key" if not auth else "invalid API key"
                resp = JSONResponse(_error_body(401, f"{msg}: send 'Authorization: Bearer <key>'",
                                                "authentication_error", None, "invalid_api_key"), status_code=401)
                return await resp(scope, receive, send)
        cl = headers.get("content-length")
        if cl is not None:
            try:
                too_big = int(cl) > self.max_body_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await _error_response(_BodyTooLarge(self.max_body_bytes))(scope, receive, send)
        seen = 0
        limit = self.max_body_bytes

        async def bounded_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return msg

        return await self.app(scope, bounded_receive, send)


# --------------------------------------------------------------------------- metrics


class _Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("idlm_requests", "HTTP generation requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("idlm_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("idlm_generation_tokens", "generated (emitted) tokens", registry=r)
        self.ttft = Histogram("idlm_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("idlm_time_per_output_token_seconds", "time per output token after the first",
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        g = {}
        for name, doc in (("running_requests", "requests running in the engine"),
                          ("waiting_requests", "requests waiting for a seat"),
                          ("kv_pages_used", "KV cache pages in use"), ("kv_pages_free", "free KV cache pages"),
                          ("kv_pages_total", "KV cache pages in the pool"),
                          ("decode_forwards", "decode forward passes so far"),
                          ("prefill_forwards", "prefill forward passes so far"),
                          ("engine_generated_tokens", "tokens generated by the engine so far"),
                          ("tokens_per_forward", "generated tokens per batched decode forward"),
                          ("tpf", "tokens per forward of finished requests: committed / per-request decode forwards"),
                          ("engine_healthy", "1 while the engine loop is alive")):
            g[name] = Gauge(f"idlm_{name}", doc, registry=r)
        self.gauges = g
        self.drafted = Gauge("idlm_draft_verified", "drafts verified by draft position (finished requests)",
                             ["position"], registry=r)
        self.accepted = Gauge("idlm_draft_accepted", "drafts accepted by draft position (finished requests)",
                              ["position"], registry=r)

    def refresh(self, llm: AsyncLLM) -> None:
        s = llm.stats()
        c = s.get("counters", {})
        g = self.gauges
        g["running_requests"].set(s.get("num_running", 0))
        g["waiting_requests"].set(s.get("num_waiting", 0))
        g["kv_pages_used"].set(s.get("pages_used", 0))
        g["kv_pages_free"].set(s.get("pages_free", 0))
        g["kv_pages_total"].set(s.get("pages_total", 0))
        g["decode_forwards"].set(c.get("decode_forwards", 0))
        g["prefill_forwards"].set(c.get("prefill_forwards", 0))
        g["engine_generated_tokens"].set(c.get("generated_tokens", 0))
        df = c.get("decode_forwards", 0)
        g["tokens_per_forward"].set(c.get("generated_tokens", 0) / df if df else 0.0)
        g["engine_healthy"].set(1 if llm.is_healthy else 0)
        d = s.get("decode_stats") or {}
        g["tpf"].set(d.get("tpf", 0.0))
        for j, (v, a) in enumerate(zip(d.get("verified_per_position", []), d.get("accepted_per_position", []))):
            self.drafted.labels(position=str(j)).set(v)
            self.accepted.labels(position=str(j)).set(a)


# --------------------------------------------------------------------------- helpers


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob(p: float) -> float | None:
    if p is None or not p > 0 or p != p:
        return None
    return math.log(p)


async def _merge(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (index, item); cancelling/closing cancels them all."""
    if len(gens) == 1:
        async for item in gens[0]:
            yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, g):
        try:
            async for item in g:
                await q.put((i, item))
            await q.put((i, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    left = len(gens)
    try:
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def build_app(async_llm: AsyncLLM, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
              stride: int | None = None, sampling_defaults: dict | None = None) -> FastAPI:
    """The OpenAI-compatible app. `stride`: the server's stride (a request may only repeat it);
    `sampling_defaults`: per-request defaults for temperature / top_k / top_p / verify_alpha / draft."""
    engine = async_llm.engine
    tok = engine.tokenizer
    max_len = engine.max_model_len
    server_stride = stride if stride is not None else engine.config.stride
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "verify_alpha": 1.0, "draft": "sample",
                **(sampling_defaults or {})}
    metrics = _Metrics()
    created = int(time.time())

    app = FastAPI(title="idlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_llm = async_llm
    app.state.metrics = metrics
    app.add_middleware(_GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _error_response(_from_validation(e.errors()))

    # ------------------------------------------------------------------ parsing

    async def read_body(request: Request, cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise _from_validation(e.errors()) from None

    def check_model(req) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def make_params(req, prompt_len: int, default_max: int | None) -> list[SamplingParams]:
        if req.stride is not None and req.stride != server_stride:
            raise ApiError(400, f"stride={req.stride} is not supported: this server decodes with stride "
                                f"{server_stride} (send {server_stride} or leave it out)", param="stride")
        if isinstance(req.n, bool) or req.n < 1 or req.n > 128:
            raise ApiError(400, f"n={req.n} must be between 1 and 128", param="n")
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else max(1, min(CHAT_DEFAULT_MAX_TOKENS,
                                                                                 max_len - prompt_len))
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
        if prompt_len >= max_len:
            raise ApiError(400, f"the prompt has {prompt_len} tokens but the model's context is {max_len} tokens",
                           param="prompt" if isinstance(req, CompletionRequest) else "messages",
                           code="context_length_exceeded")
        if prompt_len + max_tokens > max_len:
            raise ApiError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} exceeds the model's "
                                f"context of {max_len} tokens", param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        out = []
        for i in range(req.n):
            kw = dict(temperature=defaults["temperature"] if req.temperature is None else req.temperature,
                      top_k=defaults["top_k"] if req.top_k is None else req.top_k,
                      top_p=defaults["top_p"] if req.top_p is None else req.top_p,
                      seed=None if req.seed is None else req.seed + i, max_tokens=max_tokens,
                      stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                      draft=defaults["draft"] if req.draft is None else req.draft,
                      verify_alpha=defaults["verify_alpha"] if req.verify_alpha is None else req.verify_alpha)
            try:
                out.append(SamplingParams(**kw))
            except ConfigError as e:
                name = str(e).split("sampling parameter ", 1)[-1].split("=", 1)[0]
                raise ApiError(400, str(e), param=name if name in kw else None) from None
        return out

    def check_healthy() -> None:
        if not async_llm.is_healthy:
            raise ApiError(503, "the engine is not running", type_="server_error", code="engine_dead")

    # ------------------------------------------------------------------ running

    async def start(jobs: list[tuple[list[int], SamplingParams]], endpoint: str):
        """Start every job and wait for its first output (so request errors become HTTP errors before any
        streaming). Returns [(first RequestOutput, generator, t_start)]."""
        started = []
        try:
            for prompt, params in jobs:
                gen = async_llm.generate(prompt, params, uuid.uuid4().hex)
                started.append((gen, time.perf_counter()))
            firsts = await asyncio.gather(*(gen.__anext__() for gen, _ in started), return_exceptions=True)
            for f in firsts:
                if isinstance(f, BaseException):
                    raise f
        except BaseException as e:
            for gen, _ in started:
                await _close(gen)
            metrics.requests.labels(endpoint, _outcome(e)).inc()
            raise _map_engine_error(e) from None
        now = time.perf_counter()
        for (_, t0), first in zip(started, firsts):
            if first.new_token_ids:
                metrics.ttft.observe(now - t0)
        return [(f, g, t0) for f, (g, t0) in zip(firsts, started)]

    def observe_done(item, t0, t_first) -> None:
        n = len(item.output.token_ids)
        metrics.generation_tokens.inc(n)
        if n > 1 and t_first is not None:
            metrics.tpot.observe((time.perf_counter() - t_first) / (n - 1))

    async def collect(prompt_jobs, endpoint):
        """Non-streaming: every job to completion -> list of finished outputs (GenerationOutput)."""
        started = await start(prompt_jobs, endpoint)

        async def finish(first, gen, t0):
            item, t_first = first, (time.perf_counter() if first.new_token_ids else None)
            while not item.finished:
                item = await gen.__anext__()
                if t_first is None and item.new_token_ids:
                    t_first = time.perf_counter()
                    metrics.ttft.observe(t_first - t0)
            observe_done(item, t0, t_first)
            return item.output

        try:
            outs = await asyncio.gather(*(finish(*s) for s in started), return_exceptions=True)
            for o in outs:
                if isinstance(o, BaseException):
                    raise o
        except BaseException as e:
            for _, gen, _ in started:
                await _close(gen)
            metrics.requests.labels(endpoint, _outcome(e)).inc()
            raise _map_engine_error(e) from None
        metrics.requests.labels(endpoint, "success").inc()
        return outs

    async def stream_items(started, endpoint) -> AsyncIterator[tuple[int, Any]]:
        """Streaming: (choice index, RequestOutput) in arrival order, the first outputs first."""
        t_first: dict[int, float | None] = {}

        async def rest(i, first, gen):
            if first.finished:
                return
            async for item in gen:
                yield item

        gens = [rest(i, f, g) for i, (f, g, _) in enumerate(started)]
        merged = _merge(gens)
        outcome = "success"
        try:
            for i, (first, _, _) in enumerate(started):
                t_first[i] = time.perf_counter() if first.new_token_ids else None
                yield i, first
                if first.finished:
                    observe_done(first, started[i][2], t_first[i])
            async for i, item in merged:
                if t_first[i] is None and item.new_token_ids:
                    t_first[i] = time.perf_counter()
                    metrics.ttft.observe(t_first[i] - started[i][2])
                yield i, item
                if item.finished:
                    observe_done(item, started[i][2], t_first[i])
        except BaseException as e:
            outcome = "disconnected" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else _outcome(e)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await _close(merged)
                for _, gen, _ in started:
                    await _close(gen)
            metrics.requests.labels(endpoint, outcome).inc()

    # ------------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health():
        if not async_llm.is_healthy:
            return _error_response(ApiError(503, "the engine is not running", type_="server_error",
                                            code="engine_dead"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        metrics.refresh(async_llm)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "idlm", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        check_model(req)
        check_healthy()
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise ApiError(400, f"logprobs={req.logprobs} must be between 0 and 20", param="logprobs")
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        ids_list = []
        for pr in prompts:
            ids = tok.encode(pr, add_special_tokens=True) if isinstance(pr, str) else list(pr)
            if not ids:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < engine.model.config.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
            ids_list.append(ids)
        jobs = []
        for ids in ids_list:
            for sp in make_params(req, len(ids), COMPLETION_DEFAULT_MAX_TOKENS):
                jobs.append((ids, sp))
        rid = f"cmpl-{uuid.uuid4().hex}"
        want_lp = req.logprobs is not None

        def lp_block(ids: list[int], probs: list[float], offset0: int) -> dict:
            toks = [tok.decode([t]) for t in ids]
            offs, o = [], offset0
            for t in toks:
                offs.append(o)
                o += len(t)
            return {"tokens": toks, "token_logprobs": [_logprob(q) for q in probs],
                    "top_logprobs": None, "text_offset": offs}

        if not req.stream:
            outs = await collect(jobs, "completions")
            choices = []
            for i, o in enumerate(outs):
                choices.append({"index": i, "text": o.text or "", "finish_reason": _finish(o.finish_reason),
                                "logprobs": lp_block(o.token_ids, o.token_probs, 0) if want_lp else None})
            ptoks = sum(len(j[0]) for j in jobs)
            ctoks = sum(len(o.token_ids) for o in outs)
            metrics.prompt_tokens.inc(ptoks)
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": choices,
                    "usage": _usage(ptoks, ctoks)}

        started = await start(jobs, "completions")
        ptoks = sum(len(j[0]) for j in jobs)
        metrics.prompt_tokens.inc(ptoks)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def sse():
            seen = [0] * len(jobs)
            text_off = [0] * len(jobs)
            ctoks = 0
            async for i, item in stream_items(started, "completions"):
                n0 = seen[i]
                new = item.new_token_ids
                seen[i] = n0 + len(new)
                if not new and not item.new_text and not item.finished:
                    continue
                lp = None
                if want_lp:
                    lp = lp_block(new, item.output.token_probs[n0:n0 + len(new)], text_off[i])
                text_off[i] += len(item.new_text)
                choice = {"index": i, "text": item.new_text, "logprobs": lp,
                          "finish_reason": _finish(item.output.finish_reason) if item.finished else None}
                if item.finished:
                    ctoks += len(item.output.token_ids)
                yield _sse({"id": rid, "object": "text_completion", "created": int(time.time()),
                            "model": model_name, "choices": [choice]})
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                            "choices": [], "usage": _usage(ptoks, ctoks)})
            yield "data: [DONE]\n\n"

        return _SSEResponse(sse())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_body(request, ChatRequest)
        check_model(req)
        check_healthy()
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        messages = []
        for m in req.messages:
            c = m.get("content")
            if isinstance(c, list):  # OpenAI content parts: keep the text ones
                c = "".join(part.get("text", "") for part in c if isinstance(part, dict))
            messages.append({**m, "content": c if c is not None else ""})
        try:
            ids = tok.encode_chat(messages, add_generation_prompt=True)
        except (IdlmError, ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
        except Exception as e:  # jinja2 errors raised by the template
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
        jobs = [(ids, sp) for sp in make_params(req, len(ids), None)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        if not req.stream:
            outs = await collect(jobs, "chat")
            choices = []
            for i, o in enumerate(outs):
                lp = None
                if req.logprobs:
                    lp = {"content": [{"token": tok.decode([t]), "logprob": _logprob(q), "bytes": None,
                                       "top_logprobs": []} for t, q in zip(o.token_ids, o.token_probs)]}
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text or ""},
                                "logprobs": lp, "finish_reason": _finish(o.finish_reason)})
            ptoks = len(ids) * len(jobs)
            ctoks = sum(len(o.token_ids) for o in outs)
            metrics.prompt_tokens.inc(ptoks)
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": choices,
                    "usage": _usage(ptoks, ctoks)}

        started = await start(jobs, "chat")
        ptoks = len(ids) * len(jobs)
        metrics.prompt_tokens.inc(ptoks)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(choices, usage=None):
            d = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                 "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return _sse(d)

        async def sse():
            for i in range(len(jobs)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            ctoks = 0
            async for i, item in stream_items(started, "chat"):
                if not item.new_text and not item.finished:
                    continue
                if item.finished:
                    ctoks += len(item.output.token_ids)
                delta = {"content": item.new_text} if item.new_text else {}
                yield chunk([{"index": i, "delta": delta, "logprobs": None,
                              "finish_reason": _finish(item.output.finish_reason) if item.finished else None}])
            if include_usage:
                yield chunk([], _usage(ptoks, ctoks))
            yield "data: [DONE]\n\n"

        return _SSEResponse(sse())

    return app


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client leaving (whatever the ASGI spec version) and
    always closes its body iterator, so an abandoned stream aborts its engine requests at once."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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
                await _close(self.body_iterator)


async def _close(gen) -> None:
    try:
        await gen.aclose()  # an unfinished AsyncLLM stream aborts its request here
    except (RuntimeError, Exception):
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else ("stop" if reason in ("stop", "abort") else reason)


def _outcome(e: BaseException) -> str:
    if isinstance(e, QueueFullError):
        return "queue_full"
    if isinstance(e, (ConfigError, IdlmError)):
        return "invalid"
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "disconnected"
    return "error"


def _map_engine_error(e: BaseException) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type_="rate_limit_error", code="queue_full")
    if isinstance(e, IdlmError):
        return ApiError(400, str(e))
    if isinstance(e, RuntimeError):
        return ApiError(503, str(e), type_="server_error", code="engine_dead")
    return e


def _from_validation(errors: list) -> ApiError:
    err = errors[0] if errors else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    return ApiError(400, f"invalid value for {'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}", param=param)
