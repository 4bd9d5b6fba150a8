"""GPU driver for issue 16 (exact mode): bit-exact greedy R-ISD / ISD against AR in bf16, the same request's
logits bits alone and in batches, under preemption, and what exact mode costs. One call, JSON lines, a
summary last, and $OUT/bench_exact.json.

Stages (comma-separated argv[1], default all):
  agree     bf16, greedy, REQUESTS prompts x TOKENS new tokens: R-ISD N = 4 (idlm-tiny-ar + its adapter; with
            SMOL_ADAPTER=path also SmolLM2 + that adapter, GGUF in $IDLM_CACHE) and ISD N = 2 / 4 / 8
            (idlm-tiny) against AR of the same model, each in exact and in default mode: identical
            outputs, and tokens before the first divergence
  bits      one greedy request's per-token logprobs (each a function of its position's logits row) alone,
            in a batch of 7 and of 64 other requests, and for ISD N = 4, in exact and default mode: how
            many tokens' logprobs are bit-identical to the request alone (AR)
  preempt   the same request with a KV pool so small that it is preempted and recomputed: tokens and
            logprob bits vs an unpreempted run, exact and default
  speed     decode step cost, exact vs default: AR of idlm-tiny-ar at batch 1 and 64 (engine, CUDA graphs),
            and with SMOL=1 (GGUF in $IDLM_CACHE) SmolLM2 AR at batch 1 and 64; SHAPES=qwen3-8b (names of
            idlm.models.random.SHAPES, comma-separated) adds random-weight models of those shapes
  mm        the exact-mode matmul alone: `invariant_linear` vs F.linear (cuBLAS), bf16, at M = 1 (a decode
            step) and M = 64, for Qwen3-8B's weights (hidden 4096: fused qkv 6144 x 4096, o_proj 4096 x 4096,
            fused gate/up 24576 x 4096, down 4096 x 12288, LM head 151936 x 4096); median of CUDA-event
            timings over weight copies cycled past the L2 cache (a decode step reads every weight cold),
            with the split-K count and column tile `invariant_linear` chose, and "layer/M*" the four layer
            matmuls summed. SPLITS=1,2,4,8 also times each forced split count (tuning `split_k`). No model
            is loaded when it runs alone

    python scripts/bench_exact.py agree,bits,preempt,speed,mm
    python scripts/bench_exact.py mm                             (the matmul alone, ~20 s)
    SHAPES=qwen3-8b python scripts/bench_exact.py speed         (issue 16's 8B rows)
    SPLIT_K=1 SHAPES=qwen3-8b python scripts/bench_exact.py speed   (the same, every split-K count forced)

Logprobs (`SamplingParams.logprobs=0`) stand in for the logits: the logprob of the emitted token is a
function of that position's whole logits row, so a flipped bit anywhere in the row changes it (up to
float rounding coincidences, which only make this check weaker, never fake a difference).
SMOKE=1 runs every stage CPU-sized (TRITON_INTERPRET=1, float32, a few tokens): tests this script.
"""

from __future__ import annotations

import json
import os
import sys
import time

SMOKE = os.environ.get("SMOKE") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record  # noqa: E402
from idlm.bench.offline import bench_offline, bench_prompts  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.layers.lora import LoRAAdapter  # noqa: E402
from idlm.models.loader import load_pretrained, resolve_model_path  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
DTYPE = "float32" if SMOKE else "bfloat16"
REQUESTS = 3 if SMOKE else 64
TOKENS = 6 if SMOKE else 256
results: dict = {**environment(DEV), "dtype": DTYPE}


def emit(key, value):
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def engine(model, tok, decoder, exact, stride=4, lora=None, **kw):
    kw.setdefault("max_num_seqs", 64)
    kw.setdefault("cuda_graphs", not SMOKE)
    return LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=stride, exact=exact, **kw), lora=lora)


def greedy(n=TOKENS, logprobs=None):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)


def agreement(ref, got) -> dict:
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, got))
    prefix = []
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        prefix.append(n / max(1, len(a.token_ids)))
    return {"identical": same, "of": len(ref), "tokens_before_divergence": round(sum(prefix) / len(prefix), 4)}


SMOKE_SHAPE = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                   mask_token_id=3, max_position_embeddings=512)


class Case:
    """A model, its tokenizer (None in SMOKE) and `prompts(n)`."""

    def __init__(self, model, tok, seed=0):
        self.model, self.tok, self.seed = model, tok, seed

    def prompts(self, n):
        if self.tok is not None:
            return bench_prompts(self.tok, n)
        g = torch.Generator().manual_seed(self.seed)
        return [torch.randint(4, 64, (int(k),), generator=g).tolist() for k in torch.randint(3, 12, (n,), generator=g)]


def models():
    """(ISD model, AR model, the AR model's R-ISD adapter): idlm-tiny, idlm-tiny-ar and its adapter (SMOKE: one
    tiny random model with a MASK token and a random adapter)."""
    if SMOKE:
        from idlm.layers.lora import LoRAConfig
        from idlm.models.random import random_model

        model = random_model(SMOKE_SHAPE, dtype=DTYPE, device=DEV, std=0.5)
        lora = LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(std=0.5, seed=0, zero_b=False)
        return Case(model, None), Case(model, None, seed=1), lora
    tiny, tok = load_pretrained("idlm-tiny", dtype=DTYPE, device=DEV)
    ar_model, ar_tok = load_pretrained("idlm-tiny-ar", dtype=DTYPE, device=DEV)
    lora = LoRAAdapter.load(resolve_model_path("idlm-tiny-ar-risd-lora"), ar_model.config, device=DEV,
                            dtype=ar_model.dtype)
    return Case(tiny, tok), Case(ar_model, ar_tok), lora


def stage_agree(isd, arc, lora):
    out = {}
    smol = None
    if os.environ.get("SMOL_ADAPTER"):
        model, tok = load_pretrained("smollm2-135m-instruct", dtype=DTYPE, device=DEV)
        smol = (Case(model, tok), LoRAAdapter.load(os.environ["SMOL_ADAPTER"], model.config, device=DEV,
                                                   dtype=model.dtype))
    for exact in (True, False):
        mode = "exact" if exact else "default"
        prompts = arc.prompts(REQUESTS)
        ar = engine(arc.model, arc.tok, "ar", exact).run(prompts, greedy())
        risd = engine(arc.model, arc.tok, "risd", exact, lora=lora).run(prompts, greedy())
        out[f"{mode}/risd4_vs_ar"] = agreement(ar, risd)
        if smol is not None:  # SmolLM2 with its trained R-ISD adapter
            prompts = smol[0].prompts(REQUESTS)
            ar = engine(smol[0].model, smol[0].tok, "ar", exact).run(prompts, greedy())
            risd = engine(smol[0].model, smol[0].tok, "risd", exact, lora=smol[1]).run(prompts, greedy())
            out[f"{mode}/smollm2_risd4_vs_ar"] = agreement(ar, risd)
        prompts = isd.prompts(REQUESTS)
        ar = engine(isd.model, isd.tok, "ar", exact).run(prompts, greedy())
        for n in (2, 4, 8):
            out[f"{mode}/isd{n}_vs_ar"] = agreement(ar, engine(isd.model, isd.tok, "isd", exact, stride=n).run(
                prompts, greedy()))
        print(json.dumps({mode: {k: v for k, v in out.items() if k.startswith(mode)}}), flush=True)
    emit("agree", out)


def _logprob_bits(outputs, i):
    return [float(x) for x in outputs[i].logprobs]


def stage_bits(isd, *_):
    tiny, tok = isd.model, isd.tok
    prompts = isd.prompts(65)
    target, others = prompts[0], prompts[1:]
    n = min(TOKENS, 64)
    out = {}
    for exact in (True, False):
        alone = engine(tiny, tok, "ar", exact).run([target], greedy(n, 0))
        ref = _logprob_bits(alone, 0)
        row = {}
        for label, batch in (("batch7", others[:6]), ("batch64", others[:63])):
            got = engine(tiny, tok, "ar", exact).run(batch[:3] + [target] + batch[3:], greedy(n, 0))
            row[label] = sum(a == b for a, b in zip(ref, _logprob_bits(got, 3)))
        got = engine(tiny, tok, "isd", exact).run(others[:7] + [target], greedy(n, 0))
        row["isd4_batch8"] = sum(a == b for a, b in zip(ref, _logprob_bits(got, 7)))
        row["of"] = len(ref)
        out["exact" if exact else "default"] = row
    emit("bits", out)


def stage_preempt(isd, *_):
    tiny, tok = isd.model, isd.tok
    prompts = isd.prompts(8)
    out = {}
    for exact in (True, False):
        big = engine(tiny, tok, "isd", exact, max_num_seqs=8).run(prompts, greedy(TOKENS, 0))
        # a pool that holds about two of the eight requests at their full length: the scheduler preempts
        # (and later recomputes) the others as they grow
        need = max(len(p) for p in prompts) + TOKENS + 8
        small = engine(tiny, tok, "isd", exact, max_num_seqs=8, num_pages=2 * (-(-need // 16)) + 1)
        got = small.run(prompts, greedy(TOKENS, 0))
        out["exact" if exact else "default"] = {
            "preemptions": small.scheduler.num_preemptions,
            "identical_tokens": sum(a.token_ids == b.token_ids for a, b in zip(big, got)),
            "identical_logprob_bits": sum(_logprob_bits([a], 0) == _logprob_bits([b], 0) for a, b in zip(big, got)),
            "of": len(prompts)}
    emit("preempt", out)


def stage_speed(isd, arc, lora):
    if os.environ.get("SPLIT_K"):  # tuning: every exact-mode matmul with this many K splits
        import idlm.layers.invariant as inv

        inv.split_k = lambda n, k, sm, s=int(os.environ["SPLIT_K"]): inv.k_partition(k, s)[0]
        results["split_k_forced"] = int(os.environ["SPLIT_K"])
    cases = [("idlm-tiny-ar", arc)]
    if os.environ.get("SMOL") == "1":
        cases.append(("smollm2", Case(*load_pretrained("smollm2-135m-instruct", dtype=DTYPE, device=DEV))))
    for shape in filter(None, os.environ.get("SHAPES", "").split(",")):  # random weights of a named shape
        from idlm.models.random import random_model

        cases.append((shape, Case(random_model(shape, dtype=DTYPE, device=DEV), None)))
    out = {}
    for name, case in cases:
        model, mtok, prompts = case.model, case.tok, case.prompts(128)
        for c in ((1, 2) if SMOKE else (1, 64)):
            steps = {}
            # a KV pool sized for the run (an 8B model's default pool would take most of the memory twice)
            engines = {m: engine(model, mtok, "ar", m == "exact", max_num_seqs=c, num_pages=max(64, 16 * c))
                       for m in ("exact", "default")}
            for rep in range(1 if SMOKE else 3):  # interleaved repetitions, median
                for mode, eng in engines.items():
                    r = bench_offline(eng, prompts, [c], max_tokens=TOKENS if SMOKE else 128,
                                      num_requests=max(2, 2 * c), warmup=rep == 0)[0]
                    steps.setdefault(mode, []).append(r["decode_step_ms"])
            med = {m: sorted(v)[len(v) // 2] for m, v in steps.items()}
            out[f"{name}/C{c}"] = {"exact_step_ms": med["exact"], "default_step_ms": med["default"],
                                   "exact_over_default": round(med["exact"] / med["default"], 3), "reps": steps}
            print(json.dumps({f"{name}/C{c}": out[f"{name}/C{c}"]}), flush=True)
            del engines
    emit("speed", out)


# Qwen3-8B's linear weights [N, K]: hidden 4096, 32 query + 8 KV heads of 128, intermediate 12288, vocab 151936
MM_SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
             "lm_head": (151936, 4096)}
SMOKE_MM_SHAPES = {"qkv": (48, 256), "o_proj": (32, 32), "gate_up": (128, 32), "down": (32, 512),
                   "lm_head": (64, 32)}


def _time_ms(fn, xs, ws, iters, reps) -> float:
    """Median over `reps` of the mean ms of `iters` calls fn(x, w), cycling through the weight copies `ws`.
    On CUDA the calls are captured in one CUDA graph and replayed, as a decode step runs them: timing
    eager calls would time Triton's host-side launch (tens of µs), not the kernels."""
    for i in range(3):  # compile / autotune, warm the allocator
        fn(xs, ws[i % len(ws)])
    times = []
    graph = None
    if DEV == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fn(xs, ws[i % len(ws)])
        graph.replay()
    for _ in range(reps):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                fn(xs, ws[i % len(ws)])
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return round(sorted(times)[len(times) // 2], 4)


def stage_mm(*_):
    from idlm.layers.invariant import block_n, invariant_linear, split_k
    from idlm.layers.paged_kernel import device_sm_count

    dtype = getattr(torch, DTYPE)
    sm = device_sm_count(torch.device(DEV))
    forced = [int(v) for v in os.environ.get("SPLITS", "").split(",") if v.strip()]
    iters, reps = (1, 1) if SMOKE else (50, 5)
    g = torch.Generator(device=DEV).manual_seed(0)
    out = {}
    for name, (n, k) in (SMOKE_MM_SHAPES if SMOKE else MM_SHAPES).items():
        # enough copies of the weight that cycling through them misses the L2 cache (H200: 50 MB), as a decode
        # step's weights do
        copies = max(1, -(-(256 << 20) // (n * k * torch.finfo(dtype).bits // 8)))
        ws = [torch.randn(n, k, generator=g, device=DEV, dtype=dtype) * k ** -0.5 for _ in range(copies)]
        for m in (1, 64):
            x = torch.randn(m, k, generator=g, device=DEV, dtype=dtype)
            row = {"n": n, "k": k, "m": m, "splits": split_k(n, k, sm), "block_n": block_n(n, sm)}
            row["invariant_ms"] = _time_ms(invariant_linear, x, ws, iters, reps)
            row["torch_ms"] = _time_ms(torch.nn.functional.linear, x, ws, iters, reps)
            row["invariant_over_torch"] = round(row["invariant_ms"] / row["torch_ms"], 3)
            row["invariant_GBps"] = round(n * k * ws[0].element_size() / row["invariant_ms"] / 1e6, 1)  # weight bytes
            for s in forced:
                row[f"invariant_ms_splits{s}"] = _time_ms(lambda a, b, s=s: invariant_linear(a, b, splits=s), x, ws,
                                                          iters, reps)
            out[f"{name}/M{m}"] = row
            print(json.dumps({f"mm/{name}/M{m}": row}), flush=True)
        del ws
    for m in (1, 64):  # one decoder layer's four matmuls
        parts = [out[f"{name}/M{m}"] for name in ("qkv", "o_proj", "gate_up", "down")]
        inv, ref = sum(p["invariant_ms"] for p in parts), sum(p["torch_ms"] for p in parts)
        out[f"layer/M{m}"] = {"invariant_ms": round(inv, 4), "torch_ms": round(ref, 4),
                              "invariant_over_torch": round(inv / ref, 3)}
        print(json.dumps({f"mm/layer/M{m}": out[f"layer/M{m}"]}), flush=True)
    emit("mm", out)


def main() -> None:
    stages = (sys.argv[1] if len(sys.argv) > 1 else "agree,bits,preempt,speed,mm").split(",")
    t0 = time.time()
    loaded = models() if set(stages) - {"mm"} else (None, None, None)
    for stage in stages:
        {"agree": stage_agree, "bits": stage_bits, "preempt": stage_preempt, "speed": stage_speed,
         "mm": stage_mm}[stage](*loaded)
        save_record(results, "bench_exact.json")  # after every stage: a call cut off keeps what it measured
    results["wall_s"] = round(time.time() - t0, 1)
    save_record(results, "bench_exact.json")
    summary = {"summary": True, "wall_s": results["wall_s"]}
    if "agree" in results:
        summary["exact_identical"] = {k: v["identical"] for k, v in results["agree"].items() if k.startswith("exact")}
    if "speed" in results:
        summary["exact_over_default"] = {k: v["exact_over_default"] for k, v in results["speed"].items()}
    if "mm" in results:
        summary["mm_invariant_over_torch"] = {k: v["invariant_over_torch"] for k, v in results["mm"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
