"""TPF of SmolLM2 R-ISD (the embedded adapter) at several strides, with and without rejection branches, on
the CPU: how far past the trained N = 4 the drafter's extra MASK rows carry, once no round restarts cold.

    IDLM_CACHE=DIR python scripts/tpf_strides.py PROMPTS [--n-prompts 16] [--strides 4,5,6] [--max-tokens 128]
        [--temperatures 0,0.7] [--layouts plain,branches] [--drafts sample,argmax]

DIR holds the SmolLM2 GGUF (`scripts/smollm2_risd.py prepare`), PROMPTS the distilled data's held-out
`prompts.jsonl` (or docs/runs/risd/heldout_prompts.jsonl.gz). fp32, the engine, answers ending at their end
token; greedy and T = 0.7 (seed 0). --drafts: how sampled rows draft (SamplingParams.draft: "sample" draws
d ~ q̃ and accepts min(1, p̃/q̃); "argmax" drafts argmax q̃ and accepts p̃(d) — exact either way, only the
acceptance differs; greedy rows draft the argmax whatever it says). One JSON line per (temperature, stride,
layout, drafts), a summary last."""

from __future__ import annotations

import argparse
import json
import time

import torch

from idlm.data.chat_prompts import read_prompts
from idlm.decoding.base import DecodeStats
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.layers.lora import LoRAAdapter
from idlm.models import registry
from idlm.models.loader import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--strides", default="4,5,6")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--layouts", default="plain,branches")
    ap.add_argument("--drafts", default="sample")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_pretrained("smollm2-135m-instruct", dtype="float32")
    lora = LoRAAdapter.load(registry.fetch("smollm2-135m-instruct-risd-lora"), model.config)
    prompts = [tok.encode_chat(p["messages"]) for p in read_prompts(args.prompts)[: args.n_prompts]]
    rows = []
    layouts = [{"plain": False, "branches": True}[x] for x in args.layouts.split(",")]
    for temp in (float(x) for x in args.temperatures.split(",")):
        for n in (int(x) for x in args.strides.split(",")):
            for branches in layouts:
                for draft in (args.drafts.split(",") if temp > 0 else ["argmax"]):
                    t0 = time.time()
                    eng = LLMEngine(model, tok, EngineConfig(decoder="risd", stride=n, max_num_seqs=16,
                                                             branches=branches), lora=lora)
                    outs = eng.run(prompts, SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=0,
                                                           draft=draft))
                    s = DecodeStats.total(o.stats for o in outs)
                    rows.append({"T": temp, "N": n, "branches": branches, "draft": draft, "tpf": round(s.tpf, 4),
                                 "tokens": s.committed, "acceptance_per_position": s.acceptance_per_position,
                                 "s": round(time.time() - t0, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"summary": True, "prompts": len(prompts), "rows": rows}))


if __name__ == "__main__":
    main()
