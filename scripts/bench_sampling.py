"""GPU driver for the sampling measurements of issue 13 (device sampling with counter-based draws).

Stages (comma-separated argv[1], default all):
  step      batch-1 decode step of idlm-tiny ISD N = 4 and AR (idlm-tiny-ar) at T = 0 and T = 1 (top-p 0.95 too),
            engine with CUDA graphs, bf16; the settings' engines in turns, ROUNDS (20) rounds of 10 steps;
            STEP_CHUNKED=1 also T = 0 and T = 1 with the vocabulary reductions in chunks at idlm-tiny's 8,192
            entries (`sampling.CHUNKED_FROM = 0` while the engine compiles and captures its steps)
  invariant a seeded sampled request's tokens alone vs inside 64 mixed requests (ISD N = 4, AR), and
            engine vs reference runner, fp32, bf16, and bf16 in exact mode
  profile   where the sampled ISD step's extra time goes, batch 1, T = 0 vs T = 1: the step split
            (`step_phases`: host inputs, device step, finish, rest) and the step's kernels (torch.profiler:
            GPU time and count per step, the top kernels); with PROFILE_AUTO=1 also a `--stride auto` engine
            held at N = 4 (its per-row step variant and per-step bookkeeping, no choices): the H200 table of
            session 14 had auto's sampled steps ~45% dearer than a fixed N = 4 engine's (docs/stride.md)
  autosplit batch 1, T = 0.7 / 1: `step_phases` per stride of an AR engine and an unheld `--stride auto` one
  compile   the sampled ISD step recompiled for new batch sizes (idlm-tiny ISD N = 4, T = 1 then T = 0, at
            C = 1, 8, 64 in one process, 48 tokens): which `cuda_fused` attempt each function ended on
            (`compile_fallbacks`) and the sampled / greedy step time per C — a minute's check that the
            step stays compiled (torch 2.11's inductor asserted here, docs/stride.md)

    python scripts/bench_sampling.py step,invariant

JSON lines, a summary last, and $OUT/bench_sampling.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, sampling_attributes, save_record, timed_before_profiled  # noqa: E402
from idlm.bench.offline import bench_offline, bench_prompts  # noqa: E402
from idlm.decoding import make_decoder  # noqa: E402
from idlm.decoding.reference import generate  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine, freeze_gc  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs the stages slowly: a check of the script)
results: dict = environment(DEV)


def emit(key, value):
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def stage_step():
    """Batch 1: the decode step at T = 0, T = 1 and T = 1 with top-p 0.95, of idlm-tiny ISD N = 4 and AR
    (idlm-tiny-ar): one engine per setting, run in turns (`interleaved_steps`: ROUNDS rounds of 10 steps
    each), so the host's slow spells fall on every setting alike; T1_over_T0_step is the median of the
    per-round ratios (whole runs one after the other moved ±30% on the H200: 0.52–0.76 ms for the same
    greedy ISD step in one call)."""
    from idlm.bench.offline import interleaved_steps

    out = {}
    settings = {"T0": dict(temperature=0.0), "T1": dict(temperature=1.0), "T1_top_p": dict(temperature=1.0,
                                                                                        top_p=0.95)}
    if os.environ.get("STEP_CHUNKED") == "1":
        settings.update({"T0@chunked": settings["T0"], "T1@chunked": settings["T1"]})
    only = os.environ.get("STEP_MODELS", "isd4,ar").split(",")  # isd4 alone: the ratio, one asset
    for name, model_name, decoder in (("isd4", "idlm-tiny", "isd"), ("ar", "idlm-tiny-ar", "ar")):
        if name not in only:
            continue
        model, tok = load_pretrained(model_name, dtype="bfloat16", device=DEV)
        prompt = bench_prompts(tok, 1)[0]
        cases = {}
        for k, kw in settings.items():
            with sampling_attributes({"CHUNKED_FROM": 0} if k.endswith("@chunked") else {}):
                eng = LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=4, max_num_seqs=1, num_pages=512))
                params = SamplingParams(max_tokens=400, ignore_eos=True, seed=0, **kw)
                eng.run([prompt], params)  # warm-up: compiles, graph captures
            cases[k] = (eng, prompt, params)
        freeze_gc()
        out[name] = interleaved_steps(cases, rounds=int(os.environ.get("ROUNDS", "20")))
        out[name]["T1_over_T0_step"] = out[name]["T1"]["over_T0"]
        if "T1@chunked" in out[name]:  # within the variant, round by round
            out[name]["T1_over_T0_step@chunked"] = round(statistics.median(
                a / b for a, b in zip(out[name]["T1@chunked"]["rounds_ms"], out[name]["T0@chunked"]["rounds_ms"])), 3)
        print(json.dumps({name: out[name]}), flush=True)
    emit("step", out)


def stage_invariant():
    out = {}
    # bf16 in exact mode too (issue 16's kernels): a seeded request's tokens alone and among 64 should agree
    for dtype, exact in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        for decoder, model_name in (("isd", "idlm-tiny"), ("ar", "idlm-tiny-ar")):
            model, tok = load_pretrained(model_name, dtype=dtype, device=DEV)
            prompts = bench_prompts(tok, 64)
            rng = random.Random(0)
            mixed = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                                    seed=rng.choice([None, 1000 + i]), max_tokens=rng.randint(8, 64))
                     for i in range(64)]
            probe = SamplingParams(temperature=1.0, top_p=0.95, seed=424242, max_tokens=64, ignore_eos=True)
            cfg = EngineConfig(decoder=decoder, stride=4, max_num_seqs=64, exact=exact)
            alone = LLMEngine(model, tok, cfg).run([prompts[3]], [probe])[0]
            eng = LLMEngine(model, tok, cfg)
            outs = eng.run(prompts[:32] + [prompts[3]] + prompts[32:], mixed[:32] + [probe] + mixed[32:])
            ref = generate(model, make_decoder(decoder, 4, model.config, tok), [prompts[3]], [probe])[0]
            out[f"{decoder}_{dtype}" + ("_exact" if exact else "")] = {
                "alone_equals_batched": outs[32].token_ids == alone.token_ids,
                "engine_equals_reference": ref.token_ids == alone.token_ids, "tokens": len(alone.token_ids)}
    emit("invariant", out)


def stage_profile():
    from idlm.bench.offline import step_phases
    from idlm.bench.profile import profile_steps, summarize

    model, tok = load_pretrained("idlm-tiny", dtype="bfloat16", device=DEV)
    prompt = bench_prompts(tok, 1)[0]
    out = {}
    cases = [("T0", 0.0, 4), ("T1", 1.0, 4)]
    if os.environ.get("PROFILE_AUTO") == "1":
        cases += [("auto4_T0", 0.0, "auto"), ("auto4_T1", 1.0, "auto")]
    for label, temp, stride in cases:
        auto = {"auto_max_stride": 4} if stride == "auto" else {}
        eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=stride, max_num_seqs=1, num_pages=512, **auto))
        if stride == "auto":
            eng._forced_stride = 4  # every step N = 4 as the fixed engine's (how `warmup` runs each stride)
        p = SamplingParams(temperature=temp, max_tokens=200, ignore_eos=True, seed=1)
        eng.run([prompt], p)  # warm-up: graphs captured, kernels compiled
        split = step_phases(eng, prompt, p)
        eng.add_request(prompt, p)
        for _ in range(5):
            eng.step()
        steps = 40
        prof, _ = profile_steps(eng, steps)
        while eng.has_unfinished():
            eng.step()
        out[label] = {"split": split, **summarize(prof, steps, top_kernels=12, top_host=16)}
        print(json.dumps({label: out[label]}), flush=True)
    emit("profile", out)


def stage_autosplit():
    """Batch 1, idlm-tiny, T = 0.7 and 1: each decode step's time split (`step_phases`, per stride) of an
    AR engine and of an unheld `--stride auto` engine (strides up to 4, its own choices): the H200 tables
    had an auto engine's sampled plain AR steps (N = 1) ~0.25 ms dearer than the AR engine's steps while
    its greedy ones were not (docs/stride.md), which host-only runs on a CPU do not reproduce."""
    from idlm.bench.offline import step_phases

    model, tok = load_pretrained("idlm-tiny", dtype="bfloat16", device=DEV)
    prompt = bench_prompts(tok, 1)[0]
    out = {}
    engines = {"ar": LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=1, num_pages=512)),
               "auto": LLMEngine(model, tok, EngineConfig(decoder="isd", stride="auto", auto_max_stride=4,
                                                          max_num_seqs=1, num_pages=512))}
    out["auto_warmup_s"] = engines["auto"].warmup()
    for temp in (0.7, 1.0):
        for name, eng in engines.items():
            p = SamplingParams(temperature=temp, max_tokens=300, ignore_eos=True, seed=1)
            eng.run([prompt], p)  # warm-up
            out[f"{name}/T{temp:g}"] = step_phases(eng, prompt, p)
            print(json.dumps({f"{name}/T{temp:g}": out[f"{name}/T{temp:g}"]}), flush=True)
    emit("autosplit", out)


def stage_compile():
    from idlm.layers.fused import compile_fallbacks, fallen_back

    model, tok = load_pretrained("idlm-tiny", dtype="bfloat16", device=DEV)
    prompts = bench_prompts(tok, 128)
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, max_num_seqs=64))
    rows = {}
    for temp in (1.0, 0.0):
        for c in (1, 8, 64):
            r = bench_offline(eng, prompts, [c], max_tokens=48, temperature=temp)[0]
            rows[f"T{temp:g}/C{c}"] = {"step_ms": r["decode_step_ms"], "tpf": r["tpf"]}
            print(json.dumps({f"T{temp:g}/C{c}": rows[f"T{temp:g}/C{c}"]}), flush=True)
    ratio = {f"C{c}": round(rows[f"T1/C{c}"]["step_ms"] / rows[f"T0/C{c}"]["step_ms"], 3) for c in (1, 8, 64)}
    emit("compile", {"rows": rows, "sampled_over_greedy_step": ratio, "compile_fallbacks": compile_fallbacks(),
                     "eager_fallbacks": fallen_back()})


def main():
    for s in timed_before_profiled((sys.argv[1] if len(sys.argv) > 1 else "step,invariant").split(","), {"profile"}):
        globals()[f"stage_{s}"]()
    summary = {"summary": True}
    if "step" in results:
        summary["T1_over_T0_step"] = {k: v["T1_over_T0_step"] for k, v in results["step"].items()}
    if "invariant" in results:
        summary["invariant"] = {k: v["alone_equals_batched"] for k, v in results["invariant"].items()}
    save_record(results, "bench_sampling.json")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
