"""GPU driver for issue 13's speed table: idlm-tiny ISD with the adaptive stride (`--stride auto`) and
with a fixed N = 4, each against AR on the same model, same prompts, same run (interleaved reps, median),
per-request tok/s over T ∈ {0, 0.7, 1} × C ∈ {1, 8, 64, 256}; plus each cell's stride mix and TPF.

    python scripts/bench_stride.py                 (bf16, CUDA graphs; JSON lines, a summary last,
                                                    and $OUT/bench_stride.json)
Environment: REPS (default 3), MAX_TOKENS (128), CONCURRENCY ("1,8,64,256"), TEMPERATURES ("0,0.7,1"),
MODES ("auto,n4"; also n2 … n8, fixed strides — e.g. MODES=n2,n3,n5,n6,n7,n8 TEMPERATURES=0
CONCURRENCY=1 for the best fixed N the issue compares `auto` with at T = 0, C = 1; the whole table took
more than the device's 10-minute call limit on the H200: run MODES=auto and MODES=n4 as two calls, and
split `auto` by TEMPERATURES if it explores many strides — each new stride compiles its step once),
AUTO_MAX_STRIDE (8: the largest N `auto` may pick; the issue's table uses 8), PHASES ("1": after each C = 1
cell, `step_phases` of one request on that cell's engine and its AR engine, as the cell left them: the
H200 tables had the auto engine's sampled steps, its plain AR ones too, dearer than the AR engine's in the
cells but not alone, docs/stride.md attempt 10).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record  # noqa: E402
from idlm.bench.offline import (  # noqa: E402
    ar_engine_for,
    bench_compare,
    bench_prompts,
    sample_trace,
    step_phases,
    traced_choices,
)
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402


def dynamo_graphs() -> int:
    """torch.compile graphs compiled so far in this process (every engine's, the AR baseline's too)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    reps = int(os.environ.get("REPS", "3"))
    max_tokens = int(os.environ.get("MAX_TOKENS", "128"))
    conc = [int(x) for x in os.environ.get("CONCURRENCY", "1,8,64,256").split(",")]
    temps = [float(x) for x in os.environ.get("TEMPERATURES", "0,0.7,1").split(",")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if dev == "cuda" else "float32"
    model, tok = load_pretrained("idlm-tiny", dtype=dtype, device=dev)
    prompts = bench_prompts(tok, max(64, max(conc)))
    pages = max(1024, max(conc) * 2 * (-(-(200 + max_tokens) // 16)))
    out = {**environment(dev),
           "dtype": dtype, "reps": reps, "max_tokens": max_tokens, "num_pages": pages}
    table = {}

    def save() -> None:  # after every cell: a call stopped by the device's time limit keeps what it measured
        out["table"] = table
        out["min_over_ar"] = {k: min(r["over_ar"] for r in v) for k, v in table.items() if v}
        out["min_over_ar_paired"] = {k: min(r["over_ar_paired"] for r in v) for k, v in table.items() if v}
        save_record(out, "bench_stride.json")

    modes = os.environ.get("MODES", "auto,n4").split(",")  # one per call fits the device's 10-minute limit
    for label in modes:
        if label != "auto" and not (label[:1] == "n" and label[1:].isdigit() and 2 <= int(label[1:]) <= 8):
            raise SystemExit(f"MODES: {label!r} is neither 'auto' nor n2 … n8")
        stride = "auto" if label == "auto" else int(label[1:])
        t0 = time.perf_counter()
        auto = {"auto_max_stride": int(os.environ.get("AUTO_MAX_STRIDE", "8"))} if stride == "auto" else {}
        eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=stride, max_num_seqs=max(conc),
                                                 num_pages=pages, **auto))
        calib_s = time.perf_counter() - t0
        # compile and capture every stride before the cells (LLMEngine.warmup): the cost measured here,
        # not inside a cell's warm-up run
        compiles = dynamo_graphs()
        out.setdefault("warmup_s", {})[label] = eng.warmup()
        out.setdefault("warmup_compiles", {})[label] = dynamo_graphs() - compiles
        print(json.dumps({"warmup_s": {label: out["warmup_s"][label]}}), flush=True)
        ar = ar_engine_for(eng)
        if stride == "auto":
            c = eng._cost.model
            out["cost_model"] = {"base": c.base, "per_row": c.per_row, "per_token": c.per_token,
                                 "engine_start_s": round(calib_s, 2), "scales": eng._cost.scale}
        table[label] = []
        for t in temps:
            for cc in conc:
                t_cell, graphs, compiles = time.perf_counter(), eng.runner.graphs_captured, dynamo_graphs()
                # each choice of the policy (`traced_choices`: batch, stride, its rate, every rate, step times)
                with traced_choices(eng) if stride == "auto" else contextlib.nullcontext([]) as trace:
                    r = bench_compare(eng, prompts, [cc], [t], max_tokens=max_tokens, reps=reps, ar_engine=ar)[0]
                row = {"temperature": r["temperature"], "concurrency": r["concurrency"],
                       "tok_s": r["per_request_tok_s"], "ar_tok_s": r["ar"]["per_request_tok_s"],
                       "over_ar": r["per_request_over_ar"], "over_ar_paired": r["per_request_over_ar_paired"],
                       "tpf": r["tpf"], "stride_mix": r.get("stride_mix"),
                       "row_stride_mix": r.get("row_stride_mix"),
                       "step_ms": r["decode_step_ms"], "ar_step_ms": r["ar"]["decode_step_ms"],
                       "reps": r.get("reps_per_request_tok_s"), "ar_reps": r["ar"].get("reps_per_request_tok_s"),
                       "eager_fallbacks": r.get("eager_fallbacks"), "compile_fallbacks": r.get("compile_fallbacks"),
                       # wall time of the cell (warm-up included: compiles and graph captures show here)
                       "cell_s": round(time.perf_counter() - t_cell, 1),
                       "new_graphs": eng.runner.graphs_captured - graphs,
                       "new_compiles": dynamo_graphs() - compiles}  # torch.compile graphs (seconds each)
                if stride == "auto":  # what the policy knew at the end of the cell (ms per step)
                    row["step_times_ms"] = {n: round(v * 1e3, 4) for n, v in
                                            eng._times.seconds(eng.runner.bucket(cc)).items()}
                    row["cost_scales"] = {n: round(v, 3) for n, v in eng._cost.scale.items()}
                    # the choices of the cell (AR runs and warm-up runs included), at most 24 spread evenly:
                    # why a stride was taken (its rate in tokens/s against the runner-ups')
                    row["choices"] = sample_trace(trace)
                    row["choices_n"] = len(trace)
                if cc == 1 and os.environ.get("PHASES") == "1":  # the cell's engines, as the cell left them
                    params = SamplingParams(temperature=t, max_tokens=max_tokens, ignore_eos=True, seed=0)
                    row["phases"] = {name: step_phases(e, prompts[0], params) for name, e in (("mode", eng),
                                                                                              ("ar", ar))}
                table[label].append(row)
                print(json.dumps({label: row}), flush=True)
                save()
        del eng, ar
        if dev == "cuda":
            torch.cuda.empty_cache()
    save()
    print(json.dumps({"summary": True, **{k: v for k, v in out.items() if k != "table"}}), flush=True)


if __name__ == "__main__":
    main()
