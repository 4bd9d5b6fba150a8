"""The acceptance ceiling of ISD's first draft for a given model: how well could *any* drafter of it do?

In ISD (SPEC §4) the clean token c for position P+1 and the first draft, for P+2, come out of the same
forward, so the draft cannot see c. A drafter trained by cross-entropy learns the two-ahead marginal
q*(y) = Σ_c p̃(c | x≤P) p̃(y | x≤P, c), accepted with probability E_c[1 − TV(p̃(· | x≤P, c), q*)]
(`marginal_draft_acceptance`); the most any blind q̃ can be accepted is a little more
(`best_blind_draft_acceptance`, by LP duality). No training of the MASK slots can beat that for the model's
own p̃: only a model whose p̃ is sharper can. At T = 0 the ceiling is 1 (c is the argmax, a function of the
prefix); at T > 0 it is set by how much the next token's randomness moves the one after. The same bound
holds for an R-ISD drafter of an unchanged model (issue 12) and for a conversion (issue 15).

For each temperature the model answers held-out chat prompts with its own AR sampling; at every answer
position the K most likely c (weights renormalised; the mass they cover is reported) are run as one extra
token each over the cached prefix. Per temperature, averaged over positions: both acceptances, an upper
bound (the best, counting every uncovered c as accepted), α's ratio for the token a marginal draft's slot
emits (`marginal_draft_alpha`) and so the α of stride-2 ISD with such drafts, (1 + that)/2 (each cycle emits
one slot token and one from p̃); the analytic TPF at N = 2, 3, 4 (SPEC §7) if every draft were accepted at
the mean rate (`tpf_iid`) or at its own position's rate (`tpf_local`) — estimates, not bounds: later drafts
miss more than one token. One JSON line per temperature, then a summary line; `--out` keeps every position.

    IDLM_CACHE=/tmp/smol/cache python scripts/draft_ceiling.py --model smollm2-135m-instruct \
        --prompts /tmp/smol/distill/prompts.jsonl --n-prompts 24 --max-tokens 128 --temperatures 0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from idlm.decoding.acceptance import (
    analytic_tpf,
    best_blind_draft_acceptance,
    marginal_draft_acceptance,
    marginal_draft_alpha,
)
from idlm.decoding.ar import ARDecoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors
from idlm.training.objectives import RecordKV, XtOverX0, group_attention


def branch_attention(prefix: RecordKV, ends: torch.Tensor) -> XtOverX0:
    """Attention for M branch tokens over a prefix recorded by `RecordKV` (keys [1, Hkv, S, D]): branch i
    sees itself and the prefix keys 0..ends[i] only (`group_attention` with groups of one)."""
    return group_attention(prefix, ends, 1)


@torch.no_grad()
def sequence_ceiling(model, prompt: list[int], answer: list[int], params: SamplingParams, top: int,
                     chunk: int, columns: int = 1024) -> dict[str, list[float]]:
    """Per answer position t (c = answer[t] is the token after the prefix), over the `top` most likely c
    (weights renormalised): `marginal` the acceptance of a draft from the two-ahead marginal, `best` /
    `best_high` the most any blind q̃ gets, from below / above (`best_on_columns`), `alpha` α's ratio for
    what a marginal draft's slot emits, `coverage` the mass of p̃(c) those branches hold."""
    seq = torch.tensor([prompt + answer], device=model.device)
    prefix = RecordKV()
    hidden = model(seq, attn=prefix)[0]  # [S, H]
    ends = list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))  # prefix x≤P ends at P
    p1 = filtered_probs(model.compute_logits(hidden[ends]), *params_tensors([params] * len(ends), model.device))
    w, c = p1.topk(top, -1)  # [n, K]
    out = {"marginal": [], "best": [], "best_high": [], "alpha": [], "coverage": w.sum(-1).tolist()}
    for lo in range(0, len(ends), chunk):
        e = torch.tensor(ends[lo: lo + chunk], device=model.device)
        ids = c[lo: lo + chunk].reshape(1, -1)  # [1, m·K]
        at = e.repeat_interleave(top)  # each branch token sits at P+1 after its prefix
        h = model(ids, positions=(at + 1)[None], attn=branch_attention(prefix, at))[0]
        p2 = filtered_probs(model.compute_logits(h), *params_tensors([params] * ids.shape[1], model.device))
        p2 = p2.view(len(e), top, -1)  # [m, K, V]
        ww = w[lo: lo + chunk] / w[lo: lo + chunk].sum(-1, keepdim=True)
        out["marginal"] += marginal_draft_acceptance(ww, p2).tolist()
        low, high = best_on_columns(ww, p2, columns)
        out["best"] += low.tolist()
        out["best_high"] += high.tolist()
        out["alpha"] += marginal_draft_alpha(ww, p2).tolist()
    return out


def best_on_columns(weights: torch.Tensor, p_next: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`best_blind_draft_acceptance` within the `columns` tokens with the largest max_c p̃_c(y) (the full
    vocabulary costs 50× more): that q̃ is a real draft distribution, so it bounds the best from below; adding
    the marginal mass Σ_c w_c p̃_c(y) of the other tokens (no q̃ gains more there) bounds it from above."""
    if p_next.shape[-1] <= columns:
        best = best_blind_draft_acceptance(weights, p_next)
        return best, best
    cols = p_next.amax(-2).topk(columns, -1).indices  # [..., M]
    sub = p_next.gather(-1, cols[..., None, :].expand(*p_next.shape[:-1], columns))  # [..., K, M]
    rest = (1 - (weights[..., None] * sub).sum(-2).sum(-1)).clamp_min(0)  # the marginal's mass elsewhere
    low = best_blind_draft_acceptance(weights, sub, iters=40)
    return low, low + rest


def local_tpf(accept: list[float], n: int) -> float:
    """Tokens per forward over positions whose drafts are accepted at their own rate: each position's analytic
    TPF (SPEC §7) as if its neighbourhood shared it, combined as forwards per token (a harmonic mean)."""
    return len(accept) / sum(1 / analytic_tpf(a, n) for a in accept)


def summarize(temp: float, pos: dict[str, list[float]]) -> dict:
    mean = {k: sum(v) / len(v) for k, v in pos.items()}
    bound = sum(c * b + 1 - c for b, c in zip(pos["best_high"], pos["coverage"])) / len(pos["best"])
    return {"temperature": temp, "positions": len(pos["best"]), "coverage": round(mean["coverage"], 4),
            "first_draft_marginal": round(mean["marginal"], 4), "first_draft_best": round(mean["best"], 4),
            "first_draft_best_high": round(mean["best_high"], 4),
            "first_draft_bound": round(bound, 4),  # best_high, counting every uncovered c as accepted: an upper bound
            "slot_alpha_marginal": round(mean["alpha"], 4),
            "alpha_stride2_marginal": round((1 + mean["alpha"]) / 2, 4),
            "marginal_quartiles": [round(x, 4) for x in torch.tensor(pos["marginal"]).quantile(
                torch.tensor([0.25, 0.5, 0.75])).tolist()],
            "tpf_iid": {k: {n: round(analytic_tpf(mean[k], n), 3) for n in (2, 3, 4)} for k in ("marginal", "best")},
            "tpf_local": {k: {n: round(local_tpf(pos[k], n), 3) for n in (2, 3, 4)} for k in ("marginal", "best")}}


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
    ap.add_argument("--out", default=None, help="append every position's values here (one JSON line per temperature)")
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
        pos: dict[str, list[float]] = {}
        for prompt, out in zip(prompts, outs):
            if len(out.token_ids) >= 2:
                for k, v in sequence_ceiling(model, prompt, out.token_ids[:-1], params, args.top, args.chunk).items():
                    pos.setdefault(k, []).extend(v)
        row = {**summarize(temp, pos), "wall_s": round(time.time() - t0, 1)}
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps({"temperature": temp, **{k: [round(x, 5) for x in v] for k, v in pos.items()}})
                        + "\n")
        summary[str(temp)] = row
        print(json.dumps(row), flush=True)
    print(json.dumps({"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens, "top": args.top,
                      "dtype": "float32", "device": args.device, "ceiling": summary}))


if __name__ == "__main__":
    main()
