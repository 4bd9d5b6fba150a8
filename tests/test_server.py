"""The OpenAI-compatible server end to end: a real uvicorn server on a free port, the real `openai`
client and httpx, the embedded idlm-tiny on CPU (ISD N=4)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from servers import serving, wait_idle

from idlm.decoding.sampling import SamplingParams
from idlm.engine.async_engine import AsyncLLM
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.models.loader import load_pretrained
from idlm.server.app import build_app

MODEL = "idlm-tiny"


@pytest.fixture(scope="module")
def server():
    model, tok = load_pretrained(MODEL)
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=256, max_num_seqs=16))
    llm = AsyncLLM(engine, max_waiting=1024).start()
    with serving(build_app(llm, MODEL, max_body_bytes=4096, max_seqs_per_request=512)) as base:
        yield {"base": base, "llm": llm, "model": model, "tok": tok}
    llm.close(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}


def test_greedy_completion_matches_offline(server, client):
    prompt, k = "def fibonacci(n):", 24
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=k, temperature=0)
    tok = server["tok"]
    engine = LLMEngine(server["model"], tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=2))
    ids = tok.encode(prompt, add_special_tokens=True)
    ref = engine.run([ids], SamplingParams(temperature=0, max_tokens=k))[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(ids) + len(ref.token_ids)
    # token-id prompt gives the same text
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=k, temperature=0)
    assert r2.choices[0].text == ref.text


def test_seeded_sampled_completion_with_a_draft_temperature_matches_offline(server, client):
    """`draft_temperature` reaches the engine: a seeded T = 1 completion drawing its drafts at 0.4 equals the
    offline engine's with the same parameters (and the seed's tokens do not depend on the server's batch)."""
    prompt, k = "def fibonacci(n):", 24
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=k, temperature=1.0, seed=7,
                                  extra_body={"draft_temperature": 0.4})
    tok = server["tok"]
    engine = LLMEngine(server["model"], tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=2))
    ids = tok.encode(prompt, add_special_tokens=True)
    ref = engine.run([ids], SamplingParams(temperature=1.0, max_tokens=k, seed=7, draft_temperature=0.4))[0]
    other = engine.run([ids], SamplingParams(temperature=1.0, max_tokens=k, seed=7))[0]
    assert r.choices[0].text == ref.text
    assert ref.stats.forwards != other.stats.forwards or ref.text != other.text  # the option changed the run


def test_completion_default_max_tokens_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="import os", temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage.completion_tokens == 16 and c.finish_reason == "length"
    assert len(c.logprobs.token_logprobs) == 16
    assert all(lp is None or lp <= 1e-6 for lp in c.logprobs.token_logprobs)
    assert "".join(c.logprobs.tokens) == c.text


def test_streaming_completion_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="class Stack:", max_tokens=20, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_streaming_and_not(client):
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n2_and_seed_reproducibility(client):
    kw = dict(model=MODEL, prompt="def sort(xs):", max_tokens=16, temperature=1.0, seed=123, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1]
    one = client.completions.create(**{**kw, "n": 1, "seed": 124})
    assert one.choices[0].text == a.choices[1].text  # choice i uses seed + i
    # streaming n=2 reassembles to the same texts
    texts = ["", ""]
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=40, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert "\n" in full
    r = client.completions.create(stop=["\n"], **kw)
    assert r.choices[0].text == full[: full.index("\n")]
    assert r.choices[0].finish_reason == "stop"


BAD = [
    ({"content": b"{not json"}, "/v1/completions", 400, None),
    ({"json": {"model": MODEL, "prompt": "hi", "max_tokens": "many"}}, "/v1/completions", 400, "max_tokens"),
    ({"json": {"model": MODEL, "prompt": "hi", "max_tokens": 0}}, "/v1/completions", 400, "max_tokens"),
    ({"json": {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 6}}, "/v1/completions", 400, "max_tokens"),
    ({"json": {"model": MODEL, "prompt": "hi", "temperature": -1}}, "/v1/completions", 400, "temperature"),
    ({"json": {"model": MODEL, "prompt": "hi", "top_p": 0}}, "/v1/completions", 400, "top_p"),
    ({"json": {"model": MODEL, "prompt": "hi", "top_p": 1.5}}, "/v1/completions", 400, "top_p"),
    ({"json": {"model": MODEL, "prompt": "hi", "stride": 7}}, "/v1/completions", 400, "stride"),
    ({"json": {"model": MODEL, "prompt": "hi", "draft": "bogus"}}, "/v1/completions", 400, "draft"),
    ({"json": {"model": "gpt-5", "prompt": "hi"}}, "/v1/completions", 404, "model"),
    ({"json": {"model": MODEL, "prompt": [5] * 2100}}, "/v1/completions", 413, None),  # > 4096-byte body
    ({"json": {"model": MODEL, "prompt": [5] * 1000, "max_tokens": 1100}}, "/v1/completions", 400, "max_tokens"),
    ({"json": {"model": MODEL, "messages": "hi"}}, "/v1/chat/completions", 400, "messages"),
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -0.5}},
     "/v1/chat/completions", 400, "temperature"),
]


def test_bad_requests_while_streaming(server):
    base = server["base"]
    result = {}

    def long_stream():
        body = {"model": MODEL, "prompt": "def main():", "max_tokens": 64, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            result["lines"] = [ln for ln in r.iter_lines() if ln]

    th = threading.Thread(target=long_stream)
    th.start()
    for kwargs, path, status, param in BAD:
        r = httpx.post(base + path, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param is not None:
            assert err["param"] == param, (kwargs, err)
    # a too-long Content-Length claim is refused before reading
    r = httpx.post(base + "/v1/completions", content=b"x" * 5000, timeout=30)
    assert r.status_code == 413
    th.join(60)
    assert result["lines"][-1] == "data: [DONE]"
    last = json.loads(result["lines"][-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    assert httpx.get(base + "/health").status_code == 200
    wait_idle(server["llm"])


def test_queue_full_429_and_dead_engine_503(server):
    model, tok = server["model"], server["tok"]
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=1))
    llm = AsyncLLM(engine, max_waiting=1)
    app = build_app(llm, MODEL)
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 100, "ignore_eos": True}
        with ThreadPoolExecutor(5) as ex:
            codes = sorted(f.result().status_code for f in [ex.submit(c.post, "/v1/completions", json=body)
                                                            for _ in range(5)])
        assert 429 in codes and 200 in codes, codes
        llm.close(10)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert c.get("/health").status_code == 503


def test_auth(server):
    llm = server["llm"]
    app = build_app(llm, MODEL, api_key="sekret")
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get("/metrics", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/completions", headers=ok, json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200


def test_prompt_longer_than_the_context_is_a_400(server):
    llm = server["llm"]
    app = build_app(llm, MODEL)  # default 1 MiB body limit: the long prompt reaches the length check
    too_long = [5] * (llm.engine.max_model_len + 10)
    with TestClient(app) as c:
        for path, body in (("/v1/completions", {"model": MODEL, "prompt": too_long, "max_tokens": 1}),
                           ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "hi " * 3000}]})):
            r = c.post(path, json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}).status_code == 200


def test_disconnect_mid_stream_frees_pages(server):
    base, llm = server["base"], server["llm"]
    before = llm.stats()["counters"]["aborted"]
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")
        assert llm.stats()["pages_used"] > 0
    s = wait_idle(llm)
    assert s["counters"]["aborted"] == before + 1
    m = httpx.get(base + "/metrics").text
    assert "idlm_kv_pages_free 256.0" in m
    assert 'idlm_requests_total{endpoint="completions",outcome="disconnected"}' in m


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="x = 1", max_tokens=8, temperature=0)
    m = httpx.get(server["base"] + "/metrics").text
    for name in ("idlm_requests_total", "idlm_prompt_tokens_total", "idlm_generation_tokens_total",
                 "idlm_time_to_first_token_seconds_bucket", "idlm_time_per_output_token_seconds_bucket",
                 "idlm_running_requests", "idlm_waiting_requests", "idlm_kv_pages_used", "idlm_kv_pages_free",
                 "idlm_decode_forwards", "idlm_tokens_per_forward", "idlm_tpf", "idlm_overlapped_decode_steps",
                 "idlm_stride_changes", "idlm_branch_steps"):
        assert name in m, name
    # ISD N=4 verifies 3 draft positions; accepted never exceeds verified at any position
    import re

    verified = {j: float(v) for j, v in re.findall(r'idlm_draft_verified\{position="(\d)"\} (\S+)', m)}
    accepted = {j: float(v) for j, v in re.findall(r'idlm_draft_accepted\{position="(\d)"\} (\S+)', m)}
    assert set(verified) == {"0", "1", "2"} and verified["0"] > 0
    assert all(accepted[j] <= verified[j] for j in verified)


N_LOAD = 300


def test_load_concurrent_streams(server):
    base, llm = server["base"], server["llm"]

    async def one(c: httpx.AsyncClient, i: int):
        body = {"model": MODEL, "prompt": f"def f{i}(x):", "max_tokens": 16, "temperature": 1.0, "seed": i,
                "stream": True}
        text, done = "", False
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for ln in r.aiter_lines():
                if ln == "data: [DONE]":
                    done = True
                elif ln.startswith("data: "):
                    text += json.loads(ln[6:])["choices"][0]["text"]
        return done

    async def main():
        limits = httpx.Limits(max_connections=N_LOAD)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(N_LOAD)), return_exceptions=True)

    t0 = time.time()
    results = asyncio.run(main())
    errors = [r for r in results if r is not True]
    assert not errors, errors[:3]
    print(f"\n{N_LOAD} concurrent streams in {time.time() - t0:.1f}s")
    wait_idle(llm)


def test_serve_cli_option_errors(tmp_path, capsys):
    from idlm.cli import main

    bad = tmp_path / "a.yaml"
    bad.write_text("gen_block_size: 4\nblock_size: 8\n")
    assert main(["serve", "--dllm-algorithm-config", str(bad)]) == 2
    assert "block_size=8" in capsys.readouterr().err
    bad.write_text("gen_block_size: 4\nwhatever: 1\n")
    assert main(["serve", "--dllm-algorithm-config", str(bad)]) == 2
    assert "unknown key 'whatever'" in capsys.readouterr().err
    assert main(["serve", "--dllm-algorithm", "Nope"]) == 2
    assert "unknown --dllm-algorithm" in capsys.readouterr().err
    assert main(["serve", "--decoder", "risd"]) == 2
    assert "--lora-paths" in capsys.readouterr().err


def test_algorithm_config_defaults(tmp_path):
    import argparse

    from idlm.server.launch import add_serve_arguments, resolve_options

    cfg = tmp_path / "c.yaml"
    cfg.write_text("block_size: 7\ngen_block_size: 4\ntemperature: 0.5\ntop_p: 0.9\nverify_alpha: 1.0\n"
                   "draft_temperature: 0.3\n"
                   "use_spec_verify: true\n")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    o = resolve_options(p.parse_args(["--dllm-algorithm", "IDLMBlockN", "--dllm-algorithm-config", str(cfg)]))
    assert o["decoder"] == "isd" and o["stride"] == 4
    assert o["defaults"] == {"temperature": 0.5, "top_p": 0.9, "verify_alpha": 1.0, "draft_temperature": 0.3}
