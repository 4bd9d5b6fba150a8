"""GPU driver for the R-ISD issue's engine measurements (run on the device; JSON lines, a summary last,
and $OUT/bench_risd.json).

Stages (comma-separated argv[1], default all):
  exact  fp32 and bf16: engine R-ISD (the fused step: LoRA folded into the projections; $EXACT_LAYOUT, default
         auto) vs engine AR on idlm-tiny-ar, greedy, 64 prompts x 128 tokens: how many requests are identical
  step   bf16, batch 1, greedy and T = 0.7: the decode step of AR, R-ISD fused and R-ISD unfused (separate LoRA
         matmuls; $STEP_KINDS picks some, e.g. ar,risd_fused; risd_br: fused ("select") with rejection branches,
         risd_gs: and a guessed correction per draft (25 query rows), risd_g1: the same in groups of one row
         (`guess_rows=1`, 19 query rows), and risd_select: fused in the "select"
         layout (x times [W ; W + D] for q/k/v and gate/up), risd_lowrank: in the "lowrank" layout (W and the
         low-rank factors in one Triton kernel per projection), only when named), in turns ($ROUNDS rounds,
         per-round ratios), for idlm-tiny-ar (its trained adapter) and a SmolLM2-135M-shaped model (random weights and a
         random adapter of $SMOL_RANK, default 32: step cost does not depend on the values)
  profile  batch 1, AR vs fused R-ISD (both layouts: $LAYOUTS, default pair,select): GPU time of the step's
         CUDA graph alone (back to back; and one replay + sync at a time, with the host's launch call) vs
         the engine step, and kernels per step (torch.profiler)
  throughput  bf16: offline tokens/s of engine AR and R-ISD at C = 64, 256 (SmolLM2 shape, random weights)
  sprofile  batch 1, SmolLM2 shape (random weights; $SPROFILE_MODEL=idlm-tiny-ar: that model and its adapter):
         where a sampled (T = 0.7) R-ISD / AR step's time goes vs greedy: wall time per step, GPU kernel time
         per step, top kernels ($PROFILE_TOP, default 8, each [µs, launches] per step) and top host ops
         (torch.profiler); $SPROFILE_DECODERS (default ar,risd; risd_br: with rejection branches; risd_gs: and a
         guessed correction per draft; risd_g1: in groups of one row; "<decoder>@<variant>": under a STEP_ATTN
         variant, e.g. risd_br@vocab0), $SPROFILE_TEMPS (default 0,0.7)
  bprofile  batch $BATCH (64; $KINDS, default ar,risd4,risd_n1; risdN / risdN_br: stride N, with branches;
         also risd_auto up to $AUTO_MAX), $MODEL, $TEMPS (0,0.7)
         (smollm2 shape: R-ISD; tiny: idlm-tiny ISD): AR, N = 4, an engine's plain AR steps (N = 1) and
         `--stride auto`, greedy and T = 0.7: step time (and per stride), GPU kernel time and top kernels
  stime  batch 1, T = 0 vs 0.7, R-ISD: each step's wall time split into step_inputs / runner.decode (synced)
         / finish, graph captures and dynamo recompiles over time (SmolLM2 shape random weights; idlm-tiny-ar)
  churn  the self-distillation workload (384 requests of varied lengths, admitted every step): time split
  tiny   bf16: per-request tokens/s of engine AR vs engine R-ISD (fused) on idlm-tiny-ar, C = 1, 16, 64,
         greedy and T = 0.7
  overlap  the CUDA path of overlapped steps (`EngineConfig.overlap`): engine AR, R-ISD and R-ISD with rejection
         branches ($OVERLAP_KINDS, default ar,risd,risd_br,risd_gs,risd_g1: the last two with a guessed
         correction per draft, in groups of K rows / one row)
         on idlm-tiny-ar and the SmolLM2 shape ($OVERLAP_DTYPES,
         default float32,bfloat16), 16 greedy requests of varied lengths at C = 1 and 16 ($OVERLAP_CONC; $OVERLAP_TEMPS,
         default 0: greedy; e.g. 0,0.7: seeded sampled requests too), overlapped vs synchronous: identical tokens
         per request, the steps chained (and why not: `chain_breaks`), pages all returned (bf16 at C = 16 may
         differ where a finished row's chained steps give the batch another shape than the synchronous step: not
         batch-invariant, unlike exact mode). $OVERLAP_SEED: the first request's seed (0); $OVERLAP_DIAG=1 also
         runs the synchronous engine again, the overlapped one with a finish ending the chain (`no_padding`) and
         one whose chained steps replay the synchronous step's own graph (`same_graph`), and reports where each
         run first differs from the synchronous one (request, token, length)

The step and profile stages time idlm-tiny-ar and the SmolLM2 shape, or those named in $BENCH_MODELS.

Each configuration is measured REPS times, interleaved, and the median is kept (host timing varies).

    python scripts/bench_risd.py exact,step,tiny
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import (  # noqa: E402
    environ_restored,
    environment,
    sampling_attributes,
    save_record,
    timed_before_profiled,
)
from idlm.bench.offline import bench_offline, bench_prompts, count_delta, step_phases, step_stride  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.layers.lora import LoRAAdapter, LoRAConfig  # noqa: E402
from idlm.models.loader import load_pretrained, resolve_model_path  # noqa: E402
from idlm.models.random import random_model  # noqa: E402

DEV = os.environ.get("IDLM_BENCH_DEVICE", "cuda")
REPS = int(os.environ.get("REPS", "3"))
# the rank of the random adapter on the SmolLM2 shape: the embedded smollm2-135m-instruct-risd-lora's (32);
# until session 18 the step and profile stages used 128 and sprofile / stime / churn 40 (docs/risd.md)
SMOL_RANK = int(os.environ.get("SMOL_RANK", "32"))
# the models of the step and profile stages ($BENCH_MODELS, comma-separated): idlm-tiny-ar needs its embedded
# assets on the machine, the SmolLM2 shape none (random weights), so a call that carries the GGUF can time it alone
BENCH_MODELS = os.environ.get("BENCH_MODELS", "idlm-tiny-ar,smollm2-135m").split(",")
if not set(BENCH_MODELS) <= {"idlm-tiny-ar", "smollm2-135m"}:
    raise SystemExit(f"BENCH_MODELS={os.environ['BENCH_MODELS']!r}: expected idlm-tiny-ar and/or smollm2-135m")
results: dict = environment(DEV)
# the step stage's attention variants ($STEP_ATTN, comma-separated; each kind of step is timed under each, in
# the same process and rounds): default (split KV with a combine kernel), nosplit ($IDLM_KV_SPLITS=1), fused
# (the combine in the forward kernel's last split, $IDLM_ATTN_FUSED_COMBINE=1), rows0 / rows32 (a split block in
# one tile, as before session 36, / in 32-row tiles instead of 16: $IDLM_ATTN_ROW_TILE); a kind under a non-default
# variant is reported as "<kind>@<variant>"; "sync": the default attention with overlapped steps off
# (`EngineConfig.overlap=False`: every step waits for its results before the next is launched); "rotary0": q/k
# norms + RoPE by inductor's compilation of `rotary_qkv` ($IDLM_ROTARY_KERNEL=0; the Triton kernel
# `rotary_qkv_rows` is the default since session 38; "rotary1" names it explicitly); "vocab0" (SAMPLING_VARIANTS): the
# decode step's vocabulary reductions over whole rows, as before session 37; "chunked": in chunks at every
# vocabulary (CHUNKED_FROM = 0: idlm-tiny's 8,192 entries too); "sharedxa": the lowrank kernel with x·Aᵀ computed
# once per projection by its own programs (`lora_linear_rows(shared_xa=True)`, $IDLM_LORA_SHARED_XA=1)
ATTN_ENV = {"default": {}, "nosplit": {"IDLM_KV_SPLITS": "1"}, "fused": {"IDLM_ATTN_FUSED_COMBINE": "1"}, "sync": {},
            "rows0": {"IDLM_ATTN_ROW_TILE": "0"}, "rows32": {"IDLM_ATTN_ROW_TILE": "32"}, "vocab0": {},
            "rotary0": {"IDLM_ROTARY_KERNEL": "0"}, "rotary1": {"IDLM_ROTARY_KERNEL": "1"}, "chunked": {},
            "sharedxa": {"IDLM_LORA_SHARED_XA": "1"}}
# variants that set `idlm.decoding.sampling` attributes instead of the environment (the compiled step functions
# guard on them, so an engine built under one compiles its steps again)
SAMPLING_VARIANTS = {"vocab0": {"VOCAB_CHUNK": 0}, "chunked": {"CHUNKED_FROM": 0}}
ATTN_VARIANTS = os.environ.get("STEP_ATTN", "default").split(",")
if ATTN_VARIANTS[0] != "default" or not set(ATTN_VARIANTS) <= set(ATTN_ENV):
    raise SystemExit(f"STEP_ATTN={os.environ['STEP_ATTN']!r}: expected 'default' first, then any of {sorted(ATTN_ENV)}")


@contextlib.contextmanager
def attention_variant(name: str):
    """The environment (ATTN_ENV) and `sampling` attributes (SAMPLING_VARIANTS) of variant `name` while the block
    runs, then the old ones."""
    with environ_restored(ATTN_ENV[name]), sampling_attributes(SAMPLING_VARIANTS.get(name, {})):
        os.environ.update(ATTN_ENV[name])
        yield


def emit(key, value):
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def tiny_ar(dtype: str):
    model, tok = load_pretrained("idlm-tiny-ar", dtype=dtype, device=DEV)
    lora = LoRAAdapter.load(resolve_model_path("idlm-tiny-ar-risd-lora"), model.config, device=DEV, dtype=model.dtype)
    return model, tok, lora


def stage_exact():
    out = {}
    for dtype in ("float32", "bfloat16"):
        model, tok, lora = tiny_ar(dtype)
        prompts = bench_prompts(tok, 64)
        params = SamplingParams(temperature=0, max_tokens=128)
        ar = LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=64)).run(prompts, params)
        eng = LLMEngine(model, tok, EngineConfig(decoder="risd", stride=4, max_num_seqs=64,
                                                 lora_layout=os.environ.get("EXACT_LAYOUT", "auto")), lora=lora)
        fused = model.model.layers[0].self_attn.qkv_lora is not None
        risd = eng.run(prompts, params)
        same = [a.token_ids == b.token_ids for a, b in zip(ar, risd)]
        agree = []
        for a, b in zip(ar, risd):
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     min(len(a.token_ids), len(b.token_ids)))
            agree.append(n / max(1, len(a.token_ids)))
        out[dtype] = {"fused_lora": fused, "lora_layout": eng.runner.lora_layout, "identical": sum(same),
                      "of": len(same),
                      "tokens_before_first_divergence": round(sum(agree) / len(agree), 4),
                      "tpf": round(sum(o.stats.committed for o in risd) / sum(o.stats.forwards for o in risd), 3)}
    emit("exact", out)


def median(runs: list[dict], key: str) -> dict:
    ordered = sorted(runs, key=lambda r: r[key])
    return dict(ordered[len(ordered) // 2], **{f"reps_{key}": [r[key] for r in runs]})


def stage_step():
    """Decode step wall time at batch 1 (engine: forward + decoder compute + host work, CUDA graphs), greedy
    and T = 0.7: one engine per kind, run in turns (`interleaved_steps`: ROUNDS rounds of 10 steps each, so
    the host's slow spells fall on every kind alike); <kind>_over_ar is the median of the per-round ratios
    to AR at the same temperature (whole runs one after the other, this stage's method until session 21,
    moved the ratio by ±0.2 between processes). STEP_FRESH=1: each round's 10 steps are a new request's
    first ones, so every kind is timed over the same contexts (else R-ISD, ~3 tokens a step, runs at longer
    contexts than AR as the rounds go on)."""
    from idlm.bench.offline import interleaved_steps
    from idlm.engine.llm_engine import freeze_gc

    out = {}
    only = os.environ.get("STEP_KINDS", "")  # e.g. ar,risd_fused (default: all three)
    for name in BENCH_MODELS:
        # a third model for the "select" layout (the default; risd_br takes it too): `fuse_lora` keeps one per model
        select = bool({"risd_select", "risd_br", "risd_gs", "risd_g1"} & set(only.split(",")))
        lowrank = "risd_lowrank" in only.split(",")
        if name == "idlm-tiny-ar":
            (model_f, tok, lora_f), (model_u, _, lora_u) = tiny_ar("bfloat16"), tiny_ar("bfloat16")
            model_s, _, lora_s = tiny_ar("bfloat16") if select else (None, None, None)
            model_l, _, lora_l = tiny_ar("bfloat16") if lowrank else (None, None, None)
            prompt = bench_prompts(tok, 1)[0]
        else:
            model_f, model_u, model_s, model_l = (
                random_model("smollm2-135m", dtype="bfloat16", device=DEV)
                if i < 2 or (select and i == 2) or (lowrank and i == 3) else None for i in range(4))
            lora_f, lora_u, lora_s, lora_l = (
                None if m is None else LoRAAdapter(m.config, LoRAConfig(rank=SMOL_RANK))
                .init_weights(std=0.02, seed=0, zero_b=False).to(device=DEV, dtype=m.dtype)
                for m in (model_f, model_u, model_s, model_l))
            tok = None
            prompt = torch.randint(10, 40000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        # kind: (model, adapter, fuse_projections, lora_layout)
        kinds = {"ar": (model_f, None, None, "pair"), "risd_fused": (model_f, lora_f, True, "pair"),
                 "risd_unfused": (model_u, lora_u, False, "pair"),
                 "risd_br": (model_s, lora_s, True, "select"),  # with rejection branches (N² = 16 query tokens)
                 "risd_gs": (model_s, lora_s, True, "select"),  # and a guessed correction per draft (25 tokens)
                 "risd_g1": (model_s, lora_s, True, "select"),  # the guessed groups of one row (19 tokens)
                 "risd_select": (model_s, lora_s, True, "select"),
                 "risd_lowrank": (model_l, lora_l, True, "lowrank")}  # the low-rank layout (`lora_kernel`)
        kinds = {k: v for k, v in kinds.items()
                 if k == "ar" or (k in only.split(",") if only
                                  else k not in ("risd_br", "risd_gs", "risd_g1", "risd_select", "risd_lowrank"))}
        out[name] = {}
        for temp in (0.0, 0.7):
            cases = {}
            for variant in ATTN_VARIANTS:
                for k, (model, lora, fuse, layout) in kinds.items():
                    with attention_variant(variant):  # read when the step's graphs are captured (the warm-up)
                        eng = LLMEngine(model, tok, EngineConfig(
                            decoder="risd" if lora is not None else "ar", stride=4, max_num_seqs=1, num_pages=512,
                            fuse_projections=fuse, branches=k in ("risd_br", "risd_gs", "risd_g1"),
                            lora_layout=layout, guesses=int(k in ("risd_gs", "risd_g1")),
                            guess_rows=1 if k == "risd_g1" else None,
                            overlap=variant != "sync"), lora=lora)
                        params = SamplingParams(temperature=temp, max_tokens=400, ignore_eos=True, seed=0)
                        eng.run([prompt], params)  # warm-up: compiles, graph captures
                    cases[k if variant == "default" else f"{k}@{variant}"] = (eng, prompt, params)
            freeze_gc()
            res = interleaved_steps(cases, rounds=int(os.environ.get("ROUNDS", "20")),
                                    fresh=os.environ.get("STEP_FRESH") == "1")
            for k, (eng, _, _) in cases.items():  # the fused LoRA's layout each engine built (None: AR, unfused)
                res[k]["lora_layout"] = eng.runner.lora_layout
            for k in [k for k in res if k != "ar"]:
                res[f"{k}_over_ar"] = res[k]["over_ar"]
                kind, _, variant = k.partition("@")
                if variant and kind != "ar":  # within the variant: over its own AR, round by round
                    res[f"{k}_over_ar@{variant}"] = round(statistics.median(
                        a / b for a, b in zip(res[k]["rounds_ms"], res[f"ar@{variant}"]["rounds_ms"])), 3)
            out[name][f"T{temp}"] = res
            print(json.dumps({name: {f"T{temp}": res}}), flush=True)
    emit("step", out)


def stage_profile():
    """Where an R-ISD step's time goes, batch 1: the CUDA graph replayed alone (GPU time, no host work)
    vs the whole engine step, and the kernels per step (torch.profiler), for AR and fused R-ISD in each layout
    of $LAYOUTS (default pair,select; "select_br": "select" with rejection branches; gpu_over_ar: the graph's GPU
    time over AR's); $PROFILE_TOP kernels (default 8) by time, each with its µs and launches per step."""
    from idlm.bench.profile import graph_times, profile_steps, summarize

    out = {}
    layouts = os.environ.get("LAYOUTS", "pair,select").split(",")
    for name in BENCH_MODELS:
        for dec in ["ar"] + [f"risd/{x}" for x in layouts]:  # a fresh model each: one fused layout per model
            if name == "idlm-tiny-ar":
                model, tok, lora = tiny_ar("bfloat16")
                prompt = bench_prompts(tok, 1)[0]
            else:
                model = random_model("smollm2-135m", dtype="bfloat16", device=DEV)
                lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0,
                                                                                          zero_b=False)
                lora, tok = lora.to(device=DEV, dtype=model.dtype), None
                prompt = list(range(100, 164))
            layout, branches = (dec[5:] or "pair").removesuffix("_br"), dec.endswith("_br")
            eng = LLMEngine(model, tok, EngineConfig(decoder=dec[:4], stride=4, max_num_seqs=1, num_pages=512,
                                                     lora_layout=layout, branches=branches),
                            lora=lora if dec != "ar" else None)
            p = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
            eng.run([prompt], p)
            eng.add_request(prompt, p)
            for _ in range(5):
                eng.step()
            graph = next(iter(eng.runner._graphs.values())).graph  # batch 1, greedy: a single graph
            # the graph alone (before this stage's profiler has run for this graph; profile stages come last)
            times = graph_times(graph)
            steps = 20
            prof, step_ms = profile_steps(eng, steps)
            summary = summarize(prof, steps, top_kernels=int(os.environ.get("PROFILE_TOP", "8")), counts=True)
            while eng.has_unfinished():
                eng.step()
            out[f"{name}/{dec}"] = {
                "graphs": eng.runner.graphs_captured, "graph_replay_gpu_ms": times["gpu_ms"],
                "replay_call_ms": times["replay_call_ms"], "replay_sync_wall_ms": times["replay_sync_ms"],
                "step_wall_ms_profiled": round(step_ms, 4), "kernels_per_step": summary["kernels_per_step"],
                "top_kernels_us_per_step": summary["top_kernels_us_per_step"]}
            if dec != "ar":
                ar_ms = out[f"{name}/ar"]["graph_replay_gpu_ms"]
                out[f"{name}/{dec}"]["gpu_over_ar"] = round(times["gpu_ms"] / ar_ms, 3)
    emit("profile", out)


def profiled_then_plain(eng, steps: int, plain: int) -> tuple:
    """Of an engine whose requests last: 10 steps to settle, `steps` under torch.profiler, then `plain` more
    timed without it -> (profiler, decode ms per profiled step, decode ms per plain step, {stride: [plain
    steps, median ms]} of the plain steps by their stride — an adaptive engine's mix, each stride's cost)."""
    import statistics

    from idlm.bench.profile import profile_steps

    for _ in range(10):
        eng.step()
    prof, step_ms = profile_steps(eng, steps)
    f1, t1 = eng.counters["decode_forwards"], eng.counters["decode_time_s"]
    by_stride: dict[int, list[float]] = {}
    for _ in range(plain):
        f, t, mix = eng.counters["decode_forwards"], eng.counters["decode_time_s"], dict(eng.stride_mix)
        eng.step()
        n = step_stride(eng, mix)
        if eng.counters["decode_forwards"] == f + 1 and n is not None:
            by_stride.setdefault(n, []).append(1e3 * (eng.counters["decode_time_s"] - t))
    per_step = 1e3 * (eng.counters["decode_time_s"] - t1) / max(1, eng.counters["decode_forwards"] - f1)
    return prof, step_ms, per_step, {n: [len(v), round(statistics.median(v), 4)] for n, v in sorted(by_stride.items())}


def stage_sprofile():
    from idlm.bench.profile import summarize

    if os.environ.get("SPROFILE_MODEL") == "idlm-tiny-ar":  # its trained adapter (the embedded assets)
        model, tok, lora = tiny_ar("bfloat16")
        prompt = bench_prompts(tok, 1)[0]
    else:
        model, tok = random_model("smollm2-135m", dtype="bfloat16", device=DEV), None
        lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0, zero_b=False)
        lora = lora.to(device=DEV, dtype=model.dtype)
        prompt = list(range(100, 164))
    out = {}
    # $SPROFILE_DECODERS (default ar,risd; "risd_br": R-ISD with rejection branches), $SPROFILE_TEMPS (default 0,0.7)
    for case in os.environ.get("SPROFILE_DECODERS", "ar,risd").split(","):
        dec, _, variant = case.partition("@")  # e.g. risd_br@vocab0: under an ATTN_ENV variant
        for temp in [float(t) for t in os.environ.get("SPROFILE_TEMPS", "0,0.7").split(",")]:
            with attention_variant(variant or "default"):
                eng = LLMEngine(model, tok, EngineConfig(decoder=dec[:4], stride=4, max_num_seqs=1, num_pages=512,
                                                          branches=dec.endswith(("_br", "_gs", "_g1")),
                                                          guesses=int(dec.endswith(("_gs", "_g1"))),
                                                          guess_rows=1 if dec.endswith("_g1") else None),
                                lora=lora if dec != "ar" else None)
                p = SamplingParams(temperature=temp, max_tokens=400, ignore_eos=True, seed=1)
                eng.run([prompt], SamplingParams(temperature=temp, max_tokens=100, ignore_eos=True, seed=0))
                eng.add_request(prompt, p)
                steps = 30
                prof, step_ms, plain_ms, _ = profiled_then_plain(eng, steps, 30)
                while eng.has_unfinished():
                    eng.step()
                out[f"{case}/T{temp}"] = {"graphs": eng.runner.graphs_captured, "step_ms": round(plain_ms, 4),
                                         "step_ms_profiled": round(step_ms, 4),
                                         **summarize(prof, steps, top_kernels=int(os.environ.get("PROFILE_TOP", "8")),
                                                     counts=True)}
                print(json.dumps({f"{case}/T{temp}": out[f"{case}/T{temp}"]}), flush=True)
    emit("sprofile", out)


def stage_bprofile():
    """At batch BATCH (default 64): the decode step of the AR engine, of R-ISD N = 4, of an R-ISD engine's
    plain AR steps (a stride schedule of N = 1: what the adaptive stride falls back to) and of `--stride
    auto` (its own choices, strides up to AUTO_MAX, default 8), greedy and T = 0.7 — step time unprofiled
    (and per stride: an adaptive engine's mix), GPU kernel time, top kernels. MODEL=smollm2 (default: its
    shape, random weights and an adapter of rank $SMOL_RANK: R-ISD) or tiny (the embedded idlm-tiny: ISD, no adapter).
    Why: at C = 64, T = 0.7 the adaptive engine ran mostly N = 1 steps yet lost to the AR engine, and on
    idlm-tiny its sampled steps of every stride, N = 1 too, cost more than a fixed-stride or AR engine's
    (docs/risd.md, session 16; docs/stride.md, attempt 9)."""
    from idlm.bench.profile import summarize
    from idlm.layers.fused import compile_fallbacks

    batch = int(os.environ.get("BATCH", "64"))
    if os.environ.get("MODEL", "smollm2") == "tiny":
        model, tok = load_pretrained("idlm-tiny", dtype="bfloat16", device=DEV)
        lora, dec = None, "isd"
        prompts = bench_prompts(tok, batch)
    else:
        model = random_model("smollm2-135m", dtype="bfloat16", device=DEV)
        lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0, zero_b=False)
        lora, dec = lora.to(device=DEV, dtype=model.dtype), "risd"
        prompts = [list(range(100 + b, 164 + b)) for b in range(batch)]
    auto_max = int(os.environ.get("AUTO_MAX", "8"))
    kinds = {"ar": dict(decoder="ar"),
             "risd_n1": dict(decoder=dec, stride=4, stride_schedule=[(1 << 20, 1)]),
             "risd_auto": dict(decoder=dec, stride="auto", auto_max_stride=auto_max)}  # (warmed up first)
    for n in range(2, 9):  # risdN: a fixed stride N; risdN_br: with rejection branches
        kinds[f"risd{n}"] = dict(decoder=dec, stride=n)
        kinds[f"risd{n}_br"] = dict(decoder=dec, stride=n, branches=True)
    only = os.environ.get("KINDS", "ar,risd4,risd_n1").split(",")
    if not set(only) <= set(kinds):
        raise SystemExit(f"KINDS={only}: expected some of {sorted(kinds)}")
    kinds = {k: kinds[k] for k in only}
    out = {"batch": batch, "model": os.environ.get("MODEL", "smollm2"), "auto_max_stride": auto_max}
    for kind, cfg in kinds.items():
        eng = LLMEngine(model, None, EngineConfig(max_num_seqs=batch, num_pages=64 * batch, **cfg),
                        lora=lora if cfg["decoder"] == "risd" else None)
        if cfg.get("stride") == "auto":
            out[f"{kind}/warmup_s"] = eng.warmup()
        for temp in [float(t) for t in os.environ.get("TEMPS", "0,0.7").split(",")]:
            mix0 = dict(eng.stride_mix)
            eng.run(prompts, SamplingParams(temperature=temp, max_tokens=48, ignore_eos=True, seed=0))  # warm-up
            for b, pr in enumerate(prompts):
                eng.add_request(pr, SamplingParams(temperature=temp, max_tokens=600, ignore_eos=True, seed=b))
            steps = 20
            prof, step_ms, plain_ms, by_stride = profiled_then_plain(eng, steps, 60)
            for rid in list(eng.seqs):
                eng.abort_request(rid)
            while eng.has_unfinished():
                eng.step()
            key = f"{kind}/T{temp}"
            out[key] = {"step_ms": round(plain_ms, 4), "step_ms_by_stride": by_stride,
                        "step_ms_profiled": round(step_ms, 4), "compile_fallbacks": compile_fallbacks(),
                        "stride_mix": count_delta(eng.stride_mix, mix0),
                        "graphs": eng.runner.graphs_captured, **summarize(prof, steps, top_kernels=14)}
            print(json.dumps({key: out[key]}), flush=True)
    emit("bprofile", out)


def stage_stime():
    cases = []
    if os.environ.get("SMOL_ADAPTER"):  # the real SmolLM2 (GGUF in $IDLM_CACHE) and a trained adapter
        model, tok = load_pretrained("smollm2-135m-instruct", dtype="bfloat16", device=DEV)
        lora = LoRAAdapter.load(os.environ["SMOL_ADAPTER"], model.config, device=DEV, dtype=model.dtype)
        prompt = tok.encode_chat([{"role": "user", "content": "Explain how a bicycle works, step by step."}])
        cases.append(("smollm2-trained", model, lora, prompt))
    if not os.environ.get("STIME_ONLY_REAL"):
        model = random_model("smollm2-135m", dtype="bfloat16", device=DEV)
        lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0, zero_b=False)
        cases.append(("smollm2-random", model, lora.to(device=DEV, dtype=model.dtype), list(range(100, 164))))
        m2, tok2, lora2 = tiny_ar("bfloat16")
        cases.append(("tiny-ar", m2, lora2, bench_prompts(tok2, 1)[0]))
    out = {}
    decoders = os.environ.get("STIME_DECODERS", "risd").split(",")  # e.g. ar,risd: AR's split beside it
    for name, model, lora, prompt in cases:
        for temp in (0.0, 0.7):
            for dec in decoders:
                # synchronous steps: the phase split times each part of a step in turn (an overlapped step's
                # host work runs beside the device; the step stage times those, STEP_ATTN=default,sync)
                eng = LLMEngine(model, None, EngineConfig(decoder=dec, stride=4, max_num_seqs=1, num_pages=512,
                                                          overlap=False), lora=lora if dec == "risd" else None)
                eng.run([prompt], SamplingParams(temperature=temp, max_tokens=300, ignore_eos=True, seed=0))  # warm-up
                key = f"{name}/T{temp}" + ("" if dec == "risd" else f"/{dec}")
                out[key] = step_phases(eng, prompt, SamplingParams(temperature=temp, max_tokens=250,
                                                                   ignore_eos=True, seed=1))
                print(json.dumps({key: out[key]}), flush=True)
    emit("stime", out)


def stage_throughput():
    """Offline throughput at large batch (what self-distillation runs): engine AR and R-ISD on a
    SmolLM2-135M-shaped model (random weights and adapter), 512 requests x 128 tokens, C = 64 and 256."""
    model = random_model("smollm2-135m", dtype="bfloat16", device=DEV)
    lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0, zero_b=False)
    lora = lora.to(device=DEV, dtype=model.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (int(torch.randint(32, 160, (1,), generator=g)),), generator=g).tolist()
               for _ in range(512)]
    out = {}
    for dec in ("ar", "risd"):
        eng = LLMEngine(model, None, EngineConfig(decoder=dec, stride=4, max_num_seqs=256),
                        lora=lora if dec == "risd" else None)
        rows = bench_offline(eng, prompts, [64, 256], max_tokens=128, num_requests=512)
        out[dec] = [{k: r[k] for k in ("concurrency", "throughput_tok_s", "per_request_tok_s", "decode_step_ms", "tpf")}
                    for r in rows]
    emit("throughput", out)


def stage_churn():
    """The self-distillation workload (SmolLM2-135M shape, random weights): 384 running requests whose
    lengths differ (prompts 30-300 tokens, 50-512 new tokens, greedy and T = 0.7 mixed), so requests
    finish and are admitted every step. Where a step's time goes: prefill vs decode time, forwards,
    tokens/s, and a cProfile of 100 steps (host functions; the GPU waits show up in the one sync)."""
    import cProfile
    import io
    import pstats
    import random
    import time

    model = random_model("smollm2-135m", dtype="bfloat16", device=DEV)
    rng = random.Random(0)
    out = {}
    for max_seqs in (384,):
        eng = LLMEngine(model, None, EngineConfig(decoder="ar", max_num_seqs=max_seqs))
        for i in range(4000):
            eng.add_request([rng.randrange(10, 40000) for _ in range(rng.randrange(30, 300))],
                            SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=rng.randrange(50, 512),
                                           ignore_eos=True, seed=i))
        t_end = time.time() + float(os.environ.get("CHURN_WARMUP_S", "20"))
        while time.time() < t_end:  # warm up into the steady state (requests of every age)
            eng.step()
        torch.cuda.synchronize()
        c0, t0 = dict(eng.counters), time.perf_counter()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(int(os.environ.get("CHURN_STEPS", "150"))):
            eng.step()
        torch.cuda.synchronize()
        prof.disable()
        wall = time.perf_counter() - t0
        d = {k: round(eng.counters[k] - c0[k], 4) for k in c0}
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        out[max_seqs] = {"steps": 150, "wall_s": round(wall, 3), "step_ms": round(1e3 * wall / 150, 3),
                         "tok_s": round(d["generated_tokens"] / wall, 1), "counters": d,
                         "running": len(eng.seqs), "profile_tottime": buf.getvalue()[-6000:]}
        emit("churn", {k: {kk: vv for kk, vv in v.items() if kk != "profile_tottime"} for k, v in out.items()})
        print(out[max_seqs]["profile_tottime"], flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            for _ in range(20):
                eng.step()
            torch.cuda.synchronize()
        print(tprof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70),
              flush=True)


def stage_tiny():
    model, tok, lora = tiny_ar("bfloat16")
    conc = [1, 16, 64]
    engines = {"ar": LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=64, num_pages=8192)),
               "risd": LLMEngine(model, tok, EngineConfig(decoder="risd", stride=4, max_num_seqs=64, num_pages=8192),
                                 lora=lora)}
    prompts = bench_prompts(tok, 256)
    out = {}
    for temp in (0.0, 0.7):
        rows = []
        for c in conc:
            runs = {k: [] for k in engines}
            for rep in range(REPS):
                for k, eng in engines.items():
                    runs[k].append(bench_offline(eng, prompts, [c], max_tokens=128, temperature=temp,
                                                 warmup=rep == 0)[0])
            med = {k: median(v, "per_request_tok_s") for k, v in runs.items()}
            rows.append({"concurrency": c, "ar": med["ar"], "risd": med["risd"],
                         "risd_over_ar": round(med["risd"]["per_request_tok_s"] / med["ar"]["per_request_tok_s"], 3)})
        out[f"T={temp}"] = rows
    emit("tiny", out)


def no_padding(eng):
    """`eng._chain` as before session 31: a finish (a row no longer live) ends the chain."""
    chain = eng._chain

    def chain_unless_a_row_ended(updates):
        if not all(eng._live(s) for s in eng._inflight.rows.seqs):
            return eng._unchained("finish")
        return chain(updates)
    return chain_unless_a_row_ended


def same_graph_chain(runner):
    """`runner._capture_chain` for a diagnostic: a chained step forms its inputs eagerly and replays the
    step graph the synchronous steps replay (instead of a graph of its own that captures the step again), so
    that a chained step and a synchronous one with the same inputs run the very same kernels."""
    from idlm.engine.model_runner import _Eager

    def capture(g, decoder):
        write_inputs = runner.chained_inputs(g, decoder)

        def step():
            write_inputs()
            g.graph.replay()
        return _Eager(step)
    return capture


def stage_overlap():
    out = {}
    for name, dtype in [(n, d) for d in os.environ.get("OVERLAP_DTYPES", "float32,bfloat16").split(",")
                        for n in BENCH_MODELS]:
        if name == "idlm-tiny-ar":
            model, tok, lora = tiny_ar(dtype)
            prompts = bench_prompts(tok, 16)
        else:
            model = random_model("smollm2-135m", dtype=dtype, device=DEV)
            lora = LoRAAdapter(model.config, LoRAConfig(rank=SMOL_RANK)).init_weights(std=0.02, seed=0, zero_b=False)
            lora, tok = lora.to(device=DEV, dtype=model.dtype), None
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(10, 40000, (int(n),), generator=g).tolist()
                       for n in torch.randint(8, 200, (16,), generator=g)]
        temps = [float(t) for t in os.environ.get("OVERLAP_TEMPS", "0").split(",")]
        kinds = {"ar": dict(decoder="ar"), "risd": dict(decoder="risd", stride=4),
                 "risd_br": dict(decoder="risd", stride=4, branches=True),
                 "risd_gs": dict(decoder="risd", stride=4, branches=True, guesses=1),
                 "risd_g1": dict(decoder="risd", stride=4, branches=True, guesses=1, guess_rows=1)}
        kinds = {k: kinds[k] for k in os.environ.get("OVERLAP_KINDS", ",".join(kinds)).split(",")}
        concs = [int(c) for c in os.environ.get("OVERLAP_CONC", "1,16").split(",")]
        seed0 = int(os.environ.get("OVERLAP_SEED", "0"))
        for temp, kind, cfg, conc in [(t, k, c, n) for t in temps for k, c in kinds.items() for n in concs]:
            params = [SamplingParams(temperature=temp, seed=seed0 + i, max_tokens=40 + 13 * i, ignore_eos=True)
                      for i in range(16)]
            toks, info = {}, {}
            modes = [False, True] + (["again", "no_padding", "same_graph"] if os.environ.get("OVERLAP_DIAG") else [])
            for overlap in modes:
                eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=conc, num_pages=4096,
                                                         overlap=overlap not in (False, "again"), **cfg),
                                lora=lora if kind != "ar" else None)
                if overlap == "no_padding":  # (a diagnostic: a finish ends the chain, as before session 31)
                    eng._chain = no_padding(eng)
                if overlap == "same_graph":  # (a diagnostic: chained steps replay the synchronous step's graph)
                    eng.runner._capture_chain = same_graph_chain(eng.runner)
                toks[overlap] = [o.token_ids for o in eng.run(prompts, params)]
                bm = eng.block_manager
                info[overlap] = {"pages_back": bm.num_free_pages
                                 == bm.num_pages, "overlapped_steps": eng.counters["overlapped_steps"],
                                 "decode_steps": eng.counters["decode_forwards"],
                                 "chain_breaks": dict(eng.chain_breaks)}
            same = sum(a == b for a, b in zip(toks[True], toks[False]))
            key = f"{name}/{dtype}/T{temp}/{kind}/C{conc}"
            out[key] = {"identical": f"{same}/{len(prompts)}", "sync": info[False], "overlap": info[True]}
            for mode in modes[1:]:  # where each run first differs from the synchronous one: (request, token)
                out[key][f"first_diff_{'overlap' if mode is True else mode}"] = [
                    (i, next(j for j, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y), len(b))
                    for i, (a, b) in enumerate(zip(toks[mode], toks[False])) if a != b]
            print(json.dumps({key: out[key]}), flush=True)
    emit("overlap", out)


def main():
    stages = (sys.argv[1] if len(sys.argv) > 1 else "exact,step,tiny").split(",")
    for s in timed_before_profiled(stages, {"profile", "sprofile", "bprofile"}):
        globals()[f"stage_{s}"]()
        save_record(results, "bench_risd.json")  # after every stage: a run stopped by a time limit keeps these
    summary = {"summary": True}
    if "exact" in results:
        summary["exact_fp32"] = f"{results['exact']['float32']['identical']}/{results['exact']['float32']['of']}"
        summary["exact_bf16"] = f"{results['exact']['bfloat16']['identical']}/{results['exact']['bfloat16']['of']}"
    if "step" in results:
        summary["step_risd_over_ar"] = {f"{k}/{t}": r.get("risd_fused_over_ar") for k, v in results["step"].items()
                                        for t, r in v.items()}
        summary["step_risd_select_over_ar"] = {f"{k}/{t}": r.get("risd_select_over_ar")
                                               for k, v in results["step"].items() for t, r in v.items()}
    if "tiny" in results:
        summary["tiny_risd_over_ar"] = {t: [r["risd_over_ar"] for r in rows] for t, rows in results["tiny"].items()}
    save_record(results, "bench_risd.json")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
