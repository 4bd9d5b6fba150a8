"""GPU driver for issue 14's measurements on a Qwen3-8B-shaped model (random bf16 weights: a step's cost
does not depend on the values). One call, JSON lines, a summary last, and $OUT/bench_8b.json.

Stages (comma-separated argv[1], default all):
  roofline  context 1024, Q = 1 and 7, batch 1..64: step latency with the split-KV kernel (IDLM_KV_SPLITS=auto)
            and with splits off (=1, the default), and at batch 1..8 with 8 and 16 splits forced, each beside
            the GEMM-only floor (`--roofline`)
  long      context 8k and 32k, batch 1 and 8, Q = 1 and 7: auto splits vs no split vs the reference
            gather + SDPA path, and the non-GEMM share of the step (1 − floor / latency)
  prefill   an 8k-token prompt in one 8k chunk and in 2k chunks: tokens/s, TFLOP/s, fraction of 790
  curve     the projection's input: Q = 1, 3, 5, 7, 15 × batch 1..128 at context 1024 (default: no split)
  profile   torch.profiler of the forward-only decode step (batch 1 and 8, Q = 1 and 7, context 1024): GPU
            kernel time and count per step, top kernels; tables in $OUT/profile_8b.txt (not in the default)

    python scripts/bench_8b.py roofline,long,prefill,curve

SMOKE=1 runs every stage CPU-sized on a tiny random shape (tests this script without a GPU).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record, timed_before_profiled  # noqa: E402
from idlm.bench.latency import bench_latency, bench_prefill  # noqa: E402
from idlm.models.random import random_model  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
results: dict = environment(DEV)


def sizes(batches, context):
    """The stage's batches and context, CPU-sized under SMOKE."""
    return ([1, 2] if SMOKE else batches), (48 if SMOKE else context)


def release():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def emit(key, value):
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def with_splits(splits: str | None, fn):
    old = os.environ.pop("IDLM_KV_SPLITS", None)
    if splits is not None:
        os.environ["IDLM_KV_SPLITS"] = splits
    try:
        return fn()
    finally:
        os.environ.pop("IDLM_KV_SPLITS", None)
        if old is not None:
            os.environ["IDLM_KV_SPLITS"] = old


def stage_roofline(model):
    out = {}
    batches, context = sizes([1, 2, 4, 8, 16, 32, 64], 1024)
    small, _ = sizes([1, 2, 4, 8], 1024)
    # auto and no split at every batch; forced 8 and 16 splits where the programs are few (tunes choose_splits)
    for label, splits, bs in (("auto", "auto", batches), ("nosplit", "1", batches), ("s8", "8", small),
                              ("s16", "16", small)):
        out[label] = with_splits(splits, lambda: bench_latency(model, [1, 7], bs, context,
                                                              iters=2 if SMOKE else 20, roofline=True))
        release()
    emit("roofline", out)


def stage_long(model):
    out = {}
    for context in ((64, 96) if SMOKE else (8192, 32768)):
        for label, splits, attention in (("auto", "auto", "auto"), ("nosplit", "1", "auto"), ("sdpa", None, "sdpa")):
            out[f"{context}/{label}"] = with_splits(splits, lambda: bench_latency(
                model, [1, 7], [1, 8], context, iters=2 if SMOKE else 10, attention=attention,
                roofline=label == "auto"))
            release()
        for r in out[f"{context}/auto"]:
            r["non_gemm_share"] = round(1 - r["gemm_floor_ms"] / r["latency_ms"], 3)
    emit("long", out)


def stage_prefill(model):
    n = 128 if SMOKE else 8192
    out = {f"chunk{c}": bench_prefill(model, n, chunk=c, iters=1 if SMOKE else 3, peak_tflops=790.0)
           for c in ((128, 32) if SMOKE else (8192, 2048))}
    emit("prefill", out)


def stage_profile(model):
    """Where a decode step's time goes beyond the weight matmuls: torch.profiler over the runner's
    forward-only step (CUDA graph, as `bench_latency` times it), batch 1 and 8, Q = 1 and 7, context 1024:
    GPU kernel time and count per step, the costliest kernels; the kernel tables go to
    $OUT/profile_8b.txt."""
    from torch.profiler import ProfilerActivity, profile

    from idlm.bench.profile import summarize
    from idlm.engine.block_manager import PageManager
    from idlm.engine.calibrate import ForwardOnly, context_rows, hold_context
    from idlm.engine.model_runner import ModelRunner

    batches, context = sizes([1, 8], 1024)
    steps = 3 if SMOKE else 20
    runner = ModelRunner(model, 16, (-(-(context + 7) // 16)) * max(batches) + 1, context + 7,
                         cuda_graphs=DEV == "cuda", max_num_seqs=max(batches))
    out, tables = {}, []
    for B in batches:
        bm = PageManager(runner.num_blocks, 16, enable_prefix_caching=False)
        hold_context(bm, list(range(B)), context)
        for Q in (1, 7):
            rows, dec = context_rows(bm, list(range(B)), context, Q), ForwardOnly(Q)
            for _ in range(3):  # capture and warm up outside the profile
                runner.decode(rows, dec, {}, {})[0].tolist()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    runner.decode(rows, dec, {}, {})[0].tolist()
            wall_ms = (time.perf_counter() - t0) * 1e3 / steps
            out[f"B{B}/Q{Q}"] = {"wall_ms_per_step_profiled": round(wall_ms, 4), **summarize(prof, steps)}
            tables.append(f"== batch {B}, Q {Q}, context {context}: {steps} steps ==\n"
                          + prof.key_averages().table(sort_by="self_cuda_time_total" if DEV == "cuda"
                                                      else "self_cpu_time_total", row_limit=30))
            print(json.dumps({f"profile/B{B}/Q{Q}": {k: v for k, v in out[f"B{B}/Q{Q}"].items()
                                                     if not k.startswith("top_host")}}), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_8b.txt"), "w") as f:
            f.write("\n\n".join(tables))
    del runner
    release()
    emit("profile", out)


def stage_curve(model):
    batches, context = sizes([1, 2, 4, 8, 16, 32, 64, 128], 1024)
    emit("curve", bench_latency(model, [1, 3, 5, 7, 15], batches, context, iters=2 if SMOKE else 10))


def main():
    stages = (sys.argv[1] if len(sys.argv) > 1 else "roofline,long,prefill,curve").split(",")
    t0 = time.time()
    if SMOKE:
        shape = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
        model = random_model(shape, dtype="float32", device="cpu")
    else:
        model = random_model("qwen3-8b", dtype="bfloat16", device="cuda")
    results["model_load_s"] = round(time.time() - t0, 1)
    for s in timed_before_profiled(stages, {"profile"}):
        t = time.time()
        globals()[f"stage_{s}"](model)
        results.setdefault("stage_s", {})[s] = round(time.time() - t, 1)
        save_record(results, "bench_8b.json")  # after every stage: a call cut off keeps what it measured
    summary = {"summary": True, "stage_s": results.get("stage_s")}
    if "roofline" in results:
        summary["efficiency_q1"] = {r["batch"]: r["efficiency"] for r in results["roofline"]["auto"]
                                    if r["query_len"] == 1}
    if "prefill" in results:
        summary["prefill_fraction"] = {k: v.get("fraction_of_peak") for k, v in results["prefill"].items()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
