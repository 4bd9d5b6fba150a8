"""GPU driver for issue 13's policy table: the adaptive stride on a Qwen3-8B-shaped model (random bf16
weights) whose drafts are accepted with probability p = 0.9, 0.7, 0.5 by construction
(`idlm.bench.policy.synthetic_acceptance`), at C = 1, 16, 64, 128: the stride mix it chooses, its
predicted and the measured committed tokens/s per request, and AR on the same weights beside them.

    python scripts/bench_policy.py              (H200: JSON lines, a summary last, $OUT/bench_policy.json)
    SMOKE=1 python scripts/bench_policy.py      (CPU-sized, a tiny random shape: tests this script)

Environment: PROBS ("0.9,0.7,0.5"), CONCURRENCY ("1,16,64,128"), MAX_TOKENS (128).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record  # noqa: E402
from idlm.bench.policy import bench_policy, synthetic_acceptance  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine, freeze_gc  # noqa: E402
from idlm.models.random import random_model  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            mask_token_id=255)


def main() -> None:
    probs = [float(x) for x in os.environ.get("PROBS", "0.9,0.7,0.5").split(",")]
    conc = [int(x) for x in os.environ.get("CONCURRENCY", "1,2" if SMOKE else "1,16,64,128").split(",")]
    max_tokens = int(os.environ.get("MAX_TOKENS", "16" if SMOKE else "128"))
    t0 = time.time()
    model = (random_model(TINY, dtype="float32", device="cpu") if SMOKE
             else random_model("qwen3-8b", dtype="bfloat16", device="cuda"))
    out = {**environment(DEV), "shape": "tiny" if SMOKE else "qwen3-8b", "dtype": str(model.dtype),
           "max_tokens": max_tokens, "model_load_s": round(time.time() - t0, 1), "ar": {}, "auto": {}}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size - 1, (64,), generator=g).tolist() for _ in range(max(conc))]
    pages = max(conc) * (-(-(64 + max_tokens + 16) // 16)) + 16
    cfg = dict(max_num_seqs=max(conc), num_pages=pages, cuda_graphs=not SMOKE)

    ar = LLMEngine(model, None, EngineConfig(decoder="ar", stride=1, **cfg))
    ar.run(prompts[:2], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * 2)  # compile
    for c in conc:
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)] * c
        ar.run(prompts[:c], params)  # untimed: captures this concurrency's CUDA graphs (every batch bucket
        # its rows pass through as they finish); the first run of the H200 table timed a capture: 51 ms a step
        freeze_gc()
        before, t, graphs = dict(ar.counters), time.perf_counter(), ar.runner.graphs_captured
        outs = ar.run(prompts[:c], params)
        secs = ar.counters["decode_time_s"] - before["decode_time_s"]
        decoded = sum(len(o.token_ids) for o in outs) - c
        out["ar"][str(c)] = {"measured_tok_s_per_request": round(decoded / secs / c, 1),
                             "step_ms": round(secs / (ar.counters["decode_forwards"] - before["decode_forwards"]) * 1e3,
                                              4), "wall_s": round(time.perf_counter() - t, 2),
                             "new_graphs": ar.runner.graphs_captured - graphs}
        print(json.dumps({"ar": {c: out["ar"][str(c)]}}), flush=True)
    del ar

    for p in probs:  # a fresh engine per p: its pooled acceptance prior is that p's
        eng = LLMEngine(model, None, EngineConfig(decoder="isd", stride="auto", **cfg))
        synthetic_acceptance(eng, p, seed=1)
        out.setdefault("warmup_s", {})[str(p)] = eng.warmup()
        out["auto"][str(p)] = {}
        for c in conc:
            # an untimed run first (the strides it tries capture their graphs at this batch's buckets; the
            # policy learns this batch's step times), then the timed one, from that state
            first = bench_policy(eng, prompts, c, max_tokens)
            freeze_gc()  # no full garbage collection inside the timed run
            r = bench_policy(eng, prompts, c, max_tokens)
            r["first_run"] = {k: first[k] for k in ("measured_tok_s_per_request", "stride_mix", "new_graphs")}
            r["over_ar"] = round(r["measured_tok_s_per_request"] / out["ar"][str(c)]["measured_tok_s_per_request"], 3)
            out["auto"][str(p)][str(c)] = r
            print(json.dumps({"p": p, **r}), flush=True)
            save_record(out, "bench_policy.json")
        del eng
        if DEV == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = round(time.time() - t0, 1)
    save_record(out, "bench_policy.json")
    print(json.dumps({"summary": True, **{k: v for k, v in out.items() if k not in ("auto",)}}), flush=True)


if __name__ == "__main__":
    main()
