"""`idlm bench offline`: engine speed vs concurrency on a fixed prompt set.

For each concurrency C, waves of exactly C requests are submitted together (`num_requests` in all,
default max(8, 2·C)); a wave runs to completion before the next starts, so every request decodes
alongside C − 1 others from its first token to its last. Reported per C:
- per-request decode speed: mean over requests of (tokens − 1) / (finish − first token) — the
  user-visible tokens/s once streaming starts (the paper's per-request tok/s, SPEC §9),
- throughput: all generated tokens / wall time, and TPF (committed tokens per decode forward).
A warm-up pass over the same workload runs first (untimed) so CUDA-graph capture is not measured.
Outputs are fixed length (`ignore_eos`, `max_tokens`) so every decoder generates the same token count.
"""

from __future__ import annotations

import statistics
import time

from idlm.decoding.sampling import SamplingParams
from idlm.eval.tasks import COMMITTED_TASKS, load_jsonl


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat prompts from the committed held-out tasks, kinds interleaved (deterministic)."""
    rows = load_jsonl(COMMITTED_TASKS)
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    out = []
    i = 0
    while len(out) < n:
        k = kinds[i % len(kinds)]
        r = by_kind[k][(i // len(kinds)) % len(by_kind[k])]
        msgs = [{"role": "user", "content": r["prompt"]}]
        out.append(tokenizer.encode_chat(msgs) if tokenizer.chat_template else tokenizer.encode(r["prompt"]))
        i += 1
    return out


def _run(engine, prompts, params, wave: int) -> dict:
    seqs = []
    forwards0, decode_t0 = engine.counters["decode_forwards"], engine.counters["decode_time_s"]
    t0 = time.perf_counter()
    for i in range(0, len(prompts), wave):
        seqs += [engine.seqs[engine.add_request(p, params)] for p in prompts[i: i + wave]]
        while engine.has_unfinished():
            engine.step()
    wall = time.perf_counter() - t0
    speeds = [(len(s.output.token_ids) - 1) / (s.finish_time - s.first_token_time)
              for s in seqs if len(s.output.token_ids) > 1 and s.finish_time > s.first_token_time]
    tokens = sum(len(s.output.token_ids) for s in seqs)
    committed = sum(s.output.stats.committed for s in seqs)
    forwards = sum(s.output.stats.forwards for s in seqs)
    ttft = [s.first_token_time - s.arrival for s in seqs]
    return {"requests": len(seqs), "generated_tokens": tokens, "wall_s": round(wall, 4),
            "throughput_tok_s": round(tokens / wall, 1),
            "per_request_tok_s": round(statistics.mean(speeds), 1) if speeds else None,
            "tpf": round(committed / forwards, 4) if forwards else None,
            "batch_forwards": engine.counters["decode_forwards"] - forwards0,
            # wall time of one decode step (forward + acceptance + host bookkeeping), averaged
            "decode_step_ms": round(1e3 * (engine.counters["decode_time_s"] - decode_t0)
                                    / max(1, engine.counters["decode_forwards"] - forwards0), 4),
            "mean_ttft_s": round(statistics.mean(ttft), 4)}


def bench_offline(engine, prompts: list[list[int]], concurrency: list[int], max_tokens: int = 128,
                  temperature: float = 0.0, num_requests: int | None = None, warmup: bool = True) -> list[dict]:
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=0)
    results = []
    for c in concurrency:
        n = num_requests or max(8, 2 * c)
        work = [prompts[i % len(prompts)] for i in range(n)]
        engine.scheduler.max_num_seqs = c
        if warmup:
            _run(engine, work, params, c)
        r = _run(engine, work, params, c)
        r["concurrency"] = c
        results.append(r)
        if engine.block_manager.num_free_blocks != engine.block_manager.num_blocks:
            raise RuntimeError("KV pages leaked during the benchmark")
    return results
