"""What rejection branches would give ISD and R-ISD: an exact sampler that decodes with and without them.

ISD (SPEC §4) verifies K = N − 1 drafts left to right; on the first rejection, at draft j, it emits the
correction and the forward's new drafts are void (they were made after the rejected draft), so the next
forward is a cold start that commits one token. With a *rejection branch* per draft the same forward also
drafts for every possible rejection point: branch j is N − 1 MASK slots placed after the accepted prefix
(pending, s_0..s_{j−1}) at the correction's position onward, seeing that prefix and each other causally.
After a rejection at j the next forward verifies branch j's drafts instead of starting cold; after all K
are accepted it verifies the main drafts as now. Every round is then a verify round.

Exactness is the usual speculative-sampling argument: branch j's drafts are drawn from q̃ made before the
correction is drawn and independently of it, so accepting d with min(1, p̃(d) / q̃(d)) and drawing a
rejected position's token from norm(max(0, p̃ − q̃)) still emits exactly p̃'s samples (greedy: exactly AR's
tokens; `verify_drafts` is the same acceptance the decoders use). A branch's first MASK sits where the
correction goes, unseen, exactly as a cold start's first MASK sits where its clean token goes — the
layout the drafter is trained on (a clean prefix, then MASKs).

The cost is query rows: 2N − 1 + K·(N − 1) a step (N = 4: 16 instead of 7) and a tree-shaped attention
mask. This script measures the TPF side only, on the CPU: it decodes by recomputing the prefix every
round (a plain causal forward that records K/V, then every MASK group over those keys: `group_attention`),
with the same seeded generator for both layouts. One JSON line per temperature, a summary last.

    IDLM_CACHE=/tmp/smol/cache python scripts/branch_drafts.py --model smollm2-135m-instruct \
        --adapter smollm2-135m-instruct-risd-lora --prompts /tmp/smol/distill/prompts.jsonl \
        --n-prompts 24 --max-tokens 128 --temperatures 0,0.7
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from idlm.decoding.acceptance import verify_drafts
from idlm.decoding.sampling import SamplingParams, filtered_probs, params_tensors
from idlm.training.objectives import RecordKV, group_attention


class Drafter:
    """The clean rows' p̃ and MASK groups' q̃ of one model (an I-DLM with its MASK token, or an AR model with
    an R-ISD adapter: MASK embedding and gate on the MASK rows), at one temperature."""

    def __init__(self, model, mask_token_id: int | None, lora=None, temperature: float = 0.0):
        if lora is None and mask_token_id is None:
            raise ValueError("a drafter needs the model's MASK token or an R-ISD adapter")
        self.model, self.mask, self.lora = model, mask_token_id, lora
        self.params = SamplingParams(temperature=temperature)

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] logits -> [n, V] p̃ at the temperature (T = 0: the argmax's point mass)."""
        if self.params.temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filtered_probs(logits, *params_tensors([self.params] * logits.shape[0], logits.device))

    @torch.no_grad()
    def round(self, ctx: list[int], specs: list[int], starts: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One ISD forward, recomputed: p̃ [len(specs) + 1, V] of the rows from ctx's last token on, and q̃
        [G, k, V] of MASK groups g: k MASKs at positions starts[g].. seeing ctx + specs before starts[g]."""
        model, dev = self.model, self.model.device
        seq = torch.tensor([ctx + specs], device=dev)
        prefix = RecordKV()
        h = model(seq, attn=prefix)[0]
        p = self.dist(model.compute_logits(h[len(ctx) - 1:]))
        at = torch.tensor(starts, device=dev)
        m = len(starts)
        pos = (at[:, None] + torch.arange(k, device=dev)).reshape(1, -1)
        ids = torch.full((1, m * k), 0 if self.mask is None else self.mask, device=dev)
        extra = {}
        if self.lora is not None:
            on = torch.ones(1, m * k, dtype=torch.bool, device=dev)
            extra = dict(lora=self.lora, lora_gate=on.float(), is_mask=on)
        hq = model(ids, positions=pos, attn=group_attention(prefix, at - 1, k), **extra)[0]
        return p, self.dist(model.compute_logits(hq)).view(m, k, -1)


def decode(drafter: Drafter, prompt: list[int], n: int, max_tokens: int, eos: frozenset, branches: bool | int,
           g: torch.Generator) -> tuple[list[int], int]:
    """ISD at stride n (K = n − 1 drafts a round) with rejection branches at the first `branches` drafts
    (True: all K; False / 0: none, today's cold starts; a rejection past them starts cold) -> (emitted
    tokens, forwards; the prefill counts as one, as it emits the first token)."""
    k = n - 1
    n_branch = k if branches is True else int(branches)
    if not 0 <= n_branch <= k:
        raise ValueError(f"branches must be within 0..{k} at stride {n}, got {branches}")

    def draw(p: torch.Tensor) -> int:
        return int(p.argmax()) if drafter.params.temperature == 0 else int(torch.multinomial(p, 1, generator=g))

    def sample_drafts(q: torch.Tensor) -> list[int]:
        return [draw(q[j]) for j in range(k)]

    point_mass = torch.tensor([drafter.params.temperature == 0])
    with torch.no_grad():
        first = drafter.dist(drafter.model.compute_logits(drafter.model(torch.tensor([prompt]))[0, -1:]))[0]
    toks, out, forwards = list(prompt), [draw(first)], 1
    toks.append(out[0])
    specs: list[int] = []
    q_specs = None
    while len(out) < max_tokens and out[-1] not in eos:
        u = len(toks) - 1  # the pending token's position
        if not specs:  # cold start: the clean token after the pending one, drafts past it
            p, q = drafter.round(toks, [], [u + 1], k)
            forwards += 1
            emitted = [draw(p[0])]
            next_q = q[0]
        else:
            starts = [u + k + 1] + [u + 1 + j for j in range(n_branch)]
            p, q = drafter.round(toks, specs, starts, k)
            forwards += 1
            uniforms = torch.rand(1, k, generator=g)
            n_acc, corr = verify_drafts(p[None, :k], torch.tensor([specs]), q_specs[None], point_mass,
                                        torch.ones(1), uniforms)
            j = int(n_acc[0])
            if j == k:
                emitted, next_q = specs + [draw(p[k])], q[0]
            else:
                emitted = specs[:j] + [draw(corr[0])]
                next_q = q[1 + j] if j < n_branch else None
        for t in emitted:
            toks.append(t)
            out.append(t)
            if t in eos or len(out) >= max_tokens:
                break
        q_specs = next_q
        specs = [] if next_q is None else sample_drafts(next_q)
    return out, forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="idlm-tiny")
    ap.add_argument("--adapter", default=None, help="an R-ISD adapter (registry name or folder): R-ISD drafts")
    ap.add_argument("--prompts", default=None, help="chat prompts JSONL (default: the benchmark's prompts)")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--first", type=int, default=0, help="skip this many prompts of the file")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partial", default="", help="also these numbers of branches (comma-separated, 1..K−1): "
                    "branches at the first drafts only, fewer query rows (2N − 1 + b·(N − 1))")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.stride < 2:
        raise SystemExit(f"--stride must be at least 2 (got {args.stride}): stride 1 drafts nothing")
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained, resolve_model_path

    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model, dtype="float32", device="cpu")
    lora = None
    if args.adapter:
        lora = LoRAAdapter.load(resolve_model_path(args.adapter), model.config, device="cpu", dtype=model.dtype)
    if args.prompts:
        from idlm.data.chat_prompts import read_prompts

        msgs = [p["messages"] for p in read_prompts(args.prompts)][args.first: args.first + args.n_prompts]
        prompts = [tok.encode_chat(m) for m in msgs]
    else:
        from idlm.bench.offline import bench_prompts

        prompts = bench_prompts(tok, args.first + args.n_prompts)[args.first:]
    summary: dict = {"summary": True, "model": args.model, "adapter": args.adapter, "stride": args.stride,
                     "prompts": len(prompts), "max_tokens": args.max_tokens}
    for temp in (float(t) for t in args.temperatures.split(",")):
        drafter = Drafter(model, getattr(tok, "mask_token_id", None) if lora is None else None, lora, temp)
        row: dict = {"temperature": temp}
        t0 = time.time()
        cases = [("cold", False)] + [(f"branches_{b}", int(b)) for b in args.partial.split(",") if b] + \
            [("branches", True)]
        for name, branches in cases:
            g = torch.Generator().manual_seed(args.seed)
            tokens = forwards = 0
            for pr in prompts:
                out, f = decode(drafter, pr, args.stride, args.max_tokens, tok.eos_token_ids, branches, g)
                tokens, forwards = tokens + len(out), forwards + f
            row[name] = {"tpf": round(tokens / forwards, 4), "tokens": tokens, "forwards": forwards}
        row["gain"] = round(row["branches"]["tpf"] / row["cold"]["tpf"], 4)
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        summary[f"T{temp}"] = {name: row[name]["tpf"] for name, _ in cases} | {"gain": row["gain"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
