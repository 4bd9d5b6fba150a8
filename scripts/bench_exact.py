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

    python scripts/bench_exact.py agree,bits,preempt,speed
    SHAPES=qwen3-8b python scripts/bench_exact.py speed         (issue 16's 8B rows)

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

from idlm.bench import environment  # noqa: E402
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


def main() -> None:
    stages = (sys.argv[1] if len(sys.argv) > 1 else "agree,bits,preempt,speed").split(",")
    t0 = time.time()
    loaded = models()
    for stage in stages:
        {"agree": stage_agree, "bits": stage_bits, "preempt": stage_preempt, "speed": stage_speed}[stage](*loaded)
    results["wall_s"] = round(time.time() - t0, 1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_exact.json"), "w") as f:
            json.dump(results, f, indent=1)
    summary = {"summary": True, "wall_s": results["wall_s"]}
    if "agree" in results:
        summary["exact_identical"] = {k: v["identical"] for k, v in results["agree"].items() if k.startswith("exact")}
    if "speed" in results:
        summary["exact_over_default"] = {k: v["exact_over_default"] for k, v in results["speed"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
