"""Host time of a CUDA-graph replay's input packing, per decode step, measured on any machine (no GPU).

Why: at batch 1 a small model's decode step on the H200 is ~0.5-0.9 ms, more than half of it host time
(docs/sampling.md), and every replay first packs the step's host inputs (token ids, positions, KV slots,
block tables, the decoder's per-row tensors) into two pinned staging buffers. This times exactly the
replay path's packing (`ModelRunner._batch_arrays`, `_decoder_inputs`, `_fill`) on the inputs of a real
decode step of idlm-tiny, captured from a CPU engine run, for greedy and sampled ISD and AR steps.

    python scripts/host_pack.py            (JSON lines, a summary last)

Environment: CASES ("ar:1:1,isd:4:1,ar:1:64,isd:4:64"; decoder:stride:batch), REPS (2000). Each case prints
the packing's µs per step and, beside it, the torch-ops packing (reshape, cast, cat per input) it replaced.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine import model_runner as mr  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402


def captured_step(model, tok, decoder: str, stride: int, batch: int, temperature: float):
    """(runner, decode arguments) of the last decode step of a small run."""
    eng = LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=stride, max_num_seqs=batch,
                                             num_pages=batch * 8 + 8))
    seen = {}
    real = eng.runner.decode

    def spy(*args):
        seen["args"] = args
        return real(*args)

    eng.runner.decode = spy
    prompts = [[1 + (i + j) % 50 for j in range(6)] for i in range(batch)]
    eng.run(prompts, [SamplingParams(temperature=temperature, max_tokens=10, ignore_eos=True, seed=i)
                      for i in range(batch)])
    return eng.runner, seen["args"]


def pack_us(runner, args, reps: int) -> dict:
    """Microseconds per replay-side packing of this step's inputs (device-resident decoder tensors, such as
    a kept q̃ on the GPU, are not packed: they are left out here too), beside the torch-ops packing it
    replaced, and the number of packed inputs."""
    batch, decoder, tensors, static = args
    B, pages = batch.tokens.shape[0], batch.tables.shape[1]
    Bp = runner.bucket(B)
    M = min(mr._pow2_at_least(pages, runner.min_table), runner.max_pages)
    tensors = {k: v for k, v in tensors.items() if k != "q_old"}  # on the GPU a device tensor
    host = runner._batch_arrays(batch, Bp, M)
    host.update(mr._decoder_inputs(tensors)[0])
    layout, staging, _ = mr._pack(host, Bp, "cpu", pin=False)
    views = {g: t.numpy() for g, t in staging.items()}

    def once():
        h = runner._batch_arrays(batch, Bp, M)
        on_host, _ = mr._decoder_inputs(tensors)
        h.update(on_host)
        mr._fill(views, layout, h, Bp)

    def with_torch():  # the packing this replaced (torch ops per input), for comparison
        h = runner._batch_tensors(batch, Bp, M)
        on_host, _ = mr._decoder_inputs(tensors)
        h.update({k: mr._pad_rows(v, Bp) for k, v in on_host.items()})
        for group, names in layout.items():
            torch.cat([h[n].reshape(Bp, -1).to(staging[group].dtype) for n, *_ in names], dim=1,
                      out=staging[group])

    def timed(fn) -> float:
        for _ in range(min(200, reps)):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round((time.perf_counter() - t0) / reps * 1e6, 1)

    return {"pack_us": timed(once), "torch_cat_us": timed(with_torch), "inputs": len(host)}


def main() -> None:
    cases = [c.split(":") for c in os.environ.get("CASES", "ar:1:1,isd:4:1,ar:1:64,isd:4:64").split(",")]
    reps = int(os.environ.get("REPS", "2000"))
    models = {}
    out = {}
    for decoder, stride, batch in cases:
        name = "idlm-tiny-ar" if decoder == "ar" else "idlm-tiny"
        if name not in models:
            models[name] = load_pretrained(name)
        for temperature in (0.0, 1.0):
            runner, args = captured_step(*models[name], decoder, int(stride), int(batch), temperature)
            key = f"{decoder}{stride}_b{batch}_T{temperature:g}"
            out[key] = pack_us(runner, args, reps)
            print(json.dumps({key: out[key]}), flush=True)
    print(json.dumps({"summary": True, **{k: [v["pack_us"], v["torch_cat_us"]] for k, v in out.items()}}))


if __name__ == "__main__":
    main()
