"""Random OpenAI-style requests against `idlm serve`: a bad request is answered, never fatal.

Why: the server's hardening tests each send one kind of bad input; a client in the wild mixes them — wrong
types, out-of-range values, empty message lists, token-id prompts past the vocabulary, streams the client
leaves, n > 1 with logprobs and echo, per-request strides and draft settings — from several connections at
once. This sends such requests (most valid, about a third with something wrong) from 6 threads and checks:

- no response is a 5xx and no request raises in the client (a 4xx names the problem; a valid one is 200);
- no stream carries an error event for a request the server accepted;
- afterwards the server is healthy and holds no KV page (`idlm_kv_pages_used` 0 in /metrics).

    python scripts/fuzz_server.py [--url http://127.0.0.1:8000] [--requests 300] [--seed 0]

Without --url it starts `idlm serve` (the embedded default model) on a free port and stops it at the end.
Prints one JSON line, the summary; exit status 1 when a check failed. Session 40: 1,200 requests, none failed
(docs/engine.md, "Random configurations").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

WORDS = ["hello", "def f(x):", "print(", "1 + 1 =", "\u00e9\u00e8\u4e2d\u6587", "\n\n", " ", "emoji \U0001F600",
         "a" * 300]
THREADS = 6


def value(r: random.Random, kind: str):
    """A valid value of this kind, or (12%) a wrong one: out of range, another type, null."""
    if r.random() < 0.12:
        return r.choice([-1, 0, 2**70, "3", 1.5, None]) if kind == "int" else r.choice([-1.0, "x", 1e30, None])
    return r.choice([1, 2, 5, 16, 40]) if kind == "int" else r.choice([0, 0.3, 0.7, 1.0, 1.5])


def request_body(r: random.Random, chat: bool) -> dict:
    b: dict = {}
    if chat:
        msgs = []
        for _ in range(r.randint(1, 3)):
            role = r.choice(["system", "user", "assistant", "user"]) if r.random() > 0.05 else "bogus"
            content = " ".join(r.choice(WORDS) for _ in range(r.randint(0, 4)))
            msgs.append({"role": role, "content": [{"type": "text", "text": content}] if r.random() < 0.1
                         else content})
        b["messages"] = msgs if r.random() > 0.03 else []
    else:
        k = r.random()
        if k < 0.6:
            b["prompt"] = " ".join(r.choice(WORDS) for _ in range(r.randint(0, 5)))
        elif k < 0.75:  # token ids, now and then one outside the vocabulary
            b["prompt"] = [r.randint(-2, 90000) if r.random() < 0.05 else r.randint(0, 500)
                           for _ in range(r.randint(0, 20))]
        elif k < 0.9:
            b["prompt"] = [r.choice(WORDS) for _ in range(r.randint(1, 3))]
        else:
            b["prompt"] = [[r.randint(0, 500) for _ in range(r.randint(1, 8))] for _ in range(r.randint(1, 3))]
    if r.random() < 0.8:
        b["max_tokens"] = value(r, "int")
    for key, kind in (("temperature", "float"), ("top_p", "float"), ("top_k", "int"), ("seed", "int"),
                      ("n", "int"), ("stride", "int"), ("draft_temperature", "float")):
        if r.random() < 0.3:
            v = value(r, kind)
            if key == "top_p" and isinstance(v, (int, float)) and r.random() < 0.9:
                v = min(max(v, 0.05), 1.0)
            if key == "n" and isinstance(v, int):
                v = min(v, 4)
            b[key] = v
    if r.random() < 0.2:
        b["stop"] = r.choice(["\n", ["the", "x"], "", [], ["a"] * 3])
    if r.random() < 0.15:
        b["stop_token_ids"] = [r.randint(0, 600)]
    if r.random() < 0.2:
        b["stream"] = True
        if r.random() < 0.5:
            b["stream_options"] = {"include_usage": True}
    if r.random() < 0.15:
        if chat:
            b.update(logprobs=True, top_logprobs=r.choice([0, 2, 5, 25]))
        else:
            b.update(logprobs=r.choice([0, 2, 5, 25]), echo=r.random() < 0.5)
    for key, choices, p in (("verification", ["block", "token", "nope"], 0.1),
                            ("draft", ["sample", "argmax", "argmax-ratio"], 0.1), ("ignore_eos", [True], 0.1),
                            ("best_of", [1, 2], 0.05), ("unknown_field", [1], 0.05)):
        if r.random() < p:
            b[key] = r.choice(choices)
    return b


def fuzz(base: str, requests: int, seed: int) -> dict:
    """Send `requests` random requests from THREADS connections -> {status counts, faults (the first 10),
    faults, health, pages in use}."""
    faults, codes, lock = [], {}, threading.Lock()

    def fault(**what):
        with lock:
            faults.append(what)

    def worker(wid: int) -> None:
        r = random.Random(seed * 1000 + wid)
        with httpx.Client(base_url=base, timeout=120) as c:
            for _ in range(requests // THREADS):
                chat = r.random() < 0.5
                b = request_body(r, chat)
                path = "/v1/chat/completions" if chat else "/v1/completions"
                try:
                    if r.random() < 0.03:  # not JSON at all
                        code = c.post(path, content=b"{not json", headers={"content-type": "application/json"}
                                      ).status_code
                    elif b.get("stream"):
                        with c.stream("POST", path, json=b) as resp:
                            code = resp.status_code
                            for line in resp.iter_lines():
                                if r.random() < 0.02:
                                    break  # the client goes away mid-stream
                                if code == 200 and line.startswith("data: ") and line != "data: [DONE]" \
                                        and "error" in json.loads(line[6:]):
                                    fault(stream_error=line[:300], body=b)
                    else:
                        resp = c.post(path, json=b)
                        code = resp.status_code
                    with lock:
                        codes[code] = codes.get(code, 0) + 1
                    if code >= 500:
                        fault(code=code, body=b)
                except Exception as e:  # noqa: BLE001 — a dropped connection is a fault
                    fault(exception=repr(e)[:200], body=b)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pages = None
    with httpx.Client(base_url=base, timeout=30) as c:
        for _ in range(100):  # the last aborted streams' pages come back within a step or two
            health = c.get("/health").status_code
            used = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("idlm_kv_pages_used")]
            pages = float(used[0].split()[-1]) if used else None
            if pages == 0:
                break
            time.sleep(0.1)
    return {"status_counts": {str(k): v for k, v in sorted(codes.items())}, "faults": faults[:10],
            "n_faults": len(faults), "health": health, "kv_pages_used": pages}


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "idlm.cli", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"idlm serve exited with status {proc.returncode} before it was healthy")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("idlm serve was not healthy within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start `idlm serve` on a free port)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proc, base = (None, args.url) if args.url else start_server()
    try:
        res = fuzz(base, args.requests, args.seed)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    ok = res["n_faults"] == 0 and res["health"] == 200 and res["kv_pages_used"] == 0
    print(json.dumps({"summary": True, "ok": ok, "requests": args.requests, "seed": args.seed, **res}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
