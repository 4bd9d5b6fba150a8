"""The FastAPI app: OpenAI `/v1/completions` and `/v1/chat/completions` (and vLLM's tokenizer routes) on `AsyncLLM`.

Why it exists: it is the endpoints — parse (`protocol.py`), tokenize, admit and run (`runner.py`),
and render each output in its endpoint's wire format — with the guards in `middleware.py` and the
series in `metrics.py`. Its rules:

- no request can hurt the server: the body is parsed strictly, a request is admitted all or none
  (prompts x n capped by `max_seqs_per_request`; one that could never fit the engine's running +
  waiting capacity is a 400, a full queue a 429 with Retry-After), and a failure inside one request's
  engine step fails that request alone (500, or an error event when streaming);
- a response starts as soon as its requests are queued, and a client that leaves — streaming or
  not — has its requests aborted and their KV pages freed;
- statuses: 400 bad input, 401 key, 404 model / route, 408 slow body, 413 body too large, 429 queue
  full, 500 a request failed in the engine, 503 engine dead or shutting down; every error body is
  OpenAI-style JSON (never plain text), and an error after a stream started is an SSE `error` event;
- graceful shutdown (`runner.Lifecycle`): on SIGTERM new requests get 503 while running ones may
  finish for `shutdown_timeout` seconds; then every open response ends with an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import idlm
from idlm.engine.async_engine import AsyncLLM
from idlm.errors import IdlmError
from idlm.server import protocol as P
from idlm.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from idlm.server.middleware import GuardMiddleware, error_response
from idlm.server.runner import ClientGone, Lifecycle, RequestRunner, SSEResponse, close_all, sse

logger = logging.getLogger("idlm.server")

DEFAULT_MAX_SEQS_PER_REQUEST = 256


def build_app(async_llm: AsyncLLM, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
              stride: int | None = None, sampling_defaults: dict | None = None,
              max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST, body_timeout: float = 30.0,
              lifecycle: Lifecycle | None = None) -> FastAPI:
    """The OpenAI-compatible app. `stride`: the server's stride (a request may only repeat it);
    `sampling_defaults`: per-request defaults for temperature / top_k / top_p / verify_alpha / draft /
    draft_temperature / verification;
    `max_seqs_per_request`: the most sequences (prompts x n) one request may start."""
    engine = async_llm.engine
    tok = engine.tokenizer
    max_len = engine.max_model_len
    vocab = engine.model.config.vocab_size
    server_stride = stride if stride is not None else engine.config.stride
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "verify_alpha": 1.0, "draft": "sample",
                **(sampling_defaults or {})}
    metrics = ServerMetrics()
    life = lifecycle or Lifecycle()
    runner = RequestRunner(async_llm, metrics, life, max_seqs_per_request)
    tt = P.TokenText(tok)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        life.loop = asyncio.get_running_loop()
        yield

    app = FastAPI(title="idlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.async_llm, app.state.metrics, app.state.lifecycle = async_llm, metrics, life
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, e: P.ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(P.from_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        what = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return error_response(P.ApiError(e.status_code, what.get(e.status_code, str(e.detail)),
                                         code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; no traceback for a client that left

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(P.server_error(f"internal error: {type(e).__name__}"))

    # ------------------------------------------------------------------ parsing

    async def read_json(request: Request) -> dict:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientGone() from None
        try:
            data = json.loads(raw)
        except RecursionError:
            raise P.ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise P.ApiError(400, "the request body must be a JSON object", code="invalid_json")
        P.check_json(data)
        return data

    async def read_body(request: Request, cls):
        data = await read_json(request)
        P.check_unsupported(data)
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            raise P.from_validation(e.errors()) from None
        if req.model is not None and req.model != model_name:
            raise P.ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                             param="model", code="model_not_found")
        return req

    def check_ids(ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.ApiError(400, f"token id {bad} is outside the vocabulary (size {vocab})", param=param)

    def encode_chat(messages: list[P.ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        try:
            return tok.encode_chat([m.as_template_message() for m in messages], add_generation_prompt)
        except (IdlmError, ValueError, TypeError, KeyError) as e:
            raise P.ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None

    # ------------------------------------------------------------------ info routes

    @app.get("/health")
    async def health():
        if not async_llm.is_healthy:
            return error_response(P.engine_dead())
        if life.draining:
            return error_response(P.shutting_down())
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(async_llm, life.draining), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": idlm.__version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "idlm", "max_model_len": max_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        st = tok.special_tokens
        return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                "eos_token": st.get("eos_token"), "bos_token": st.get("bos_token"), "pad_token": st.get("pad_token"),
                "unk_token": st.get("unk_token"), "add_bos_token": tok.add_bos_token,
                "chat_template": tok.chat_template, "vocab_size": vocab}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await read_body(request, P.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise P.ApiError(400, "send exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            ids = tok.encode_prompt(req.prompt) if req.add_special_tokens else tok.encode(req.prompt)
        else:
            ids = encode_chat(req.messages, req.add_generation_prompt)
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await read_body(request, P.DetokenizeRequest)
        check_ids(req.tokens, "tokens")
        return {"prompt": tok.decode(req.tokens)}

    # ------------------------------------------------------------------ completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, P.CompletionRequest)
        runner.check_accepting()
        prompts = req.prompts()
        if not prompts:
            raise P.ApiError(400, "prompt must not be empty", param="prompt")
        runner.check_fanout(len(prompts) * req.n)
        ids_list, texts = [], []
        for pr in prompts:
            ids = tok.encode_prompt(pr) if isinstance(pr, str) else list(pr)
            if not ids:
                raise P.ApiError(400, "prompt must not be empty", param="prompt")
            check_ids(ids, "prompt")
            ids_list.append(ids)
            texts.append(pr if isinstance(pr, str) else tok.decode(ids))
        jobs, owner = [], []  # owner[choice index] = prompt index
        for k, ids in enumerate(ids_list):
            for sp in P.to_sampling_params(req, len(ids), max_len, server_stride=server_stride, defaults=defaults,
                                           default_max_tokens=P.COMPLETION_DEFAULT_MAX_TOKENS):
                jobs.append((ids, sp))
                owner.append(k)
        ptoks = sum(len(ids) for ids in ids_list)  # each prompt once, whatever n is
        streams = await runner.admit("completions", jobs)
        metrics.prompt_tokens.inc(ptoks)
        rid, want_lp = f"cmpl-{uuid.uuid4().hex}", req.logprobs is not None

        def prompt_part(i: int, out) -> tuple[str, dict | None]:
            """The echoed prompt of choice i: its text and (with logprobs) its logprobs block."""
            k = owner[i]
            if not want_lp:
                return texts[k], None
            ids = ids_list[k]
            lps = out.prompt_logprobs if len(out.prompt_logprobs) == len(ids) else [None] * len(ids)
            tops = out.prompt_top_logprobs if len(out.prompt_top_logprobs) == len(ids) else [[]] * len(ids)
            return texts[k], P.completion_logprobs(tt, ids, lps, tops)

        def gen_logprobs(out, n0: int, n1: int, offset0: int) -> dict:
            return P.completion_logprobs(tt, out.token_ids[n0:n1], out.logprobs[n0:n1], P.top_or_empty(out, n0, n1),
                                         offset0)

        if not req.stream:
            outs = await runner.collect(request, "completions", streams)
            choices = []
            for i, o in enumerate(outs):
                text, lp = o.text or "", None
                if req.echo:
                    ptext, plp = prompt_part(i, o)
                    text = ptext + text
                if want_lp:
                    lp = gen_logprobs(o, 0, len(o.token_ids), len(ptext) if req.echo else 0)
                    if req.echo:
                        lp = {key: plp[key] + lp[key] for key in lp}
                choices.append({"index": i, "text": text, "logprobs": lp,
                                "finish_reason": P.finish_reason(o.finish_reason)})
            return P.envelope(rid, "text_completion", model_name, choices,
                              P.usage(ptoks, sum(len(o.token_ids) for o in outs)))

        seen, offset, started = [0] * len(jobs), [0] * len(jobs), [False] * len(jobs)

        def chunk(choices: list, usage_: dict | None = None) -> str:
            return sse(P.envelope(rid, "text_completion", model_name, choices, usage_))

        def render(i, item):
            out = item.output
            if req.echo and not started[i]:
                started[i] = True
                ptext, plp = prompt_part(i, out)
                offset[i] = len(ptext)
                yield chunk([{"index": i, "text": ptext, "logprobs": plp, "finish_reason": None}])
            n0, n1 = seen[i], seen[i] + len(item.new_token_ids)
            seen[i] = n1
            if not item.new_text and not item.finished and not (want_lp and n1 > n0):
                return  # nothing to show (a step's text may come with the next step's, docs/engine.md)
            lp = gen_logprobs(out, n0, n1, offset[i]) if want_lp else None
            offset[i] += len(item.new_text)
            yield chunk([{"index": i, "text": item.new_text, "logprobs": lp,
                          "finish_reason": P.finish_reason(out.finish_reason) if item.finished else None}])

        events = runner.stream_events("completions", streams, render, chunk, ptoks if include_usage(req) else None)
        return SSEResponse(events, on_close=lambda: close_all(streams))

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_body(request, P.ChatRequest)
        runner.check_accepting()
        runner.check_fanout(req.n)
        ids = encode_chat(req.messages)
        params = P.to_sampling_params(req, len(ids), max_len, server_stride=server_stride, defaults=defaults,
                                      default_max_tokens=None)
        streams = await runner.admit("chat", [(ids, sp) for sp in params])
        metrics.prompt_tokens.inc(len(ids))
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs(out, n0: int, n1: int) -> dict | None:
            if not req.logprobs:
                return None
            return P.chat_logprobs(tt, out.token_ids[n0:n1], out.logprobs[n0:n1], P.top_or_empty(out, n0, n1))

        if not req.stream:
            outs = await runner.collect(request, "chat", streams)
            choices = [{"index": i, "message": {"role": "assistant", "content": o.text or ""},
                        "logprobs": logprobs(o, 0, len(o.token_ids)), "finish_reason": P.finish_reason(o.finish_reason)}
                       for i, o in enumerate(outs)]
            return P.envelope(rid, "chat.completion", model_name, choices,
                              P.usage(len(ids), sum(len(o.token_ids) for o in outs)))

        seen = [0] * len(streams)

        def chunk(choices: list, usage_: dict | None = None) -> str:
            return sse(P.envelope(rid, "chat.completion.chunk", model_name, choices, usage_))

        def render(i, item):
            out = item.output
            n0, n1 = seen[i], seen[i] + len(item.new_token_ids)
            seen[i] = n1
            if not item.new_text and not item.finished and not (req.logprobs and n1 > n0):
                return
            delta = {"content": item.new_text} if item.new_text else {}
            yield chunk([{"index": i, "delta": delta, "logprobs": logprobs(out, n0, n1),
                          "finish_reason": P.finish_reason(out.finish_reason) if item.finished else None}])

        async def with_roles():
            events = runner.stream_events("chat", streams, render, chunk, len(ids) if include_usage(req) else None)
            try:
                for i in range(len(streams)):  # the role first, at once: the response starts before any token
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for line in events:
                    yield line
            finally:
                await events.aclose()

        return SSEResponse(with_roles(), on_close=lambda: close_all(streams))

    return app




def include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
