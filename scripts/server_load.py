"""Load on a real `idlm serve`: many concurrent streams, clients that leave mid-stream, an amplification request.

Why it exists: the server's robustness claims (docs/server.md) are numbers anyone can rerun. This
script starts `idlm serve` as a user would (a subprocess, default options plus any given after `--`),
then measures, one phase at a time:

  streams      N concurrent streaming completions: errors (non-200, error events, cut streams), wall time
  leavers      M concurrent streams, every other client disconnecting after two chunks: errors, and KV
               pages still in use once the server is idle (leaked pages)
  amplification  {"prompt": ["x"] * 500, "n": 128, "max_tokens": 1} (streaming and not): its status and
               answer time, and a normal request's latency alone vs. while it is sent

Prints one JSON line per phase and a summary JSON last.

    python scripts/server_load.py                          # CPU, embedded idlm-tiny
    python scripts/server_load.py -- --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

NORMAL = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
AMPLIFICATION = {"prompt": ["x"] * 500, "n": 128, "max_tokens": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {k: float(v) for k, v in re.findall(r"^(idlm_[a-z_]+) (\S+)$", text, re.M)}


def wait_idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    t0 = time.time()
    while True:
        m = metrics(base)
        idle = m["idlm_running_requests"] == 0 and m["idlm_waiting_requests"] == 0
        if (idle and m["idlm_kv_pages_free"] == m["idlm_kv_pages_total"]) or time.time() - t0 > timeout:
            return m
        time.sleep(0.1)


async def stream(c: httpx.AsyncClient, i: int, leave_after: int | None, max_tokens: int) -> str:
    body = {"prompt": f"def f{i}(x):", "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
            "ignore_eos": True}
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            chunks = 0
            async for ln in r.aiter_lines():
                if ln == "data: [DONE]":
                    return "done"
                if ln.startswith("data: "):
                    if "error" in json.loads(ln[6:]):
                        return "error event"
                    chunks += 1
                    if leave_after is not None and chunks == leave_after:
                        return "left"
            return "cut"
    except httpx.HTTPError as e:
        return f"{type(e).__name__}"


async def many(base: str, n: int, leave_every: int | None, max_tokens: int) -> tuple[list[str], float]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream(c, i, 2 if leave_every and i % leave_every else None, max_tokens)
                                     for i in range(n)))
        return res, time.perf_counter() - t0


def phase_streams(base: str, n: int, max_tokens: int) -> dict:
    res, wall = asyncio.run(many(base, n, None, max_tokens))
    m = wait_idle(base)
    errors = [r for r in res if r != "done"]
    return {"phase": "streams", "concurrent": n, "max_tokens": max_tokens, "completed": res.count("done"),
            "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": round(wall, 2),
            "leaked_pages": int(m["idlm_kv_pages_total"] - m["idlm_kv_pages_free"])}


def phase_leavers(base: str, n: int, max_tokens: int) -> dict:
    res, wall = asyncio.run(many(base, n, 2, max_tokens))
    t0 = time.perf_counter()
    m = wait_idle(base)
    errors = [r for r in res if r not in ("done", "left")]
    return {"phase": "leavers", "concurrent": n, "left": res.count("left"), "completed": res.count("done"),
            "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": round(wall, 2),
            "idle_after_s": round(time.perf_counter() - t0, 2),
            "running_after": int(m["idlm_running_requests"]), "waiting_after": int(m["idlm_waiting_requests"]),
            "leaked_pages": int(m["idlm_kv_pages_total"] - m["idlm_kv_pages_free"])}


def normal_latency(base: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/completions", json=NORMAL, timeout=60)
    r.raise_for_status()
    return time.perf_counter() - t0


def phase_amplification(base: str, stream_it: bool, reps: int = 7) -> dict:
    alone = statistics.median(normal_latency(base) for _ in range(reps))
    answers, during = [], []
    for _ in range(reps):
        out = {}

        def send():
            t0 = time.perf_counter()
            r = httpx.post(base + "/v1/completions", json={**AMPLIFICATION, "stream": stream_it}, timeout=600)
            out["status"], out["s"] = r.status_code, time.perf_counter() - t0
            out["code"] = (r.json().get("error") or {}).get("code") if r.status_code != 200 else None

        th = threading.Thread(target=send)
        th.start()
        during.append(normal_latency(base))
        th.join()
        answers.append(out)
    m = wait_idle(base)
    return {"phase": "amplification", "stream": stream_it, "request": {**AMPLIFICATION, "prompt": '["x"] * 500'},
            "status": sorted({a["status"] for a in answers}), "code": sorted({str(a["code"]) for a in answers}),
            "answer_s_max": round(max(a["s"] for a in answers), 4),
            "answer_s_median": round(statistics.median(a["s"] for a in answers), 4),
            "normal_latency_alone_s": round(alone, 4), "normal_latency_during_s": round(statistics.median(during), 4),
            "leaked_pages": int(m["idlm_kv_pages_total"] - m["idlm_kv_pages_free"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--leavers", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("serve_args", nargs="*", help="extra `idlm serve` options (after --)")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "idlm.cli", "serve", "--port", str(port), "--log-level", "warning", *args.serve_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        normal_latency(base)  # warm up
        phases = [phase_streams(base, args.streams, args.max_tokens), phase_leavers(base, args.leavers, 64),
                  phase_amplification(base, True), phase_amplification(base, False)]
        for p in phases:
            print(json.dumps(p), flush=True)
        health = httpx.get(base + "/health", timeout=10).status_code
    finally:
        proc.terminate()
        proc.wait(60)
    s, lv, a1, a2 = phases
    print(json.dumps({"summary": True, "command": " ".join(["idlm serve", *args.serve_args]),
                      "streams_errors": s["errors"], "leavers_errors": lv["errors"],
                      "leaked_pages": s["leaked_pages"] + lv["leaked_pages"] + a1["leaked_pages"] + a2["leaked_pages"],
                      "amplification_answer_s_max": max(a1["answer_s_max"], a2["answer_s_max"]),
                      "amplification_status": sorted(set(a1["status"] + a2["status"])),
                      "normal_latency_alone_s": a1["normal_latency_alone_s"],
                      "normal_latency_during_s": max(a1["normal_latency_during_s"], a2["normal_latency_during_s"]),
                      "health_after": health, "server_exit_code": proc.returncode}))


if __name__ == "__main__":
    main()
