"""Running a real server in tests: uvicorn on a free port in a thread, and the checks every test repeats.

`serving(app)` yields the base URL of a live uvicorn server (real sockets, real HTTP, so the `openai`
client, disconnects and slow clients behave as in production) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, **config):
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            httpx.get(base + "/version", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        srv.should_exit = True
        th.join(15)


def wait_idle(llm, timeout: float = 15.0) -> dict:
    """Wait until the engine runs nothing, queues nothing and every KV page is free; its stats."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = llm.stats()
        if s["pages_free"] == s["pages_total"] and s["num_running"] == 0 and s["num_waiting"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle (KV pages not freed?): {llm.stats()}")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def assert_still_serving(base: str, llm, model: str, headers: dict | None = None) -> None:
    """After a bad request: a normal request succeeds, and /metrics shows nothing running and all pages free."""
    r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "def f(x):", "max_tokens": 4,
                                                   "temperature": 0}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] is not None
    wait_idle(llm)
    m = httpx.get(base + "/metrics", headers=headers, timeout=10).text
    assert metric(m, "idlm_running_requests") == 0
    assert metric(m, "idlm_waiting_requests") == 0
    assert metric(m, "idlm_kv_pages_free") == metric(m, "idlm_kv_pages_total")
    assert metric(m, "idlm_engine_healthy") == 1


def wait_healthy(base: str, proc=None, timeout: float = 120.0) -> None:
    """Wait until /health answers 200 (raising if `proc`, the server process, exits first)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"idlm serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{base} did not become healthy within {timeout} s")


def start_serve(port: int, *options: str, env: dict | None = None) -> subprocess.Popen:
    """`idlm serve` as a user runs it (a process of its own, so signals and exit codes are real), healthy."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "idlm.cli", "serve", "--port", str(port), "--log-level", "warning", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    except BaseException:
        proc.kill()
        raise
    return proc
