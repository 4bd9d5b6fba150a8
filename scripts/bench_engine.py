"""GPU driver for the engine issue's measurements (run on the device; prints JSON lines, the last one
a summary, and writes $OUT/bench_engine.json).

Stages (comma-separated argv[1], default all):
  kernel   the Triton paged-attention kernel vs the reference path (max |diff|, fp32 and bf16)
  exact    engine (CUDA graphs, fp32) vs the reference runner, greedy, idlm-tiny AR/ISD N=2,4,8 and R-ISD
  tiny     ISD N=4 on idlm-tiny vs AR on idlm-tiny-ar (bf16, CUDA graphs): offline bench at C=1,8,64
  smollm2  AR decode of SmolLM2-135M-Instruct at batch 1 (engine: reference paged attention, Triton
           kernel, and the default = kernel + fused projections) vs HF transformers generate
           (needs SMOLLM2_GGUF=path and the gguf package)
  latency  forward latency of a random Qwen3-8B-shaped model, Q in {1, 7}, batch 1..64, context 1024
           (Triton kernel, then the reference path)

    python scripts/bench_engine.py kernel,exact,tiny,latency
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record  # noqa: E402
from idlm.bench.latency import bench_latency  # noqa: E402
from idlm.bench.offline import bench_offline, bench_prompts  # noqa: E402
from idlm.decoding import make_decoder  # noqa: E402
from idlm.decoding.reference import generate  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.layers.lora import LoRAAdapter  # noqa: E402
from idlm.models.loader import load_pretrained, resolve_model_path  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs the same stages slowly: a check of the script)
results: dict = {**environment(DEV), "mem_get_info_gib": (
    [round(x / 2**30, 1) for x in torch.cuda.mem_get_info()] if DEV == "cuda" else None)}


def emit(key, value):
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def stage_exact():
    model, tok = load_pretrained("idlm-tiny", dtype="float32", device=DEV)
    ar, _ = load_pretrained("idlm-tiny-ar", dtype="float32", device=DEV)
    lora = LoRAAdapter.load(resolve_model_path("idlm-tiny-ar-risd-lora"), ar.config, device=DEV)
    prompts = bench_prompts(tok, 64)
    params = [SamplingParams(temperature=0, max_tokens=16 + (i * 7) % 48) for i in range(64)]
    out = {}
    for name, n, m, lo in [("ar", 2, model, None), ("isd", 2, model, None), ("isd", 4, model, None),
                           ("isd", 8, model, None), ("risd", 4, ar, lora), ("ar", 2, ar, None)]:
        ref = generate(m, make_decoder(name, n, m.config, tok), prompts, params, lora=lo)
        eng = LLMEngine(m, tok, EngineConfig(decoder=name, stride=n, max_num_seqs=64), lora=lo)
        got = eng.run(prompts, params)
        key = f"{name}{n if name != 'ar' else ''}" + ("-base" if m is ar else "")
        out[key] = {"equal": sum(a.token_ids == b.token_ids for a, b in zip(ref, got)), "of": len(prompts),
                    "tpf": round(sum(o.stats.committed for o in got) / max(1, sum(o.stats.forwards for o in got)), 3),
                    "graphs": eng.runner.graphs_captured}
    emit("exact", out)


def stage_kernel():
    """The Triton paged kernel vs the gather + SDPA reference path on the GPU: max |difference| of the
    attention output for SmolLM2 / Qwen3-8B head shapes, Q = 1 and 7, fp32 and bf16."""
    from idlm.layers.paged_attention import PagedAttention, PagedKVCache

    out = {}
    for name, hq, hkv, d in (("smollm2", 9, 3, 64), ("qwen3-8b", 32, 8, 128)):
        for dtype in (torch.float32, torch.bfloat16):
            for T in (1, 7):
                g = torch.Generator(device=DEV).manual_seed(0)
                B, page, ctx = 8, 16, 700
                pages = -(-(ctx + T) // page) + 1
                pool = PagedKVCache(1, B * pages, page, hkv, d, dtype, DEV)
                pool.k.normal_(generator=g)
                pool.v.normal_(generator=g)
                tables = torch.randperm(B * pages, device=DEV, generator=g).view(B, pages)
                starts = torch.randint(0, ctx, (B,), device=DEV, generator=g)
                pos = starts[:, None] + torch.arange(T, device=DEV)
                slots = tables.gather(1, pos // page) * page + pos % page
                q = torch.randn(B, T, hq, d, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
                k = torch.randn(B, T, hkv, d, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
                v = torch.randn(B, T, hkv, d, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
                ref = PagedAttention(pool, slots, tables, starts).attend(0, q, k, v).float()
                got = PagedAttention(pool, slots, tables, starts, kernel=True).attend(0, q, k, v).float()
                out[f"{name}/{str(dtype)[6:]}/Q{T}"] = float((got - ref).abs().max())
    emit("kernel_max_abs_diff", out)


REPS = 3  # each configuration is measured REPS times, interleaved with the ones it is compared with


def median_run(runs: list[dict]) -> dict:
    """The run with the median per-request tokens/s (all its fields), plus every rep's value."""
    ordered = sorted(runs, key=lambda r: r["per_request_tok_s"])
    return dict(ordered[len(ordered) // 2], reps_per_request_tok_s=[r["per_request_tok_s"] for r in runs])


def stage_tiny():
    """ISD N=4 (idlm-tiny) vs AR (idlm-tiny-ar) vs R-ISD: the three engines live side by side and are
    measured in turn, REPS times per concurrency (host-bound steps make single runs noisy)."""
    conc = [1, 8, 64]
    engines = {}
    for key, model_name, decoder, lora_name in (("isd", "idlm-tiny", "isd", None), ("ar", "idlm-tiny-ar", "ar", None),
                                                ("risd", "idlm-tiny-ar", "risd", "idlm-tiny-ar-risd-lora")):
        model, tok = load_pretrained(model_name, dtype="bfloat16", device=DEV)
        lora = None
        if lora_name:
            lora = LoRAAdapter.load(resolve_model_path(lora_name), model.config, device=DEV, dtype=model.dtype)
        cfg = EngineConfig(decoder=decoder, stride=4, max_num_seqs=max(conc), num_pages=8192)
        engines[key] = (LLMEngine(model, tok, cfg, lora=lora), bench_prompts(tok, 256))
    res = {k: [] for k in engines}
    for c in conc:
        runs = {k: [] for k in engines}
        for rep in range(REPS):
            for k, (eng, prompts) in engines.items():
                runs[k].append(bench_offline(eng, prompts, [c], max_tokens=128, warmup=rep == 0)[0])
        for k in engines:
            res[k].append(median_run(runs[k]))
    isd, ar, risd = res["isd"], res["ar"], res["risd"]
    ratios = {c: {"per_request": round(i["per_request_tok_s"] / a["per_request_tok_s"], 3),
                  "throughput": round(i["throughput_tok_s"] / a["throughput_tok_s"], 3),
                  "step_cost": round(i["decode_step_ms"] / a["decode_step_ms"], 3),
                  "risd_per_request": round(r["per_request_tok_s"] / a["per_request_tok_s"], 3)}
              for c, i, a, r in zip(conc, isd, ar, risd)}
    emit("tiny", {"isd4_idlm_tiny": isd, "ar_idlm_tiny_ar": ar, "risd4_idlm_tiny_ar": risd, "ratios": ratios})


def stage_smollm2():
    path = os.environ["SMOLLM2_GGUF"]
    model, tok = load_pretrained(path, dtype="bfloat16", device=DEV)
    msgs = [{"role": "user", "content": "Write a short story about a robot learning to paint."}]
    prompt = tok.encode_chat(msgs)
    # the reference paged path, the Triton kernel, and the default (kernel + fused q/k/v and gate/up matmuls,
    # on its own copy of the model); engines side by side, measured in turn REPS times
    fused = load_pretrained(path, dtype="bfloat16", device=DEV)[0]
    configs = (("sdpa", model, "sdpa", False), ("triton", model, "triton", False), ("default", fused, "auto", None))
    engines = {key: LLMEngine(m, tok, EngineConfig(decoder="ar", max_num_seqs=1, attention=att, num_pages=256,
                                                   fuse_projections=fuse))
               for key, m, att, fuse in configs}
    assert fused.model.layers[0].self_attn.qkv is not None and model.model.layers[0].self_attn.qkv is None
    runs = {key: [] for key in engines}
    for rep in range(REPS):
        for key, eng in engines.items():
            runs[key].append(bench_offline(eng, [prompt], [1], max_tokens=256, num_requests=4, warmup=rep == 0)[0])
    runs = {k: median_run(v) for k, v in runs.items()}
    profile_steps(LLMEngine(fused, tok, EngineConfig(decoder="ar", max_num_seqs=1)), prompt, "smollm2_ar")
    ours = runs["default"]
    tps = {k: v["per_request_tok_s"] for k, v in runs.items()}
    # HF transformers generate on the same weights (bf16), batch 1, greedy, 256 new tokens, EOS ignored
    import tempfile

    from transformers import AutoModelForCausalLM

    from idlm.models.loader import save_pretrained
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, tokenizer=tok)
        hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16).to(DEV).eval()
    ids = torch.tensor([prompt], device=DEV)
    kw = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0)
    hf.generate(ids, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        hf.generate(ids, **kw)
    torch.cuda.synchronize()
    hf_tps = 256 * reps / (time.perf_counter() - t0)
    emit("smollm2", {"engine_ar_batch1": ours, "engine_ar_batch1_sdpa_attention_unfused": runs["sdpa"],
                     "engine_ar_batch1_kernel_unfused": runs["triton"],
                     "hf_generate_tok_s": round(hf_tps, 1),
                     "engine_vs_hf": round(ours["per_request_tok_s"] / hf_tps, 2),
                     "kernel_vs_sdpa": round(tps["triton"] / tps["sdpa"], 3),
                     "fused_vs_unfused": round(tps["default"] / tps["triton"], 3)})


def profile_steps(eng, prompt, label, steps=20):
    """Profile `steps` batch-1 decode steps (CUDA kernels inside the graph vs host work); tables go to
    $OUT/profile_<label>.txt (or stdout)."""
    from torch.profiler import ProfilerActivity, profile

    p = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    eng.run([prompt], p)
    eng.add_request(prompt, p)
    for _ in range(5):
        eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished():
        eng.step()
    text = (prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40) + "\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"profile_{label}.txt"), "w") as f:
            f.write(text)
    else:
        print(text, flush=True)


def stage_profile():
    for name, model_name in (("ar", "idlm-tiny-ar"), ("isd", "idlm-tiny")):
        model, tok = load_pretrained(model_name, dtype="bfloat16", device=DEV)
        eng = LLMEngine(model, tok, EngineConfig(decoder=name, stride=4, max_num_seqs=1))
        profile_steps(eng, bench_prompts(tok, 1)[0], f"tiny_{name}")


def stage_latency():
    from idlm.models.random import random_model

    model = random_model("qwen3-8b", dtype="bfloat16", device=DEV)
    for attention, key in (("triton", "latency_qwen3_8b"), ("sdpa", "latency_qwen3_8b_sdpa_attention")):
        emit(key, bench_latency(model, [1, 7], [1, 2, 4, 8, 16, 32, 64], context=1024, iters=10,
                                attention=attention))
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    stages = (sys.argv[1] if len(sys.argv) > 1 else "kernel,exact,tiny,smollm2,latency").split(",")
    for s in stages:
        t0 = time.perf_counter()
        try:
            globals()[f"stage_{s}"]()
        except Exception as e:  # record and go on: one run must bring back everything it can
            import traceback

            traceback.print_exc()
            emit(f"{s}_error", repr(e))
        results.setdefault("stage_s", {})[s] = round(time.perf_counter() - t0, 1)
        save_record(results, "bench_engine.json")
    print(json.dumps(results))
