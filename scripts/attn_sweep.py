"""GPU sweep of the paged decode kernel's tuning knobs on a Qwen3-8B head layout, to choose its defaults
(issue 14: at batch 1 and context 1024 the kernel took 49 µs per layer on the H200, ~40x the time its
4 MB of K/V take at the memory's speed — latency-bound, not bandwidth-bound).

For each shape (batch × context × query length) and each setting of
  $IDLM_ATTN_PREFETCH (0/1), $IDLM_ATTN_BLOCK_N (16/32/64/128), $IDLM_ATTN_WARPS (2/4), splits (1, auto, 4..32)
it times the kernel alone — R launches in one CUDA graph, each over its own block tables and pages so that
consecutive launches do not find their K/V in L2 (as consecutive layers would not) — and checks the result
against the default setting's. Reports per shape the default's µs per launch, the best setting and its µs,
and the K/V bytes / µs (GB/s) of both; and the default with its split states combined in the same launch
($IDLM_ATTN_FUSED_COMBINE=1, `default_fused_combine_us`, checked against the same reference).

    python scripts/attn_sweep.py                 (H200: JSON lines, a summary last, $OUT/attn_sweep.json)
    SMOKE=1 python scripts/attn_sweep.py         (CPU, Triton interpreter, two tiny shapes: tests this script)

Environment: SHAPES ("1x1024x1,1x1024x7,8x1024x1,8x1024x7,32x1024x1,1x8192x1,8x8192x1"; batch x context x
query length), REPEAT (launches per graph replay; default: enough for 256 MB of K/V, at most 36), HEADS
("32,8,128": Hq, Hkv, head dim), PREFETCHES / BLOCK_NS / WARPS / ROW_TILES (the grid's values, comma-separated;
ROW_TILES: $IDLM_ATTN_ROW_TILE, default "0" only).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

SMOKE = os.environ.get("SMOKE") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environ_restored, environment, save_record  # noqa: E402
from idlm.layers.paged_kernel import choose_splits, device_sm_count, paged_attention, split_counters  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
# $HEADS "Hq,Hkv,D" (default the Qwen3-8B layout; "9,3,64": SmolLM2-135M's, whose R-ISD blocks of 7 and 16 query
# tokens make 21- and 48-row tiles)
HQ, HKV, D = (4, 2, 16) if SMOKE else tuple(int(x) for x in os.environ.get("HEADS", "32,8,128").split(","))
PAGE = 8 if SMOKE else 16
# the grid's values ($PREFETCHES, $BLOCK_NS, $WARPS, comma-separated), e.g. to sweep fewer settings in one call
PREFETCHES = ("0", "1") if SMOKE else tuple(os.environ.get("PREFETCHES", "0,1").split(","))
BLOCK_NS = ("32", "64") if SMOKE else tuple(os.environ.get("BLOCK_NS", "16,32,64,128").split(","))
WARPS = ("4",) if SMOKE else tuple(os.environ.get("WARPS", "2,4").split(","))
# $ROW_TILES: query rows per program of a split launch ($IDLM_ATTN_ROW_TILE; "0": the whole block), e.g. "0,16,32"
ROW_TILES = ("0",) if SMOKE else tuple(os.environ.get("ROW_TILES", "0").split(","))
KNOBS = ("IDLM_ATTN_PREFETCH", "IDLM_ATTN_BLOCK_N", "IDLM_ATTN_WARPS", "IDLM_ATTN_ROW_TILE")


def settings(batch: int, context: int) -> list[dict]:
    auto = choose_splits(batch, HKV, context, device_sm_count(torch.device(DEV)))
    splits = sorted({1, auto} | ({2} if SMOKE else {s for s in (4, 8, 16, 32) if s * 64 <= context}))
    # 16-key tiles: what vLLM's Triton decode kernel uses for 16-bit caches (many short, pipelined iterations)
    grid = itertools.product(PREFETCHES, BLOCK_NS, WARPS, ROW_TILES, splits)
    return [{"IDLM_ATTN_PREFETCH": p, "IDLM_ATTN_BLOCK_N": n, "IDLM_ATTN_WARPS": w, "IDLM_ATTN_ROW_TILE": r,
             "splits": s} for p, n, w, r, s in grid if r == "0" or s > 1]


def launch_set(batch: int, context: int, q_len: int, repeat: int, g: torch.Generator):
    """`repeat` independent launches' inputs (own tables, so own pages) over one pool."""
    pages_per_row = -(-(context + q_len) // PAGE)
    total = batch * pages_per_row * repeat
    dtype = torch.float32 if SMOKE else torch.bfloat16
    kp = torch.randn(total * PAGE + 1, HKV, D, generator=g).to(DEV, dtype)
    vp = torch.randn(total * PAGE + 1, HKV, D, generator=g).to(DEV, dtype)
    perm = torch.randperm(total, generator=g).to(DEV).view(repeat, batch, pages_per_row)
    last = (context + torch.arange(q_len)).repeat(batch, 1).to(DEV)  # every row sees its whole context
    q = [torch.randn(batch, q_len, HQ, D, generator=g).to(DEV, dtype).transpose(1, 2) for _ in range(repeat)]
    counters = split_counters(batch * HKV, DEV)  # the fused combine's tickets ($IDLM_ATTN_FUSED_COMBINE=1)
    return kp, vp, perm, last, q, counters


def run(inputs, splits: int) -> list[torch.Tensor]:
    kp, vp, perm, last, q, counters = inputs
    return [paged_attention(q[r], kp, vp, perm[r], last, PAGE, splits=splits, counters=counters)
            for r in range(len(q))]


def time_setting(inputs, splits: int, iters: int) -> float:
    """Seconds per launch: the launches captured in one CUDA graph, replayed `iters` times (CPU: eager)."""
    repeat = len(inputs[4])
    if SMOKE:
        t0 = time.perf_counter()
        run(inputs, splits)
        return (time.perf_counter() - t0) / repeat
    run(inputs, splits)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(inputs, splits)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters / repeat


def main() -> None:
    spec = os.environ.get("SHAPES", "1x64x1,2x40x7" if SMOKE else
                          "1x1024x1,1x1024x7,8x1024x1,8x1024x7,32x1024x1,1x8192x1,8x8192x1")
    shapes = [tuple(int(x) for x in s.split("x")) for s in spec.split(",")]
    g = torch.Generator().manual_seed(0)
    out = {**environment(DEV), "heads": [HQ, HKV, D], "page": PAGE, "shapes": {}}
    t_start = time.time()
    with environ_restored(KNOBS):
        for batch, context, q_len in shapes:
            kv_bytes = 2 * batch * (context + q_len) * HKV * D * (4 if SMOKE else 2)
            repeat = int(os.environ.get("REPEAT", "0")) or max(1, min(36, (256 << 20) // kv_bytes))
            inputs = launch_set(batch, context, q_len, 2 if SMOKE else repeat, g)
            for k in KNOBS:
                os.environ.pop(k, None)
            reference = run(inputs, 1)  # the values every setting must give: the default tiles, unsplit
            # the timing to beat: the engine's default (default tiles, split KV as `choose_splits` picks)
            default_splits = choose_splits(batch, HKV, context, device_sm_count(torch.device(DEV)))
            default_s = time_setting(inputs, default_splits, 1 if SMOKE else 50)
            # the default with its split states combined in the same launch (`fused_combine`)
            os.environ["IDLM_ATTN_FUSED_COMBINE"] = "1"
            fused_err = max(float((a.float() - b.float()).abs().max())
                            for a, b in zip(run(inputs, default_splits), reference))
            fused_s = time_setting(inputs, default_splits, 1 if SMOKE else 50)
            os.environ.pop("IDLM_ATTN_FUSED_COMBINE")
            rows = []
            for st in settings(batch, context):
                os.environ.update({k: st[k] for k in KNOBS})
                got = run(inputs, st["splits"])
                err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, reference))
                secs = time_setting(inputs, st["splits"], 1 if SMOKE else 50)
                rows.append({**st, "us": round(secs * 1e6, 2), "max_abs_diff": err})
            best = min(rows, key=lambda r: r["us"])
            cell = {"repeat": len(inputs[4]), "kv_mb": round(kv_bytes / 2**20, 2), "default_splits": default_splits,
                    "default_us": round(default_s * 1e6, 2), "default_gb_s": round(kv_bytes / default_s / 1e9, 1),
                    "default_fused_combine_us": round(fused_s * 1e6, 2), "fused_combine_diff": fused_err,
                    "best": best, "best_gb_s": round(kv_bytes / (best["us"] * 1e-6) / 1e9, 1),
                    "worst_diff": max(r["max_abs_diff"] for r in rows), "all": rows}
            key = f"{batch}x{context}x{q_len}"
            out["shapes"][key] = cell
            print(json.dumps({key: {k: v for k, v in cell.items() if k != "all"}}), flush=True)
            save_record(out, "attn_sweep.json")
    out["wall_s"] = round(time.time() - t_start, 1)
    save_record(out, "attn_sweep.json")
    print(json.dumps({"summary": True, "wall_s": out["wall_s"],
                      "best": {k: {**{n: c["best"][n] for n in (*KNOBS, "splits", "us")},
                                   "default_us": c["default_us"],
                                   "default_fused_combine_us": c["default_fused_combine_us"]}
                               for k, c in out["shapes"].items()}}))


if __name__ == "__main__":
    main()
