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
from idlm.decoding.isd import guess_tokens
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
    def round(self, ctx: list[int], specs: list[int], starts: list[int], k: int,
              guesses: list[tuple[int, int]] = ()) -> tuple:
        """One ISD forward, recomputed: p̃ [len(specs) + 1, V] of the rows from ctx's last token on, q̃
        [G, k, V] of MASK groups g: k MASKs at positions starts[g].. seeing ctx + specs before starts[g], and
        their logits [G, k, V] (the drafter's own ranking, also at T = 0). With `guesses` [(start, token)]:
        also a guessed group each — the token at `start` (a clean row: its p̃ is the target's distribution of
        the token after it) then k MASKs — as (p̃ and q̃ [H, k + 1, V], logits [H, k + 1, V])."""
        model, dev = self.model, self.model.device
        seq = torch.tensor([ctx + specs], device=dev)
        prefix = RecordKV()
        h = model(seq, attn=prefix)[0]
        p = self.dist(model.compute_logits(h[len(ctx) - 1:]))

        def groups(at: list[int], first: list[int] | None, size: int):
            at_t = torch.tensor(at, device=dev)
            m = len(at)
            pos = (at_t[:, None] + torch.arange(size, device=dev)).reshape(1, -1)
            ids = torch.full((m, size), 0 if self.mask is None else self.mask, device=dev)
            on = torch.ones(m, size, dtype=torch.bool, device=dev)
            if first is not None:  # a clean guessed token first: gate off, not a MASK
                ids[:, 0] = torch.tensor(first, device=dev)
                on[:, 0] = False
            extra = {}
            if self.lora is not None:
                on = on.reshape(1, -1)
                extra = dict(lora=self.lora, lora_gate=on.float(), is_mask=on)
            hq = model(ids.reshape(1, -1), positions=pos, attn=group_attention(prefix, at_t - 1, size), **extra)[0]
            logits = model.compute_logits(hq)
            return self.dist(logits).view(m, size, -1), logits.view(m, size, -1)

        q, q_logits = groups(starts, None, k)
        if not guesses:
            return p, q, q_logits, None
        return p, q, q_logits, groups([s for s, _ in guesses], [t for _, t in guesses], k + 1)


def decode(drafter: Drafter, prompt: list[int], n: int, max_tokens: int, eos: frozenset, branches: bool | int,
           g: torch.Generator, guesses: int = 0, stats: dict | None = None, defer: bool = False,
           rows: int | None = None) -> tuple[list[int], int]:
    """ISD at stride n (K = n − 1 drafts a round) with rejection branches at the first `branches` drafts
    (True: all K; False / 0: none, today's cold starts; a rejection past them starts cold) -> (emitted
    tokens, forwards; the prefill counts as one, as it emits the first token).

    `guesses` G > 0 (with branches): each branch j also gets G guessed groups — a guessed correction (the
    drafter's top tokens at draft j other than the draft itself, known before the forward) then K MASKs. When
    the correction drawn equals a guess, its group's clean row is the target's distribution of the token after
    the correction: that token is drawn from it and emitted in the same round (one more token), and the
    group's K MASK drafts are verified next. Exact: the guess is fixed before the forward, the group chosen
    by the committed correction, the extra token drawn from p̃ itself. `defer`: the token after a matched
    correction is not emitted in the round; it becomes the next round's first draft, drawn from that clean
    row (its q̃ is the target's own p̃, so it is accepted but for rounding), and the group's first K − 1 MASK
    drafts follow it — the next round is an ordinary verify round (what an engine can build without a
    block of two pending tokens). `rows` W (with `defer`; the engine's `guess_rows`): a guessed group is its
    clean row and W − 1 MASK rows (2N − 1 + K·K + G·K·W query rows: N = 4, G = 1, W = 1: 19, not 25) — after a
    matched correction the first W drafts come from it and the others from branch j's MASK rows past its W-th
    (blind to the correction, as without a guess).
    `stats` (a dict) counts rejections and matches per draft position."""
    k = n - 1
    n_branch = k if branches is True else int(branches)
    if not 0 <= n_branch <= k:
        raise ValueError(f"branches must be within 0..{k} at stride {n}, got {branches}")
    if guesses and n_branch != k:
        raise ValueError("guessed corrections go with a branch at every draft (branches=True)")
    stats = {} if stats is None else stats

    def draw(p: torch.Tensor) -> int:
        return int(p.argmax()) if drafter.params.temperature == 0 else int(torch.multinomial(p, 1, generator=g))

    def sample_drafts(q: torch.Tensor) -> list[int]:
        return [draw(q[j]) for j in range(k)]

    def count(key: str, j: int) -> None:
        stats.setdefault(key, [0] * k)[j] += 1

    point_mass = torch.tensor([drafter.params.temperature == 0])
    with torch.no_grad():
        first = drafter.dist(drafter.model.compute_logits(drafter.model(torch.tensor([prompt]))[0, -1:]))[0]
    toks, out, forwards = list(prompt), [draw(first)], 1
    toks.append(out[0])
    specs: list[int] = []
    q_specs = rank = None
    while len(out) < max_tokens and out[-1] not in eos:
        u = len(toks) - 1  # the pending token's position
        if not specs:  # cold start: the clean token after the pending one, drafts past it
            p, q, q_logits, _ = drafter.round(toks, [], [u + 1], k)
            forwards += 1
            emitted = [draw(p[0])]
            next_q, next_rank = q[0], q_logits[0]
        else:
            starts = [u + k + 1] + [u + 1 + j for j in range(n_branch)]
            # the engine's rule (`guess_tokens`): draft j's next-best tokens other than the draft
            guessed = [(j, int(t)) for j in range(k) for t in
                       guess_tokens(rank[None, j:j + 1], torch.tensor([[specs[j]]]), guesses)[0]] if guesses else []
            p, q, q_logits, gq = drafter.round(toks, specs, starts, k, [(u + 1 + j, t) for j, t in guessed])
            forwards += 1
            uniforms = torch.rand(1, k, generator=g)
            n_acc, corr = verify_drafts(p[None, :k], torch.tensor([specs]), q_specs[None], point_mass,
                                        torch.ones(1), uniforms)
            j = int(n_acc[0])
            if j == k:
                emitted, next_q, next_rank = specs + [draw(p[k])], q[0], q_logits[0]
            else:
                c = draw(corr[0])
                emitted = specs[:j] + [c]
                next_q, next_rank = (q[1 + j], q_logits[1 + j]) if j < n_branch else (None, None)
                count("rejected", j)
                hit = [i for i, (jj, t) in enumerate(guessed) if jj == j and t == c]
                if hit:
                    count("matched", j)
                    gp, gl = gq[0][hit[0]], gq[1][hit[0]]
                    if rows is not None:  # the group's first W rows, branch j's blind drafts after them
                        next_q = torch.cat([gp[:rows], q[1 + j][rows:]])
                        next_rank = torch.cat([gl[:rows], q_logits[1 + j][rows:]])
                    elif defer:  # the clean row's p̃ is the next round's first draft's q̃
                        next_q, next_rank = gp[:k], gl[:k]
                    else:
                        emitted.append(draw(gp[0]))  # the token after the correction, from p̃ itself
                        next_q, next_rank = gp[1:], gl[1:]
        for t in emitted:
            toks.append(t)
            out.append(t)
            if t in eos or len(out) >= max_tokens:
                break
        q_specs, rank = next_q, next_rank
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
    ap.add_argument("--guesses", default="", help="also rejection branches with this many guessed corrections "
                    "per draft (comma-separated counts; see `decode`)")
    ap.add_argument("--cases", default="", help="run only these cases (comma-separated names: cold, branches, "
                    "branches_B, guesses_G, deferred_G, lite_G)")
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
        cases = [("cold", False, 0)] + [(f"branches_{b}", int(b), 0) for b in args.partial.split(",") if b] + \
            [("branches", True, 0)] + [(f"guesses_{m}", True, int(m)) for m in args.guesses.split(",") if m] + \
            [(f"deferred_{m}", True, int(m)) for m in args.guesses.split(",") if m] + \
            [(f"lite_{m}", True, int(m)) for m in args.guesses.split(",") if m]
        cases = [c for c in cases if not args.cases or c[0] in args.cases.split(",")]
        for name, branches, guesses in cases:
            g = torch.Generator().manual_seed(args.seed)
            tokens = forwards = 0
            stats: dict = {}
            for pr in prompts:
                out, f = decode(drafter, pr, args.stride, args.max_tokens, tok.eos_token_ids, branches, g,
                                guesses, stats, name.startswith(("deferred", "lite")),
                                1 if name.startswith("lite") else None)
                tokens, forwards = tokens + len(out), forwards + f
            row[name] = {"tpf": round(tokens / forwards, 4), "tokens": tokens, "forwards": forwards} | stats
        if "branches" in row and "cold" in row:
            row["gain"] = round(row["branches"]["tpf"] / row["cold"]["tpf"], 4)
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        summary[f"T{temp}"] = {name: row[name]["tpf"] for name, *_ in cases} | {"gain": row.get("gain")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
