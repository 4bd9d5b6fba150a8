"""The HF transformers baseline (`idlm.bench.hf`): same weights, static cache; its greedy tokens equal
idlm's greedy AR engine's, so the speed ratio compares the same work."""

from __future__ import annotations

from idlm.bench.hf import hf_generate_speed, load_hf
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine


def test_hf_static_cache_baseline_matches_idlm_greedy(tiny_ar):
    model, tok, _ = tiny_ar
    prompts = [tok.encode("def fibonacci(n):"), tok.encode_chat([{"role": "user", "content": "What is 17 + 25?"}])]
    res = hf_generate_speed(load_hf(model, tok), prompts, max_new_tokens=12, compile=False, reps=1)
    ours = LLMEngine(model, tok, EngineConfig(decoder="ar")).run(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert res["outputs"] == [o.token_ids for o in ours]
    assert res["per_request_tok_s"] > 0 and len(res["reps_tok_s"]) == 2 and res["cache"] == "static"
