"""TPF of sampled R-ISD (or ISD) against the temperature its drafts are drawn at (`draft_temperature`).

Why it exists: a drafter's q̃ for a MASK slot is a mixture over the tokens it cannot see yet (the one drawn
in the same forward), so drawing drafts at the request's own temperature need not maximise how often they
are accepted; verification tests each draft against the q̃ it came from, so any draft temperature is exact
(tests/test_isd_distribution.py) and only TPF changes. This script measures that curve on the engine:
seeded requests (one seed per request, so repeated prompts are independent samples), N = 4.

    python scripts/draft_temperature.py                         (idlm-tiny-ar + its R-ISD adapter, CPU)
    python scripts/draft_temperature.py --temperatures 0.7 --draft-temperatures 0.5,0.3 --requests 256

Prints a JSON line per (temperature, draft temperature), a summary line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(10):", "def main():", "x = [",
           "# compute the", "if __name__"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="idlm-tiny-ar")
    ap.add_argument("--lora", default="idlm-tiny-ar-risd-lora", help="R-ISD adapter ('' : ISD of an I-DLM)")
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--draft-temperatures", default="0.8,0.7,0.6,0.5,0.4,0.3",
                    help="besides the request's own temperature (always measured first)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from idlm.decoding.base import DecodeStats
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained, resolve_model_path

    model, tok = load_pretrained(args.model, device=args.device)
    lora = LoRAAdapter.load(resolve_model_path(args.lora), model.config, device=args.device) if args.lora else None
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    rows = []
    for temp in (float(t) for t in args.temperatures.split(",")):
        for td in [None] + [float(x) for x in args.draft_temperatures.split(",") if x]:
            eng = LLMEngine(model, tok, EngineConfig(decoder="risd" if lora else "isd", stride=args.stride,
                                                     max_num_seqs=args.requests), lora=lora)
            t0 = time.perf_counter()
            outs = eng.run(prompts, [SamplingParams(temperature=temp, max_tokens=args.max_tokens, ignore_eos=True,
                                                    seed=i, draft_temperature=td) for i in range(len(prompts))])
            total = DecodeStats.total(o.stats for o in outs)
            rows.append({"temperature": temp, "draft_temperature": td, "tpf": round(total.tpf, 4),
                         "acceptance_per_position": total.acceptance_per_position,
                         "forwards": total.forwards, "wall_s": round(time.perf_counter() - t0, 2)})
            print(json.dumps(rows[-1]), flush=True)
    best = {}
    for r in rows:
        if r["temperature"] not in best or r["tpf"] > best[r["temperature"]]["tpf"]:
            best[r["temperature"]] = r
    print(json.dumps({"summary": True, "model": args.model, "lora": args.lora or None, "requests": args.requests,
                      "max_tokens": args.max_tokens, "stride": args.stride, "torch": torch.__version__,
                      "own_temperature_tpf": {str(r["temperature"]): r["tpf"] for r in rows
                                              if r["draft_temperature"] is None},
                      "best": {str(t): {"draft_temperature": r["draft_temperature"], "tpf": r["tpf"]}
                               for t, r in best.items()}}))


if __name__ == "__main__":
    main()
