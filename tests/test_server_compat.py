"""Clients written for vLLM work unchanged: echo + logprobs, raw top logprobs, the tokenizer routes, usage,
and lm-evaluation-harness's `local-completions` model end to end.

The oracle for every logprob is HF transformers running the same checkpoint (idlm-tiny is saved in HF's
layout): log_softmax of its logits over the same token ids, in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from servers import assert_still_serving, free_port, serving, start_serve

from idlm.engine.async_engine import AsyncLLM
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.models.loader import load_pretrained, resolve_model_path
from idlm.server.app import build_app

MODEL = "idlm-tiny"
ATOL = 2e-4


@pytest.fixture(scope="module")
def server():
    model, tok = load_pretrained(MODEL)
    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=256, max_num_seqs=8))
    llm = AsyncLLM(engine, max_waiting=256).start()
    with serving(build_app(llm, MODEL)) as base:
        yield {"base": base, "llm": llm, "tok": tok}
    llm.close(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)


_HF = {}


def hf_logprobs(ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of HF transformers' logits over `ids` (position i predicts ids[i + 1])."""
    if "model" not in _HF:
        from transformers import AutoModelForCausalLM

        _HF["model"] = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(_HF["model"](torch.tensor([ids])).logits[0].float(), -1)


def engine_ids(server, prompt_ids: list[int], **params) -> list[int]:
    """The token ids the server generated for a (greedy or seeded) request, by rerunning it on an engine
    of the same model (a completion's text need not re-encode to its ids)."""
    from idlm.decoding.sampling import SamplingParams

    engine = LLMEngine(server["llm"].engine.model, server["tok"],
                       EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=2))
    return engine.run([prompt_ids], SamplingParams(**params))[0].token_ids


def test_echo_with_logprobs_matches_transformers(server, client):
    tok = server["tok"]
    prompt = "def fibonacci(n):\n    if n < 2:"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=3)
    c = r.choices[0]
    pids = tok.encode(prompt, add_special_tokens=True)
    assert c.text.startswith(prompt)
    lp = c.logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert n == len(pids) + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert all(lp.text_offset[i + 1] == lp.text_offset[i] + len(lp.tokens[i]) for i in range(n - 1))
    ids = pids + engine_ids(server, pids, temperature=0, max_tokens=6)
    assert len(ids) == n
    oracle = hf_logprobs(ids)
    for i in range(1, n):
        want = float(oracle[i - 1, ids[i]])
        assert abs(lp.token_logprobs[i] - want) < ATOL, (i, lp.token_logprobs[i], want)
        top = lp.top_logprobs[i]
        best = torch.topk(oracle[i - 1], 3)
        assert len(top) in (3, 4)  # top-3, plus the chosen token when it is not among them
        for v, t in zip(best.values.tolist(), best.indices.tolist()):
            assert abs(top[tok.decode([t])] - v) < ATOL
        assert abs(top[lp.tokens[i]] - lp.token_logprobs[i]) < 1e-6
    # greedy: each generated token is the top-1 (what lm-eval's is_greedy checks)
    for i in range(len(pids), n):
        assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values())


def test_logprobs_are_raw_not_filtered(server, client):
    """At T = 0 (and with top-k / top-p) the logprobs are the model's, not the point mass's 0.0."""
    tok = server["tok"]
    pids = tok.encode("import os", add_special_tokens=True)
    for kw in ({"temperature": 0}, {"temperature": 0.7, "top_k": 3, "top_p": 0.8, "seed": 5}):
        extra = {k: kw.pop(k) for k in ("top_k",) if k in kw}
        c = client.completions.create(model=MODEL, prompt=pids, max_tokens=8, logprobs=0, extra_body=extra,
                                      **kw).choices[0]
        kw.update(extra)
        lps = c.logprobs.token_logprobs
        assert any(v < -1e-3 for v in lps), lps
        assert all(len(d) == 1 for d in c.logprobs.top_logprobs)  # logprobs=0: the chosen token only
        params = {"temperature": kw["temperature"], "top_k": kw.get("top_k", 0), "top_p": kw.get("top_p", 1.0),
                  "seed": kw.get("seed"), "max_tokens": 8}
        gen = engine_ids(server, pids, **params)
        oracle = hf_logprobs(pids + gen)
        assert len(gen) == len(lps)
        for j, t in enumerate(gen):
            assert abs(lps[j] - float(oracle[len(pids) + j - 1, t])) < ATOL


def test_chat_top_logprobs_streaming_and_not(server, client):
    msgs = [{"role": "user", "content": "What is 17 + 25?"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    for e in content:
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6  # greedy: the chosen token is the top one
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or "\ufffd" in e.token
    streamed = []
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                             top_logprobs=2, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_usage_counts_each_prompt_once(client):
    one = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4, temperature=0)
    three = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4, temperature=0, n=3)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    two = client.completions.create(model=MODEL, prompt=["def f(x):", "def g(y):"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    chat1 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0, n=2)
    chat0 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0)
    assert chat1.usage.prompt_tokens == chat0.usage.prompt_tokens


def test_streaming_echo(client):
    kw = dict(model=MODEL, prompt="class Stack:", max_tokens=8, temperature=0, echo=True, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.text
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert toks == full.logprobs.tokens
    offs = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offs == full.logprobs.text_offset


def test_tokenizer_routes(server):
    base, tok = server["base"], server["tok"]
    r = httpx.post(base + "/tokenize", json={"prompt": "hello world <|im_end|>"}).json()
    assert r["tokens"] == tok.encode("hello world <|im_end|>", add_special_tokens=True)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == server["llm"].engine.max_model_len
    msgs = [{"role": "user", "content": "hi"}]
    r2 = httpx.post(base + "/tokenize", json={"messages": msgs}).json()
    assert r2["tokens"] == tok.encode_chat(msgs)
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello world <|im_end|>"}
    assert httpx.post(base + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(base + "/tokenize", json={}).status_code == 400
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tok.chat_template
    assert httpx.get(base + "/version").json()["version"]
    assert_still_serving(base, server["llm"], MODEL)


# ------------------------------------------------------------------ lm-evaluation-harness


REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"  # idlm_mc (multiple choice) and idlm_gen (generate_until) on local JSONL


def lm_eval_command(base: str, out: Path) -> list[str]:
    """The command docs/server.md records (run from the repository root): no tokenizer= argument."""
    return [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
            "--model_args", f"model={MODEL},base_url={base}/v1/completions,num_concurrent=2,max_retries=1",
            "--tasks", "idlm_mc,idlm_gen", "--include_path", str(TASKS), "--output_path", str(out),
            "--log_samples", "--seed", "0"]


@pytest.mark.slow
def test_lm_eval_harness_local_completions(tmp_path):
    """`lm-eval --model local-completions` against `idlm serve`, with its default tokenizer discovery
    (no tokenizer= argument: it finds /tokenizer_info and /tokenize). Its log-likelihoods equal HF
    transformers' on the same token ids; its generations equal the engine's greedy output."""
    pytest.importorskip("lm_eval")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    serve = start_serve(port, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        out = tmp_path / "out"
        res = subprocess.run(lm_eval_command(base, out), env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        assert "Auto-detected remote tokenizer support" in res.stdout + res.stderr
    finally:
        serve.terminate()
        serve.wait(30)
    results = next(out.rglob("results_*.json"))
    summary = json.loads(results.read_text())["results"]
    assert 0 <= summary["idlm_mc"]["acc,none"] <= 1
    assert "exact_match,none" in summary["idlm_gen"]
    # log-likelihoods: recompute each (context, continuation) with HF transformers on lm-eval's own split
    model, tok = load_pretrained(MODEL)
    samples = [json.loads(ln) for f in out.rglob("samples_idlm_mc_*.jsonl") for ln in f.read_text().splitlines()]
    assert len(samples) == len((TASKS / "mc.jsonl").read_text().splitlines())
    for s in samples:
        args = [s["arguments"][f"gen_args_{j}"] for j in range(len(s["arguments"]))]
        assert len(args) == len(s["resps"]) == len(s["doc"]["choices"])
        for a, resp in zip(args, s["resps"]):
            context, continuation = a["arg_0"], a["arg_1"]
            whole = tok.encode(context + continuation)
            ctx = tok.encode(context)
            cont = whole[len(ctx):]
            oracle = hf_logprobs(ctx + cont)
            want = sum(float(oracle[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
            got, greedy = float(resp[0][0]), resp[0][1] == "True"
            assert abs(got - want) < 1e-3, (context, continuation, got, want)
            assert greedy == all(int(oracle[len(ctx) + j - 1].argmax()) == t for j, t in enumerate(cont))
    # generations: the engine's greedy output for the same ids, cut at the stop string
    from idlm.decoding.sampling import SamplingParams

    engine = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, num_pages=64, max_num_seqs=4))
    gens = [json.loads(ln) for f in out.rglob("samples_idlm_gen_*.jsonl") for ln in f.read_text().splitlines()]
    assert len(gens) == len((TASKS / "gen.jsonl").read_text().splitlines())
    for s in gens:
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        ref = engine.run([tok.encode(prompt)], SamplingParams(temperature=0, max_tokens=24,
                                                              stop=["\n\n", "<|im_end|>"]))[0]
        assert s["resps"][0][0] == ref.text, (prompt, s["resps"][0][0], ref.text)
