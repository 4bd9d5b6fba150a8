"""Raw logprobs of emitted and prompt tokens, with top-k alternatives (vLLM's `raw_logprobs` semantics).

A token's logprob is log_softmax(logits.float()) at the position that predicts it, before temperature,
top-k and top-p: the model's own distribution, not p̃ (`GenerationOutput.token_probs` keeps q(x), the
distribution the token was actually drawn from). Requests ask with `SamplingParams.logprobs` /
`prompt_logprobs` = k (None: nothing is computed).

Fused decoders compute them inside `compute` (device, CUDA-graph capturable) only when the static
option `logprobs` is set: `logprobs_static(params)`, the batch's largest k rounded up to a bucket of
`LOGPROB_BUCKETS` (so a few CUDA graphs serve every k; None when no row asks, so default steps pay
nothing). `logprob_columns` appends, per scored position m = 0..M−1, the chosen token's logprob and the
top-k (id, logprob) pairs to the packed float32 result (ids are exact in float32 below 2^24);
`finish` reads them back with `unpack_logprobs`, trimming each row to its own k (SDAR, not fused, packs
and unpacks the same way). The first token and prompt logprobs use `score`.
"""

from __future__ import annotations

import torch

from idlm.decoding.sampling import MAX_LOGPROBS, SamplingParams

# the static top-k width of a batch: its largest k rounded up to one of these (a few CUDA graphs, not 21)
LOGPROB_BUCKETS = (0, 5, MAX_LOGPROBS)

Top = list[tuple[int, float]]


def logprobs_static(params: list[SamplingParams]) -> int | None:
    """The static `logprobs` option of a step: None if no row wants logprobs, else the top-k width."""
    ks = [p.logprobs for p in params if p.logprobs is not None]
    if not ks:
        return None
    return next(b for b in LOGPROB_BUCKETS if b >= max(ks))


def logprob_columns(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """logits [B, M, V], tokens [B, M] (the token each position predicts) -> [B, M·(1+2k)] float32:
    M chosen logprobs, then M·k top ids, then M·k top logprobs (each position's sorted descending).
    No host sync, no data-dependent control flow (capturable)."""
    k = min(k, logits.shape[-1])
    lsm = torch.log_softmax(logits.float(), dim=-1)
    chosen = lsm.gather(-1, tokens[..., None]).squeeze(-1)  # [B, M]
    if k == 0:
        return chosen
    vals, ids = lsm.topk(k, dim=-1)  # [B, M, k], sorted descending
    return torch.cat([chosen, ids.flatten(1).float(), vals.flatten(1)], dim=-1)


def unpack_logprobs(row: list[float], offset: int, m: int, n: int, k_row: int) -> tuple[list[float], list[Top]]:
    """The logprobs of the first n of m positions packed by `logprob_columns` at row[offset:], each
    position's top list trimmed to k_row. The packed width k is read from the row length."""
    k = (len(row) - offset - m) // (2 * m)
    lps = row[offset: offset + n]
    ids, vals = offset + m, offset + m + m * k
    tops = [[(int(row[ids + i * k + j]), row[vals + i * k + j]) for j in range(min(k_row, k))] for i in range(n)]
    return lps, tops


def score(logits: torch.Tensor, targets: torch.Tensor | list[int], k: int) -> tuple[list[float], list[Top]]:
    """Eager: logits [M, V] and the M tokens they predict -> (logprobs, top-k lists), on the host."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    if logits.shape[0] == 0:
        return [], []
    packed = logprob_columns(logits[None], targets[None], k)[0].tolist()
    return unpack_logprobs(packed, 0, logits.shape[0], logits.shape[0], k)


def first_token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                         ) -> list[tuple[list[float], list[Top]] | tuple[None, None]]:
    """Per row of logits [B, V] (the prefill's last position) and its drawn token: ([lp], [top]) for rows
    that asked for logprobs, (None, None) for the others (nothing is computed for them)."""
    out: list = [(None, None)] * len(tokens)
    want = [b for b, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return out
    k = max(params[b].logprobs for b in want)
    lps, tops = score(logits[torch.tensor(want, device=logits.device)], [tokens[b] for b in want], k)
    for i, b in enumerate(want):
        out[b] = ([lps[i]], [tops[i][: params[b].logprobs]])
    return out
