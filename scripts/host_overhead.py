"""The engine's host time per decode step, without the model: each decode forward is replaced by the
result of the first one of its (stride, batch) (a cached-output runner), so what is timed is the engine's
Python work — scheduling, the decoder's inputs and finish, commits, stop checks, detokenization — and the
garbage collector's pauses inside it, with and without `freeze_gc`.

Why: on the GPU a small model's step is mostly host time, and a full garbage collection during a
benchmark run is a stall of ~100 ms (docs/engine.md, "Garbage collection"). This measures both on any
machine, e.g. AR vs ISD N = 4 at batch 256:

    python scripts/host_overhead.py                       (idlm-tiny, CPU; JSON lines, a summary last)

Environment: CASES ("ar:1:256,isd:4:256"; decoder:stride:concurrency; stride "auto" or "autoM": the adaptive
stride, at most M — "isd:auto1:1" is an adaptive engine's plain AR steps, to set against "ar:1:1"),
TEMPERATURE (1.0), MAX_TOKENS (64), DEVICE_MS (0: a step's results reach the host this long after its launch, as
from a GPU; then "host ms per step" is the whole step, and work the engine does between launch and sync is hidden
behind the device),
TEXT_REPS (0; n: also n interleaved runs against an engine that detokenizes right after the sync, medians):

    CASES=ar:1:64,isd:4:64 TEMPERATURE=0.7 DEVICE_MS=1 TEXT_REPS=9 python scripts/host_overhead.py
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench.offline import bench_prompts  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine, freeze_gc  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402


class _DeviceResult:
    """A decode step's packed output as a GPU gives it: `.cpu()` (the engine's one host sync) returns only
    once `device_s` have passed since the launch."""

    def __init__(self, packed, ready: float):
        self.packed, self.ready = packed, ready

    def cpu(self):
        while time.perf_counter() < self.ready:
            pass
        return self.packed


def cached_decode(engine, device_ms: float = 0.0) -> None:
    """Each (stride, batch) decode forward computed once, then returned again (its tokens repeat: fine for
    timing the host, meaningless as output). device_ms > 0: the step's results reach the host that long
    after the launch, as from a GPU, so host work the engine does between launch and sync is hidden."""
    real, cache = engine.runner.decode, {}

    def decode(batch, decoder, tensors, static):
        rows = len(batch) if isinstance(batch, list) else batch.tokens.shape[0]
        key = (decoder.stride, rows)
        if key not in cache:
            cache[key] = real(batch, decoder, tensors, static)
        if device_ms > 0 and cache[key][0] is not None:
            return _DeviceResult(cache[key][0], time.perf_counter() + device_ms / 1e3), cache[key][1]
        return cache[key]

    engine.runner.decode = decode


class TextAfterSync(LLMEngine):
    """The engine as it was before session 16: each step's text detokenized right after the host sync
    (`LLMEngine._stream_text` makes it while the device runs the next step)."""

    def _emit(self, seq, res, from_decode, updates):
        super()._emit(seq, res, from_decode, updates)
        seq.checker.flush_text()


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


def stride_options(stride: str) -> dict:
    """A case's stride field: an integer N, "auto" (the adaptive stride), or "autoM" (the adaptive stride
    with at most M: "auto1" runs only plain AR steps through the adaptive engine's path)."""
    if stride.startswith("auto"):
        return {"stride": "auto", **({"auto_max_stride": int(stride[4:])} if stride[4:] else {})}
    return {"stride": int(stride)}


def main() -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    cases = [c.split(":") for c in os.environ.get("CASES", "ar:1:256,isd:4:256").split(",")]
    temperature = float(os.environ.get("TEMPERATURE", "1.0"))
    max_tokens = int(os.environ.get("MAX_TOKENS", "64"))
    device_ms = float(os.environ.get("DEVICE_MS", "0"))
    text_reps = int(os.environ.get("TEXT_REPS", "0"))
    out = {"temperature": temperature, "max_tokens": max_tokens, "device_ms": device_ms, "cases": {}}
    for decoder, stride, conc in cases:
        model, tok = load_pretrained("idlm-tiny-ar" if decoder == "ar" else "idlm-tiny", dtype="float32",
                                     device="cpu")
        prompts = bench_prompts(tok, int(conc))
        eng = LLMEngine(model, tok, EngineConfig(decoder=decoder, max_num_seqs=int(conc), num_pages=4096,
                                                 cuda_graphs=False, **stride_options(stride)))
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
                  for i in range(int(conc))]
        eng.run(prompts, params)  # the real forwards once (their outputs are what the cache returns)
        cached_decode(eng, device_ms)
        eng.run(prompts, params)  # every (stride, batch) cached
        gc.unfreeze()
        plain = measure(eng, prompts, params)
        freeze_gc()
        frozen = measure(eng, prompts, params)
        key = f"{decoder}:{stride}:{conc}"
        out["cases"][key] = {"collector_live": plain, "after_freeze_gc": frozen}
        if text_reps:  # where the text is made: while the device runs the step vs right after the sync
            late = TextAfterSync(model, tok, eng.config)
            late.run(prompts, params)
            cached_decode(late, device_ms)
            late.run(prompts, params)
            reps = {"while_device_runs": [], "after_sync": []}
            for _ in range(text_reps):  # interleaved
                for name, e in (("while_device_runs", eng), ("after_sync", late)):
                    reps[name].append(measure(e, prompts, params)["host_ms_per_step"])
            out["cases"][key]["text"] = {name: {"median_ms_per_step": statistics.median(v), "reps": v}
                                         for name, v in reps.items()}
            del late
        print(json.dumps({key: out["cases"][key]}), flush=True)
        del eng
    print(json.dumps({"summary": True, **out}))


if __name__ == "__main__":
    main()
