"""Small-GEMM latency on the GPU: what one projection of idlm-tiny-ar costs at the decode step's row counts.

Why it exists: idlm-tiny-ar's R-ISD step (7 query rows, the "select" layout's weights [W ; W + D], twice AR's
columns) spent ~17 µs more in its GEMMs than AR's step (1 row, [W]) on an H100 (docs/risd.md, session 38). This
times each projection shape alone — M rows (1, 4, 7, 8, 16) x the weight's columns once or twice — as 50 calls
back to back in one CUDA graph (so launch cost is the graph's, as in the engine), median of 7 replays, with the
weight as F.linear takes it ([N, K]) and transposed ([K, N], `mm_kn`), and the select layout's two halves as one
batched matmul of two row groups (`bmm_2groups`). Every call reuses one weight, so it stays in L2: the numbers
are the shape's cost without the weights' trip from HBM. `step_like/*`: a whole idlm-tiny-ar step's GEMMs on the
model's own weights, AR's and R-ISD's select layout (whether the doubled weights cost more than their rows) and
the "lowrank" layout's kernel (its default tile, each projection's best, 32 / 64 columns a program);
`kernel_tiles/*`: that kernel's tile and warp choices per projection against cuBLAS's plain projection;
`kernel_ranks/*`: the kernel's time against the LoRA's rank (where its LoRA time goes).
`floor_add_`: an empty kernel in a graph.

    python scripts/bench_small_gemm.py          (on the GPU; $OUT/gemm_small.json; the JSON line last)
    GEMM_SHAPES=0 GEMM_TILES=0 python scripts/bench_small_gemm.py     (without the per-shape cuBLAS table, the
                                                                    tile sweep)
    GEMM_SHAPES=0 GEMM_STEP=0 GEMM_TILE_MODEL=smollm2 GEMM_COLD_MB=256 python scripts/bench_small_gemm.py
        (the tile sweep on SmolLM2-135M's projections, weights read from HBM)
    GEMM_{SHAPES,TILES,RANKS,STEP}=0 leave that part out
"""

import json
import os
import statistics

import torch
import torch.nn.functional as F

DEV, DTYPE = "cuda", torch.bfloat16
# idlm-tiny-ar (hidden 384, 6 + 2 + 2 heads of 64, MLP 896, vocabulary 8192): K, N of each projection
SHAPES = {"qkv": (384, 640), "o": (384, 384), "gate_up": (384, 1792), "down": (896, 384), "lm_head": (384, 8192)}


def graph_us(fn, n: int = 50, reps: int = 7) -> float:
    """µs per call of `fn`, n calls captured in one CUDA graph (`capture`), median over `reps` replays."""
    from idlm.bench.profile import capture

    graph = capture(lambda: [fn() for _ in range(n)], warmup=1)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return round(statistics.median(times), 2)


def step_like(tiles: dict | None = None) -> dict:
    """The GEMMs of a whole idlm-tiny-ar step on its own weights, one CUDA graph (`graph_us`) -> µs a step and the
    weights' MB. "ar": 1 row, AR's fused weights (~29 MB with the tied head); "select": 7 rows, R-ISD's select
    layout [W ; W + D] of its trained adapter (~52 MB, more than the H100's 50 MB L2); "ar_weights_7_rows": 7 rows
    on AR's weights — if "select" costs more, it is the weights' bytes (their trip from HBM once they no longer
    fit L2), not the rows; "lowrank_kernel": 7 rows through `lora_linear_rows` (W and the low-rank factors, the
    LoRA gated on the last 4 rows, ~34 MB); "kernel_1_row": that kernel on AR's 1 row, no LoRA."""
    from idlm.bench.roofline import model_gemm_weights
    from idlm.layers.lora import LoRAAdapter
    from idlm.layers.lora_kernel import lora_linear_rows, lora_workspace
    from idlm.models.loader import load_pretrained, resolve_model_path

    model, _ = load_pretrained("idlm-tiny-ar", dtype="bfloat16", device=DEV)
    model.fuse_projections()
    ar = [w for _, w in model_gemm_weights(model)]
    head = ar[-1]
    lora = LoRAAdapter.load(resolve_model_path("idlm-tiny-ar-risd-lora"), model.config, device=DEV, dtype=DTYPE)
    fused = {}  # layout -> per layer, the four projections as `fuse_lora` builds them for the engine
    for layout in ("select", "lowrank"):
        m, _ = load_pretrained("idlm-tiny-ar", dtype="bfloat16", device=DEV)
        m.fuse_projections().fuse_lora(lora, layout=layout)
        fused[layout] = [p for layer in m.model.layers for p in (
            layer.self_attn.qkv_lora, layer.self_attn.o_lora, layer.mlp.gate_up_lora, layer.mlp.down_lora)]
    select = [p[0] for p in fused["select"]]
    lowrank = fused["lowrank"]  # (W, A, B', bias, segments, workspace) each
    xs = {(m, k): torch.randn(m, k, device=DEV, dtype=DTYPE) for m in (1, 7) for k in {w.shape[1] for w in ar}}
    gate = torch.arange(7, device=DEV) >= 3  # a block of 3 clean rows, then 4 MASK rows

    def cublas(weights, m):
        def step():
            for w in weights[:-1]:
                F.linear(xs[m, w.shape[1]], w)
            F.linear(xs[1, head.shape[1]], head)
        return step

    names = ("qkv", "o", "gate_up", "down") * len(model.model.layers)  # the order of `lowrank`

    def truncated(factors, rank):  # each projection's LoRA cut to its first `rank` ranks (same W, fewer A rows)
        w, a, b, bias, segments, _ = factors
        keep = [j for _, off, r in segments for j in range(off, off + min(r, rank))]
        cut, off = [], 0
        for end, _, r in segments:
            cut.append((end, off, min(r, rank)))
            off += min(r, rank)
        return w, a[keep].contiguous(), b[:, keep].contiguous(), bias, tuple(cut), None

    def kernel(m, with_lora, tuned=False, tiles=tiles, rank=None, shared=False):
        factors = lowrank if rank is None else [truncated(f, rank) for f in lowrank]
        spaces = [lora_workspace(m, f[1].shape[0], DTYPE, DEV) for f in factors] if shared else [None] * len(factors)

        def step():
            for name, (w, a, b, _, segments, _), space in zip(names, factors, spaces):
                tile = tiles[name] if tuned else {}
                if shared:
                    tile = {**tile, "shared_xa": True, "workspace": space}
                if with_lora:
                    lora_linear_rows(xs[m, w.shape[1]], w, a, b, gate, segments, **tile)
                else:
                    lora_linear_rows(xs[m, w.shape[1]], w, **tile)
            F.linear(xs[1, head.shape[1]], head)
        return step

    def mb(ts):
        return round(sum(t.numel() * t.element_size() for t in ts if t is not None) / 1e6, 1)

    configs = {"ar": (cublas(ar, 1), mb(ar)), "select": (cublas(select + [head], 7), mb(select + [head])),
               "ar_weights_7_rows": (cublas(ar, 7), mb(ar)),
               "lowrank_kernel": (kernel(7, True), mb([t for f in lowrank for t in f[:3]] + [head])),
               "kernel_1_row": (kernel(1, False), mb(ar))}
    if tiles:  # each projection on its best tile of `kernel_tiles`
        configs["lowrank_kernel_tuned"] = (kernel(7, True, True), configs["lowrank_kernel"][1])
        configs["kernel_1_row_tuned"] = (kernel(1, False, True), mb(ar))
    configs["kernel_7_rows_no_lora"] = (kernel(7, False), mb(ar))  # the rows' cost without the LoRA's
    configs["lowrank_shared_xa"] = (kernel(7, True, shared=True), configs["lowrank_kernel"][1])  # x·Aᵀ once
    for rank in (8, 16):  # the adapter cut to fewer ranks: each program reads fewer A rows (the step's A reads)
        configs[f"lowrank_kernel_rank{rank}"] = (kernel(7, True, rank=rank), configs["lowrank_kernel"][1])
    for bn in (32, 64):  # the LoRA's A read once per program: wider programs read it fewer times
        tiles_bn = {name: {"block_n": bn} for name in ("qkv", "o", "gate_up", "down")}
        configs[f"lowrank_kernel_bn{bn}"] = (kernel(7, True, True, tiles_bn), configs["lowrank_kernel"][1])
    out = {}
    for name, (fn, size) in configs.items():
        out[f"step_like/{name}"] = {"weights_mb": size, "us_per_step": graph_us(fn, n=1, reps=41)}
        print(json.dumps({f"step_like/{name}": out[f"step_like/{name}"]}), flush=True)
    return out


# the four fused projections of a layer: (K, N) and where each projection side by side ends (its columns)
TILE_MODELS = {
    "idlm-tiny-ar": ({k: v for k, v in SHAPES.items() if k != "lm_head"},
                     {"qkv": (384, 512, 640), "gate_up": (896, 1792)}),
    # SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536
    "smollm2": ({"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
                {"qkv": (576, 768, 960), "gate_up": (1536, 3072)}),
}


def side_by_side(ends: tuple, rank: int) -> tuple:
    """`lowrank_factors`' segments of projections ending at `ends` (their columns), a LoRA of `rank` each."""
    return tuple((e, rank * i, rank) for i, e in enumerate(ends))


def kernel_tiles(model: str = "idlm-tiny-ar", cold_mb: int = 0) -> dict:
    """`lora_linear_rows` alone on each projection of `model` (TILE_MODELS) at 7 rows (a rank-32 LoRA per projection
    side by side, gated on 4 rows) for tiles (block_n, block_k) and warps: which to make the default; beside it
    cuBLAS on the plain weight [W] and on the select layout's [W ; W + D] (twice the rows: what the kernel
    replaces). cold_mb 0: one weight, L2-resident as the shapes above; else as many copies as fill cold_mb MB, the
    calls cycling through them, so each reads its weight from HBM (a model whose weights exceed the L2)."""
    import itertools

    from idlm.layers.lora_kernel import lora_linear_rows

    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    gate = torch.arange(7, device=DEV) >= 3
    shapes, ends_of = TILE_MODELS[model]
    for name, (k, n) in shapes.items():
        ends = ends_of.get(name, (n,))  # the projections side by side
        r = 32 * len(ends)
        copies = max(1, -(-cold_mb * 10**6 // (2 * n * k * 2)))  # the select weight's bytes a copy

        def make(*shape):
            return [torch.randn(*shape, device=DEV, dtype=DTYPE, generator=g) * 0.02 for _ in range(copies)]

        x = torch.randn(7, k, device=DEV, dtype=DTYPE, generator=g)
        ws, w2s, as_, bs = make(n, k), make(2 * n, k), make(r, k), make(n, r)
        segments = side_by_side(ends, 32)

        def cycled(call):  # each captured call on the next copy
            it = itertools.cycle(range(copies))
            return lambda: call(next(it))

        res = {"cublas_linear": graph_us(cycled(lambda i: F.linear(x, ws[i]))),
               "cublas_select": graph_us(cycled(lambda i: F.linear(x, w2s[i])))}
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256, 512):
                for nw in (1, 2, 4):
                    try:
                        res[f"bn{bn}_bk{bk}_w{nw}"] = graph_us(cycled(lambda i: lora_linear_rows(
                            x, ws[i], as_[i], bs[i], gate, segments, block_n=bn, block_k=bk, num_warps=nw)))
                    except Exception as e:  # a tile that does not fit (Triton's OutOfResources: shared memory)
                        torch.cuda.synchronize()
                        res[f"bn{bn}_bk{bk}_w{nw}"] = f"{type(e).__name__}"
        best = min((v, c) for c, v in res.items() if not c.startswith("cublas") and isinstance(v, float))[1]
        bn, bk, nw = (int(t.lstrip("bnkw")) for t in best.split("_"))  # "bn16_bk128_w4"
        out[f"kernel_tiles/{name}"] = {**res, "best": best, "copies": copies,
                                       "best_tile": {"block_n": bn, "block_k": bk, "num_warps": nw}}
        print(json.dumps({f"kernel_tiles/{name}": out[f"kernel_tiles/{name}"]}), flush=True)
    return out


def kernel_ranks(model: str = "idlm-tiny-ar") -> dict:
    """Where the kernel's LoRA time goes: `lora_linear_rows` on each projection of `model` at 7 rows, its default
    tile, without the LoRA and with one of rank 8, 16, 32, 64 a projection (each program reads its projection's
    whole A: the rank sets that read beside the W tile's), L2-resident. A cost that grows with the rank is the A
    reads; a step from no LoRA to rank 8 that stays flat after is the epilogue (B' and the gate). `_shared`: the
    same with `shared_xa` (x·Aᵀ once by extra programs)."""
    from idlm.layers.lora_kernel import lora_linear_rows, lora_workspace

    out = {}
    g = torch.Generator(device=DEV).manual_seed(1)
    gate = torch.arange(7, device=DEV) >= 3
    shapes, ends_of = TILE_MODELS[model]
    for name, (k, n) in shapes.items():
        ends = ends_of.get(name, (n,))
        x = torch.randn(7, k, device=DEV, dtype=DTYPE, generator=g)
        w = torch.randn(n, k, device=DEV, dtype=DTYPE, generator=g) * 0.02
        res = {"no_lora": graph_us(lambda: lora_linear_rows(x, w))}
        for rank in (8, 16, 32, 64):
            r = rank * len(ends)
            a = torch.randn(r, k, device=DEV, dtype=DTYPE, generator=g) * 0.02
            b = torch.randn(n, r, device=DEV, dtype=DTYPE, generator=g) * 0.02
            segments = side_by_side(ends, rank)
            res[f"rank{rank}"] = graph_us(lambda: lora_linear_rows(x, w, a, b, gate, segments))
            space = lora_workspace(7, r, DTYPE, DEV)  # x·Aᵀ once by its own programs (`shared_xa`)
            res[f"rank{rank}_shared"] = graph_us(lambda: lora_linear_rows(x, w, a, b, gate, segments, shared_xa=True,
                                                                          workspace=space))
        out[f"kernel_ranks/{name}"] = res
        print(json.dumps({f"kernel_ranks/{name}": res}), flush=True)
    return out


def main() -> None:
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, (k, n) in SHAPES.items() if os.environ.get("GEMM_SHAPES", "1") == "1" else ():
        for m in (1, 4, 7, 8, 16):
            for mult in (1, 2):
                w = torch.randn(n * mult, k, device=DEV, dtype=DTYPE) * 0.02
                wt = w.t().contiguous()
                x = torch.randn(m, k, device=DEV, dtype=DTYPE)
                r = {"linear": graph_us(lambda: F.linear(x, w)), "mm_kn": graph_us(lambda: torch.mm(x, wt))}
                if mult == 2 and m in (7, 8):
                    w2 = w.view(2, n, k)
                    xb = torch.randn(2, (m + 1) // 2, k, device=DEV, dtype=DTYPE)
                    r["bmm_2groups"] = graph_us(lambda: torch.bmm(xb, w2.transpose(1, 2)))
                res[f"{name}/M{m}/x{mult}"] = r
                print(json.dumps({f"{name}/M{m}/x{mult}": r}), flush=True)
    tile_model = os.environ.get("GEMM_TILE_MODEL", "idlm-tiny-ar")
    tiles = kernel_tiles(tile_model, int(os.environ.get("GEMM_COLD_MB", "0"))) \
        if os.environ.get("GEMM_TILES", "1") == "1" else {}
    res.update(tiles)
    best = {key.split("/")[1]: r["best_tile"] for key, r in tiles.items()}
    if os.environ.get("GEMM_RANKS", "1") == "1":
        res.update(kernel_ranks(tile_model))
    if os.environ.get("GEMM_STEP", "1") == "1":  # idlm-tiny-ar's step, with its best tiles where swept
        res.update(step_like(best if tile_model == "idlm-tiny-ar" and best else None))
    z = torch.zeros(16, device=DEV)
    res["floor_add_"] = graph_us(lambda: z.add_(1))
    if os.environ.get("OUT"):
        from idlm.bench import save_record
        save_record(res, "gemm_small.json")
    print(json.dumps(res))


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    main()
