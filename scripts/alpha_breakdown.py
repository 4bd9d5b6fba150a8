"""Where idlm-tiny's introspective acceptance rate α (SPEC §7) is lost: α split by the kind of each
emitted token (prefill token, clean token of a C step, accepted draft, bonus token, correction),
at several temperatures. CPU, a minute or two; last stdout line is one JSON object.

    python scripts/alpha_breakdown.py --instructions DATASET/eval/instructions.jsonl --temperatures 1,0.8,0.6

Prompts: 32 held-out synthetic tasks (committed) + up to 32 held-out instruction pairs (from an
`idlm data build` dataset, if given) — the model cards' α prompt set. Requests are decoded one at a
time (so every emitted token can be labelled); p is scored as in `idlm.eval.alpha`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.decoding import isd as isd_module  # noqa: E402
from idlm.decoding import make_decoder  # noqa: E402
from idlm.decoding.reference import generate  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.eval.alpha import clean_scores  # noqa: E402
from idlm.eval.tasks import COMMITTED_TASKS, load_jsonl  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="idlm-tiny")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--instructions", default=None)
    ap.add_argument("--temperatures", default="1.0")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_pretrained(args.model, dtype="float32")
    texts = [r["prompt"] for r in load_jsonl(COMMITTED_TASKS)[::10][:32]]
    if args.instructions:
        texts += [r["prompt"] for r in load_jsonl(args.instructions)[:32]]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    dec = make_decoder("isd", args.stride, model.config, tok)

    kinds: list[list[str]] = []
    orig = isd_module.ISDDecoder.finish

    def finish(self, states, rows, extra, params, stats):  # label what each step emits
        modes = [s.mode for s in states]
        res = orig(self, states, rows, extra, params, stats)
        for mode, r in zip(modes, res):
            j = len(r.emitted) - 1
            last = "bonus" if j == self.stride - 1 else "correction"
            kinds.append(["clean"] if mode == "C" else ["draft"] * j + [last])
        return res

    isd_module.ISDDecoder.finish = finish
    out = {}
    for temp in [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(temperature=temp, max_tokens=args.max_tokens)
        torch.manual_seed(0)
        ratios = collections.defaultdict(list)
        for p in prompts:
            kinds.clear()
            o = generate(model, dec, [p], params, eos_token_ids=sorted(tok.eos_token_ids))[0]
            labels = ["prefill"] + [k for step in kinds for k in step]
            for kind, pk, qk in zip(labels, clean_scores(model, p, o.token_ids, params), o.token_probs):
                ratios[kind].append(min(1.0, pk / qk))
        n = sum(len(v) for v in ratios.values())
        res = {"alpha": round(sum(sum(v) for v in ratios.values()) / n, 4), "tokens": n,
               "by_kind": {k: {"share": round(len(v) / n, 3), "mean_ratio": round(sum(v) / len(v), 4),
                               "alpha_lost": round(sum(1 - x for x in v) / n, 4)} for k, v in ratios.items()}}
        print(json.dumps({f"T={temp}": res}), flush=True)
        out[f"T={temp}"] = res
    print(json.dumps({"model": args.model, "stride": args.stride, "prompts": len(prompts), "results": out}))


if __name__ == "__main__":
    main()
