"""The engine's host time per decode step, without the model: each decode forward is replaced by the
result of the first one of its (stride, batch) (a cached-output runner), so what is timed is the engine's
Python work — scheduling, the decoder's inputs and finish, commits, stop checks, detokenization — and the
garbage collector's pauses inside it, with and without `freeze_gc`.

Why: on the GPU a small model's step is mostly host time, and a full garbage collection during a
benchmark run is a stall of ~100 ms (docs/engine.md, "Garbage collection"). This measures both on any
machine, e.g. AR vs ISD N = 4 at batch 256:

    python scripts/host_overhead.py                       (idlm-tiny, CPU; JSON lines, a summary last)

Environment: CASES ("ar:1:256,isd:4:256"; decoder:stride:concurrency), TEMPERATURE (1.0), MAX_TOKENS (64).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench.offline import bench_prompts  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine, freeze_gc  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402


def cached_decode(engine) -> None:
    """Each (stride, batch) decode forward computed once, then returned again (its tokens repeat: fine for
    timing the host, meaningless as output)."""
    real, cache = engine.runner.decode, {}

    def decode(batch, decoder, tensors, static):
        rows = len(batch) if isinstance(batch, list) else batch.tokens.shape[0]
        key = (decoder.stride, rows)
        if key not in cache:
            cache[key] = real(batch, decoder, tensors, static)
        return cache[key]

    engine.runner.decode = decode


def measure(engine, prompts, params) -> dict:
    pauses = {"s": 0.0, "full": 0}
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses["s"] += time.perf_counter() - started[0]
            pauses["full"] += info["generation"] == 2

    steps0, secs0 = engine.counters["decode_forwards"], engine.counters["decode_time_s"]
    gc.callbacks.append(on_gc)
    try:
        engine.run(prompts, params)
    finally:
        gc.callbacks.remove(on_gc)
    steps = engine.counters["decode_forwards"] - steps0
    secs = engine.counters["decode_time_s"] - secs0
    return {"steps": steps, "host_ms_per_step": round(1e3 * secs / steps, 3),
            "host_us_per_row_step": round(1e6 * secs / steps / len(prompts), 2),
            "gc_ms_per_step": round(1e3 * pauses["s"] / steps, 3), "full_collections": pauses["full"]}


def main() -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    cases = [c.split(":") for c in os.environ.get("CASES", "ar:1:256,isd:4:256").split(",")]
    temperature = float(os.environ.get("TEMPERATURE", "1.0"))
    max_tokens = int(os.environ.get("MAX_TOKENS", "64"))
    out = {"temperature": temperature, "max_tokens": max_tokens, "cases": {}}
    for decoder, stride, conc in cases:
        model, tok = load_pretrained("idlm-tiny-ar" if decoder == "ar" else "idlm-tiny", dtype="float32",
                                     device="cpu")
        prompts = bench_prompts(tok, int(conc))
        eng = LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=int(stride), max_num_seqs=int(conc),
                                                 num_pages=4096, cuda_graphs=False))
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
                  for i in range(int(conc))]
        eng.run(prompts, params)  # the real forwards once (their outputs are what the cache returns)
        cached_decode(eng)
        eng.run(prompts, params)  # every (stride, batch) cached
        gc.unfreeze()
        plain = measure(eng, prompts, params)
        freeze_gc()
        frozen = measure(eng, prompts, params)
        key = f"{decoder}:{stride}:{conc}"
        out["cases"][key] = {"collector_live": plain, "after_freeze_gc": frozen}
        print(json.dumps({key: out["cases"][key]}), flush=True)
        del eng
    print(json.dumps({"summary": True, **out}))


if __name__ == "__main__":
    main()
