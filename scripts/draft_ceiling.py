"""The acceptance ceiling of ISD's first draft for a given model: how well could *any* drafter of it do?

In ISD (SPEC §4) the clean token c for position P+1 and the first draft, for P+2, come out of the same
forward, so the draft cannot see c. The best it can propose is the two-ahead marginal
q*(y) = Σ_c p̃(c | x≤P) p̃(y | x≤P, c), accepted with probability E_c[1 − TV(p̃(· | x≤P, c), q*)]
(`idlm.decoding.acceptance.marginal_draft_acceptance`). No training of the MASK slots can beat that for
the model's own p̃: only a model whose p̃ is sharper can. At T = 0 the ceiling is 1 (c is the argmax, a
function of the prefix); at T > 0 it is set by how much the next token's randomness moves the one after.
The same bound holds for an R-ISD drafter of an unchanged model (issue 12) and for a conversion (issue 15).

For each temperature the model answers held-out chat prompts with its own AR sampling; at every answer
position the K most likely c (their weights renormalised; the mass they cover is reported) are run as one
extra token each over the cached prefix, and the ceiling is averaged over positions. Also printed: α's
ratio for the token such a slot emits (`marginal_draft_alpha`) and so the α of stride-2 ISD with drafts at
the ceiling, (1 + that)/2 (each cycle emits one slot token and one from p̃); and the analytic TPF at
N = 2, 3, 4 if every draft were accepted at that rate (SPEC §7; optimistic: later drafts miss more tokens
than one). One JSON line per temperature, then a summary line.

    IDLM_CACHE=/tmp/smol/cache python scripts/draft_ceiling.py --model smollm2-135m-instruct \
        --prompts /tmp/smol/distill/prompts.jsonl --n-prompts 16 --max-tokens 128 --temperatures 0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from idlm.decoding.acceptance import analytic_tpf, marginal_draft_acceptance, marginal_draft_alpha
from idlm.decoding.ar import ARDecoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors
from idlm.layers.attention import sdpa


class _Prefix:
    """Plain causal attention that keeps each layer's keys and values (k/v [1, Hkv, S, D])."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v):
        self.kv[layer] = (k, v)
        return sdpa(q, k, v, None, is_causal=True)


class _Branches:
    """Branch tokens over a cached prefix: branch i sees prefix keys 0..ends[i] and itself only."""

    def __init__(self, prefix: _Prefix, ends: torch.Tensor):
        self.prefix, self.ends = prefix, ends  # ends [M]

    def attend(self, layer, q, k, v):  # q [1, Hq, M, D], k/v [1, Hkv, M, D]
        pk, pv = self.prefix.kv[layer]
        S, M = pk.shape[2], q.shape[2]
        sees_prefix = torch.arange(S, device=q.device)[None, :] <= self.ends[:, None]  # [M, S]
        mask = torch.cat([sees_prefix, torch.eye(M, dtype=torch.bool, device=q.device)], 1)  # [M, S + M]
        return sdpa(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), mask[None, None])


@torch.no_grad()
def sequence_ceiling(model, prompt: list[int], answer: list[int], params: SamplingParams, top: int,
                     chunk: int) -> tuple[list[float], list[float], list[float]]:
    """Per answer position t (c = answer[t] is the token after the prefix): the first draft's ceiling, α's
    ratio for the token that slot emits at the ceiling, and the mass of p̃(c) the `top` branches cover."""
    seq = torch.tensor([prompt + answer], device=model.device)
    prefix = _Prefix()
    hidden = model(seq, attn=prefix)[0]  # [S, H]
    ends = list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))  # prefix x≤P ends at P
    p1 = filtered_probs(model.compute_logits(hidden[ends]), *params_tensors([params] * len(ends), model.device))
    w, c = p1.topk(top, -1)  # [n, K]
    coverage = w.sum(-1)
    ceilings, alphas = [], []
    for lo in range(0, len(ends), chunk):
        e = torch.tensor(ends[lo: lo + chunk], device=model.device)
        ids = c[lo: lo + chunk].reshape(1, -1)  # [1, m·K]
        at = e.repeat_interleave(top)  # each branch token sits at P+1 after its prefix
        h = model(ids, positions=(at + 1)[None], attn=_Branches(prefix, at))[0]
        p2 = filtered_probs(model.compute_logits(h), *params_tensors([params] * ids.shape[1], model.device))
        ww = w[lo: lo + chunk] / w[lo: lo + chunk].sum(-1, keepdim=True)
        ceilings += marginal_draft_acceptance(ww, p2.view(len(e), top, -1)).tolist()
        alphas += marginal_draft_alpha(ww, p2.view(len(e), top, -1)).tolist()
    return ceilings, alphas, coverage.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", required=True, help=".jsonl with a \"prompt\" per line (held-out chat prompts)")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--top", type=int, default=32, help="branches per position (the most likely c)")
    ap.add_argument("--chunk", type=int, default=16, help="positions per branch forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from idlm.inference import load_for_inference

    inf = load_for_inference(args.model, decoder="ar", device=args.device, dtype=torch.float32)
    model, tok = inf.model, inf.tokenizer
    texts = [json.loads(line)["prompt"] for line in open(args.prompts, encoding="utf-8") if line.strip()]
    prompts = [tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in texts[: args.n_prompts]]
    eos = sorted(set(tok.eos_token_ids) | set(model.config.eos_token_ids))
    summary = {}
    for temp in (float(t) for t in args.temperatures.split(",")):
        t0 = time.time()
        torch.manual_seed(args.seed)
        params = SamplingParams(temperature=temp, max_tokens=args.max_tokens)
        outs = generate(model, ARDecoder(), prompts, params, eos_token_ids=eos)
        ceil, alpha, cover = [], [], []
        for prompt, out in zip(prompts, outs):
            if len(out.token_ids) >= 2:
                a, b, c = sequence_ceiling(model, prompt, out.token_ids[:-1], params, args.top, args.chunk)
                ceil, alpha, cover = ceil + a, alpha + b, cover + c
        mean, slot_alpha = sum(ceil) / len(ceil), sum(alpha) / len(alpha)
        row = {"temperature": temp, "positions": len(ceil), "first_draft_ceiling": round(mean, 4),
               "slot_alpha": round(slot_alpha, 4), "alpha_stride2_at_ceiling": round((1 + slot_alpha) / 2, 4),
               "coverage": round(sum(cover) / len(cover), 4),
               "ceiling_quartiles": [round(x, 4) for x in torch.tensor(ceil).quantile(
                   torch.tensor([0.25, 0.5, 0.75])).tolist()],
               "tpf_if_every_draft_at_ceiling": {n: round(analytic_tpf(mean, n), 3) for n in (2, 3, 4)},
               "wall_s": round(time.time() - t0, 1)}
        summary[str(temp)] = row
        print(json.dumps(row), flush=True)
    print(json.dumps({"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens, "top": args.top,
                      "dtype": "float32", "device": args.device, "ceiling": summary}))


if __name__ == "__main__":
    main()
