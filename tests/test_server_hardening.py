"""No request can hurt the server: one regression test per defect found by trying `idlm serve` as a hostile
or careless client would (issue "Server: no request can hurt the server").

Each test sends the request that used to break something and then checks the server is whole: a
normal request succeeds and /metrics shows nothing running and every KV page free
(`servers.assert_still_serving`). A real uvicorn server with the embedded idlm-tiny on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import threading
import time

import httpx
import pytest
from faults import POISON_SEED, poisoned_step
from servers import assert_still_serving, free_port, metric, serving, start_serve, wait_healthy, wait_idle

from idlm.engine.async_engine import AsyncLLM
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.models.loader import load_pretrained
from idlm.server.app import build_app

MODEL = "idlm-tiny"
MAX_RUNNING, MAX_WAITING, MAX_SEQS = 8, 256, 16


@pytest.fixture(scope="module")
def model_tok():
    return load_pretrained(MODEL)


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=256, max_num_seqs=MAX_RUNNING))
    llm = AsyncLLM(engine, max_waiting=MAX_WAITING).start()
    app = build_app(llm, MODEL, max_seqs_per_request=MAX_SEQS, body_timeout=1.0)
    with serving(app) as base:
        yield {"base": base, "llm": llm, "engine": engine}
    llm.close(10)


def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server["base"] + path, json=body, timeout=60, **kw)


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_for(cond, timeout: float = 10.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def still_serving(server):
    assert_still_serving(server["base"], server["llm"], MODEL)


# ------------------------------------------------------------------ 1. numeric ranges; a failing step fails alone


@pytest.mark.parametrize("field,value", [("top_k", 2**63), ("top_k", -2), ("seed", 2**64), ("seed", -(2**63) - 1),
                                         ("max_tokens", 2**63), ("stop_token_ids", [2**63]), ("n", 129),
                                         ("temperature", 1e400), ("verify_alpha", 0),
                                         ("draft_temperature", 0), ("draft_temperature", 1e400)])
def test_numeric_fields_out_of_range_are_400(server, field, value):
    raw = json.dumps({"model": MODEL, "prompt": "a", field: value}).replace("Infinity", "1e400")
    r = httpx.post(server["base"] + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert_error(r, 400, param=field)
    still_serving(server)


def test_top_k_overflow_repro_does_not_kill_the_engine(server):
    r = post(server, {"prompt": "a", "top_k": 9223372036854775808})
    assert_error(r, 400, param="top_k")
    assert httpx.get(server["base"] + "/health").status_code == 200
    still_serving(server)


def test_a_failing_step_fails_only_its_request(server):
    """A request that passed validation but whose engine step raises (here: injected into the ISD
    decoder's step inputs for one marked seed) ends alone with a 500 / an error event; a request
    running beside it completes, and the engine stays healthy."""
    engine = server["engine"]
    with poisoned_step(engine._decoder(engine.config.stride), "Overflow when unpacking long long (injected)"):
        good = {}

        def normal_stream():
            with httpx.stream("POST", server["base"] + "/v1/completions", timeout=60,
                              json={"prompt": "def main():", "max_tokens": 48, "temperature": 0, "stream": True,
                                    "ignore_eos": True}) as r:
                good["lines"] = [ln for ln in r.iter_lines() if ln]

        th = threading.Thread(target=normal_stream)
        th.start()
        r = post(server, {"prompt": "x = 1", "max_tokens": 16, "temperature": 1.0, "seed": POISON_SEED})
        assert_error(r, 500, code="request_failed")
        with httpx.stream("POST", server["base"] + "/v1/completions", timeout=60,
                          json={"prompt": "x = 1", "max_tokens": 16, "seed": POISON_SEED, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_failed" and lines[-1] == "data: [DONE]"
        th.join(60)
        done = json.loads(good["lines"][-2][6:])
        assert done["choices"][0]["finish_reason"] == "length", good["lines"][-3:]
    m = httpx.get(server["base"] + "/metrics").text
    assert metric(m, "idlm_engine_failed_requests") >= 2
    still_serving(server)


# ------------------------------------------------------------------ 2. amplification


def test_amplification_request_is_rejected_at_once_and_others_keep_their_latency(server):
    base = server["base"]
    normal = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
    t0 = time.perf_counter()
    assert post(server, normal).status_code == 200
    alone = time.perf_counter() - t0

    out = {}

    def normal_during():
        t = time.perf_counter()
        out["status"] = post(server, normal).status_code
        out["latency"] = time.perf_counter() - t

    th = threading.Thread(target=normal_during)
    th.start()
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/completions", timeout=30,
                   json={"prompt": ["x"] * 500, "n": 128, "max_tokens": 1, "stream": True})
    answered = time.perf_counter() - t0
    th.join(60)
    assert_error(r, 400, param="n", code="too_many_sequences")
    assert answered < 1.0, answered
    assert out["status"] == 200 and out["latency"] < max(1.0, 3 * alone), (out, alone)
    still_serving(server)


def test_a_stream_starts_at_once_and_a_disconnect_before_the_first_token_aborts_everything(server):
    """16 sequences (the per-request cap): the response starts before any token exists, and leaving
    right after the headers aborts every one of them."""
    llm = server["llm"]
    before = llm.stats()["counters"]["aborted"]
    body = {"prompt": ["def f(x):"] * 4, "n": 4, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
    assert wait_for(lambda: llm.stats()["counters"]["aborted"] - before == 16), llm.stats()["counters"]
    wait_idle(llm)
    still_serving(server)


def test_per_request_cap_and_default_waiting_bound():
    from idlm.server.launch import add_serve_arguments, resolve_options

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert resolve_options(p.parse_args([]))["max_waiting"] == 256  # bounded by default
    assert resolve_options(p.parse_args(["--max-running-requests", "128"]))["max_waiting"] == 512
    assert p.parse_args([]).max_seqs_per_request == 256


# ------------------------------------------------------------------ 3. non-streaming disconnect


def test_non_streaming_client_that_leaves_has_its_request_aborted(server):
    llm = server["llm"]
    before = llm.stats()["counters"]["aborted"]
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 1900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_for(lambda: llm.stats()["counters"]["aborted"] == before + 1, timeout=5), llm.stats()["counters"]
    wait_idle(llm, timeout=10)
    m = httpx.get(server["base"] + "/metrics").text
    assert 'idlm_requests_total{endpoint="completions",outcome="disconnected"}' in m
    still_serving(server)


# ------------------------------------------------------------------ 4. never a plain-text 500


@pytest.mark.parametrize("raw,param", [
    ('{"prompt": "a", "x": ' + "[" * 2000 + "]" * 2000 + "}", None),
    ('{"prompt": "ab\\ud800", "max_tokens": 2}', "prompt"),
    ('{"messages": [{"role": "user", "content": "ab\\udfff"}]}', "messages"),
    ('{"prompt": "a", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "a", "seed": -9223372036854775809}', "seed"),
    ('{"prompt": "a", "stop": ["x\\ud800"]}', "stop"),
])
def test_hostile_bodies_get_a_json_400(server, raw, param):
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    r = httpx.post(server["base"] + path, content=raw.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    assert_error(r, 400, param=param)
    still_serving(server)


def test_unknown_routes_and_methods_are_json(server):
    assert_error(httpx.get(server["base"] + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(server["base"] + "/v1/completions"), 405)


# ------------------------------------------------------------------ 5. tiny temperature / top_p


def test_tiny_temperature_and_top_p_behave_as_their_limit(server):
    base = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 12, "ignore_eos": True}
    greedy = post(server, {**base, "temperature": 0}).json()["choices"][0]
    assert greedy["text"].strip()
    for extra in ({"temperature": 1e-38}, {"temperature": 1.0, "top_p": 1e-46, "seed": 3},
                  {"temperature": 5e-324}):
        c = post(server, {**base, **extra}).json()["choices"][0]
        assert c["text"] == greedy["text"], extra
    still_serving(server)


# ------------------------------------------------------------------ 7. requests that can never fit


def test_a_request_that_can_never_fit_is_400_and_429_has_retry_after(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=1))
    llm = AsyncLLM(engine, max_waiting=1).start()
    app = build_app(llm, MODEL)
    try:
        with serving(app) as base:
            r = httpx.post(base + "/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 2}, timeout=30)
            assert_error(r, 400, param="n", code="too_many_sequences")
            body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
            with httpx.Client(base_url=base, timeout=60) as c:
                import concurrent.futures

                with concurrent.futures.ThreadPoolExecutor(6) as ex:
                    rs = list(ex.map(lambda _: c.post("/v1/completions", json=body), range(6)))
            limited = [r for r in rs if r.status_code == 429]
            assert limited and any(r.status_code == 200 for r in rs), [r.status_code for r in rs]
            for r in limited:
                assert_error(r, 429, code="queue_full")
                assert r.headers["retry-after"] == "1"
            assert_still_serving(base, llm, MODEL)
    finally:
        llm.close(10)


# ------------------------------------------------------------------ 9. fields that must not be silently accepted


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("min_tokens", 3), ("best_of", 3), ("suffix", "end"), ("guided_json", {"type": "object"}),
    ("guided_choice", ["a", "b"]),
])
def test_unsupported_fields_are_400_naming_the_field(server, field, value):
    for path, body in (("/v1/completions", {"prompt": "a"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
        err = assert_error(post(server, {**body, field: value}, path), 400, param=field, code="unsupported_parameter")
        assert field in err["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    body = {"prompt": "a", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "best_of": 1, "min_tokens": 0, "suffix": None, "tools": None}
    assert post(server, body).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": True}, "n"),
    ("/v1/completions", {"prompt": "a", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "draft": "argmax-ratio"}, "draft"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_no_coercion_and_strict_chat_messages(server, path, body, param):
    assert_error(post(server, body, path), 400, param=param)


# ------------------------------------------------------------------ 10. slow clients, uploads that stop, keys


def _raw_http(port: int, head: bytes, body: bytes, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        time.sleep(wait)
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return data


def test_a_body_that_never_completes_gets_408(server):
    port = int(server["base"].rsplit(":", 1)[1])
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nConnection: close\r\n\r\n")
    t0 = time.time()
    data = _raw_http(port, head, b'{"prompt": "a', wait=0)
    assert b" 408 " in data.split(b"\r\n", 1)[0], data[:200]
    assert b'"request_timeout"' in data and time.time() - t0 < 5
    still_serving(server)


def test_idle_keep_alive_connections_are_closed(server):
    """uvicorn closes a keep-alive connection idle for --timeout-keep-alive (here 1 s); idlm serve passes it."""
    from idlm.server.launch import add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert p.parse_args([]).timeout_keep_alive == 5.0
    with serving(build_app(server["llm"], MODEL), timeout_keep_alive=1) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:  # the whole response first (it may arrive in pieces)
                data += s.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            assert b" 200 " in head.split(b"\r\n", 1)[0]
            length = int(next(h.split(b":", 1)[1] for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length")))
            while len(body) < length:
                body += s.recv(65536)
            t0 = time.time()
            assert s.recv(65536) == b""  # closed by the server, not by us
            assert 0.5 < time.time() - t0 < 5


def test_a_client_that_disconnects_during_upload_logs_no_error(server, caplog):
    port = int(server["base"].rsplit(":", 1)[1])
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with caplog.at_level(logging.WARNING):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + b'{"prompt": "')
            time.sleep(0.2)
        time.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    still_serving(server)


def test_api_key_is_checked_for_every_route_but_health(model_tok, server):
    app = build_app(server["llm"], MODEL, api_key="sekret")
    with serving(app) as base:
        assert httpx.get(base + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/tokenizer_info", "/version"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sekret2"},
                            {"Authorization": "sekret"}):
                assert_error(httpx.get(base + path, headers=headers), 401)
        ok = {"Authorization": "Bearer sekret"}
        assert_still_serving(base, server["llm"], MODEL, headers=ok)


# ------------------------------------------------------------------ 6 and 8: shutdown and engine death (processes)


@pytest.mark.slow
def test_sigterm_drains_then_ends_open_streams_with_an_error_event():
    port = free_port()
    proc = start_serve(port, "--max-running-requests", "4", "--num-pages", "128", "--shutdown-timeout", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        lines, short = [], {}

        def long_stream():
            body = {"prompt": "def main():", "max_tokens": 1900, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)

        def short_stream():  # started before SIGTERM, finishes within the drain window
            body = {"prompt": "x", "max_tokens": 8, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                short["lines"] = [ln for ln in r.iter_lines() if ln]

        th = threading.Thread(target=long_stream)
        th.start()
        while len(lines) < 2:
            time.sleep(0.02)
        th2 = threading.Thread(target=short_stream)
        th2.start()
        time.sleep(0.2)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        th2.join(30)
        th.join(30)
        ended = time.time() - t0
        assert json.loads(short["lines"][-2][6:])["choices"][0]["finish_reason"] == "length"
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
        assert 1.5 < ended < 6, ended
        proc.wait(15)
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_death_is_logged_visible_and_exits_non_zero(monkeypatch, caplog):
    """The engine loop itself crashing (not one request's step): logged, /health 503, /metrics marks it,
    open streams get an error event, and `idlm serve` returns exit code 1 for its supervisor."""
    from idlm.server.launch import add_serve_arguments, cmd_serve

    calls = {"n": 0}
    original = LLMEngine.step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] > 3:
            raise SystemError("the device fell off the bus (injected)")
        return original(self)

    monkeypatch.setattr(LLMEngine, "step", dying_step)
    port = free_port()
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--port", str(port), "--num-pages", "64", "--log-level", "warning"])
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("code", cmd_serve(args)), daemon=True)
    with caplog.at_level(logging.ERROR):
        th.start()
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert json.loads(lines[-2][6:])["error"]["code"] == "engine_dead" and lines[-1] == "data: [DONE]"
        th.join(30)
    assert result["code"] == 1
    assert any("engine loop died" in r.getMessage() for r in caplog.records)


def test_dead_engine_health_and_metrics(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=2))
    llm = AsyncLLM(engine).start()
    app = build_app(llm, MODEL)

    def boom():
        raise SystemError("injected")

    engine.step = boom
    with serving(app) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert_error(httpx.get(base + "/health"), 503, code="engine_dead")
        assert metric(httpx.get(base + "/metrics").text, "idlm_engine_healthy") == 0
        assert_error(httpx.post(base + "/v1/completions", json={"prompt": "a"}, timeout=30), 503)
    llm.close(5)


# ------------------------------------------------------------------ load: many streams, half leaving


def test_200_streams_half_disconnecting_leak_no_pages(server):
    llm = server["llm"]
    n = 200

    async def one(c: httpx.AsyncClient, i: int):
        body = {"prompt": f"def f{i}(x):", "max_tokens": 24, "temperature": 1.0, "seed": i, "stream": True,
                "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            k = 0
            async for ln in r.aiter_lines():
                if ln.startswith("data: ") and i % 2 and (k := k + 1) == 2:
                    return "left"  # half of the clients leave mid-stream
                if ln == "data: [DONE]":
                    return "done"
        return "cut"

    async def main():
        async with httpx.AsyncClient(base_url=server["base"], timeout=120,
                                     limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if r not in ("done", "left")]
    assert not errors, errors[:3]
    assert results.count("left") == n // 2 and results.count("done") == n // 2
    wait_idle(llm)
    still_serving(server)


@pytest.mark.slow
def test_serve_warmup_with_the_adaptive_stride(tmp_path):
    """`idlm serve --stride auto --warmup` warms every stride up before it listens, then serves: the
    first completion is answered, and the warm-up's requests are not in what the server reports."""
    port = free_port()
    proc = start_serve(port, "--stride", "auto", "--warmup", "--max-running-requests", "4", "--num-pages", "128",
                       env={"IDLM_CACHE": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "Copy this text exactly:\nabc", "max_tokens": 8,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        # the warm-up's requests left no trace in the counters: one prompt, one prefill forward
        assert metric(httpx.get(base + "/metrics", timeout=10).text, "idlm_prefill_forwards") == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_warmup_defaults_to_adaptive_engines_on_cuda_and_can_be_forced_either_way():
    from idlm.cli import build_parser
    from idlm.server.launch import should_warm_up

    parse = build_parser().parse_args
    assert parse(["serve"]).warmup is None
    assert parse(["serve", "--warmup"]).warmup is True and parse(["serve", "--no-warmup"]).warmup is False
    assert should_warm_up(None, "auto", "cuda") and not should_warm_up(None, "auto", "cpu")
    assert not should_warm_up(None, 4, "cuda")  # a fixed stride compiles one step, on its first request
    assert should_warm_up(True, 4, "cpu") and not should_warm_up(False, "auto", "cuda")


def test_fuzz_server_script_smoke():
    """scripts/fuzz_server.py CPU-sized: it starts `idlm serve`, sends 36 random requests (valid and not) from
    six connections, and finds no 5xx, no error event in an accepted stream, a healthy server and no KV page
    held afterwards."""
    from tiny import run_script

    last = run_script("fuzz_server.py", "--requests", "36", "--seed", "1")
    assert last["ok"] and last["n_faults"] == 0 and last["kv_pages_used"] == 0, last
    assert sum(last["status_counts"].values()) == 36 and "200" in last["status_counts"], last
