"""Sampling parameters and the one definition of the sampling distribution p̃ (SPEC §2).

p̃ = filter(softmax(logits / T)), filter = top-k then top-p, renormalised; T = 0 means greedy (p̃ is
the point mass on the argmax). Every token idlm emits is drawn from p̃, and speculative verification
(the decoders issue) compares drafts against the same p̃, so this file is the single place it is
defined. Functions are batched with per-row parameters, so requests in one batch keep their own.
Tokens are drawn by inversion (`inverse_cdf`) with uniforms from each request's counter-based stream
(`RequestRNG`, `idlm.decoding.rng`): one uniform per distribution, computed on the device.
`SamplingParams.logprobs` / `prompt_logprobs` ask for the model's raw logprobs, which are not p̃: they
are computed from the unfiltered logits (`idlm.decoding.logprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from idlm.decoding import VERIFICATIONS, rng
from idlm.errors import ConfigError

# "argmax-ratio" is the reference release's rule (argmax draft tested with min(1, p̃/q̃)): biased when
# T > 0 (SPEC §10.1). It exists only so tests and benchmarks can measure that bias.
DRAFT_MODES = ("sample", "argmax", "argmax-ratio")
# temperatures below this are greedy (their limit): dividing logits by them overflows float32
GREEDY_BELOW = 1e-5
INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # the most top-k alternatives per token a request may ask for (vLLM's default limit)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # same seed, same output
    max_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer to detect)
    ignore_eos: bool = False
    # speculative verification (ISD/R-ISD, SPEC §4.3)
    draft: str = "sample"  # "sample": d ~ q̃, accept min(1, p̃/q̃); "argmax": d = argmax q, accept p̃(d)
    # "sample" drafts from q̃ at this temperature instead of `temperature` (None: the same). Exact at any value:
    # acceptance tests each draft against the q̃ it was drawn from; only how often drafts are accepted changes
    draft_temperature: float | None = None
    verify_alpha: float = 1.0  # accept min(1, p̃ / (alpha · q̃)); exact only at 1 (the official lossy knob)
    # how a step's drafts are verified (exact either way): "block" — jointly (`acceptance.block_verify`: in
    # expectation at least as many accepted, often a few % more), "token" — one by one to the first rejection
    # (standard speculative sampling). verify_alpha != 1 always verifies token by token
    verification: str = "block"
    # raw model logprobs (log_softmax of the logits before temperature/top-k/top-p, as vLLM's default), see
    # idlm.decoding.logprobs. None: none. k in 0..MAX_LOGPROBS: every emitted token's logprob plus its top-k
    # alternatives (GenerationOutput.logprobs / top_logprobs)
    logprobs: int | None = None
    # the same for every prompt token given its prefix (the first has none): GenerationOutput.prompt_logprobs
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise ConfigError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}", param=name)

        def integer(name, lo, hi, why):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(name, why)

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")

        number("temperature")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0  # tiny temperatures behave as their limit: greedy (1/T would overflow)
        integer("top_k", 0, INT64_MAX, "must be an integer >= 0 (0 = off)")
        number("top_p")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None:
            integer("seed", -(2**63), 2**64 - 1, "must be an integer in [-2^63, 2^64)")
        integer("max_tokens", 1, INT64_MAX, "must be an integer >= 1")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(t, str) and t for t in self.stop):
            bad("stop", "must be non-empty strings")
        if self.draft not in DRAFT_MODES:
            bad("draft", f"must be one of {', '.join(DRAFT_MODES)}")
        if self.draft_temperature is not None:
            number("draft_temperature")
            if not self.draft_temperature >= GREEDY_BELOW:
                bad("draft_temperature", f"must be None or >= {GREEDY_BELOW} (argmax drafts: draft='argmax')")
        if self.verification not in VERIFICATIONS:
            bad("verification", f"must be one of {', '.join(VERIFICATIONS)}")
        number("verify_alpha")
        if not self.verify_alpha > 0:
            bad("verify_alpha", "must be > 0 (1 = exact)")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                integer(name, 0, MAX_LOGPROBS, f"must be None or an integer in 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> RequestRNG:
        """A fresh random stream for one request with these parameters (a random seed without `seed`)."""
        return RequestRNG(self.seed)


TOPK_CAP = 1024  # rows that all ask top_k <= this are filtered from a top-k selection, not a full sort


def needs_truncation(params: list[SamplingParams]) -> bool:
    """Whether any row uses top-k or top-p (else `filtered_probs` can skip its sort)."""
    return any(p.top_k > 0 or p.top_p < 1 for p in params)


def truncation(params: list[SamplingParams]) -> bool | int:
    """`filtered_probs`' truncate option for a batch: False (no row truncates), K (every row asks
    0 < top_k <= K, K a power of two <= TOPK_CAP: a top-K selection replaces the sort over the
    vocabulary, top-p then works inside it) or True (a full sort)."""
    if not needs_truncation(params):
        return False
    top = max(p.top_k for p in params)
    if all(p.top_k > 0 for p in params) and top <= TOPK_CAP:
        return 1 << (top - 1).bit_length()
    return True


# rows of a vocabulary of at least CHUNKED_FROM entries are reduced in chunks of VOCAB_CHUNK (`chunk_stats`);
# VOCAB_CHUNK = 0: whole rows (torch's softmax / argmax; measurements set it to compare: bench_risd.py "vocab0")
VOCAB_CHUNK = 1024
# below 16 chunks a whole row is a short loop (8,192 entries: 1/6 of SmolLM2's 49,152, whose whole-row softmax
# took 16 µs on the H200), about what the chunks' second kernel costs to launch; not measured at these sizes
CHUNKED_FROM = 16 * 1024


def chunk_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x [..., V] float -> per VOCAB_CHUNK-entry chunk c: (max_c, argmax_c as an index into V,
    sum_c exp(x − max_c)), each [..., C]; None for rows shorter than CHUNKED_FROM. The last chunk is padded
    with −inf (never the max while the chunk has another entry; exp(−inf) adds 0).

    Why: a reduction over a long vocabulary for a few rows (a decode step at batch 1: 1–32 rows of
    49,152) runs as one program per row that loops over the whole row — 9–16 µs a kernel on an H100/H200,
    the largest kernels of a sampled step's tail (docs/risd.md, session 37). In chunks it is one program
    per (row, chunk), each a loop of one chunk, then a small reduction over the
    chunks (`chunked_argmax`, `chunked_softmax`)."""
    V = x.shape[-1]
    if not VOCAB_CHUNK or V < max(CHUNKED_FROM, 2 * VOCAB_CHUNK):
        return None
    c = -(-V // VOCAB_CHUNK)
    if c * VOCAB_CHUNK != V:
        x = torch.nn.functional.pad(x, (0, c * VOCAB_CHUNK - V), value=float("-inf"))
    xc = x.view(*x.shape[:-1], c, VOCAB_CHUNK)
    cmax, carg = xc.max(-1)  # [..., C] (the first max of a chunk)
    shift = torch.where(cmax > float("-inf"), cmax, 0.0)  # a chunk of −inf only sums to 0, not NaN
    csum = torch.exp(xc - shift[..., None]).sum(-1)
    return cmax, carg + torch.arange(c, device=x.device) * VOCAB_CHUNK, csum


def chunked_argmax(x: torch.Tensor, stats=None) -> torch.Tensor:
    """x.argmax(-1) for x [..., V] (the first maximum; no NaN), from `chunk_stats` where V is long enough:
    the first chunk holding the row's max, then that chunk's first max."""
    stats = chunk_stats(x) if stats is None else stats
    if stats is None:
        return x.argmax(-1)
    cmax, carg, _ = stats
    return carg.gather(-1, cmax.argmax(-1, keepdim=True)).squeeze(-1)


def chunked_softmax(x: torch.Tensor, stats=None) -> torch.Tensor:
    """torch.softmax(x, -1) for x [..., V] float (rows with a finite max), from `chunk_stats` where V is long
    enough: the row's max m over the chunks' maxima, its normaliser Σ_c sum_c · exp(max_c − m), then
    exp(x − m) / normaliser (equal up to float rounding: the sum is taken in another order)."""
    stats = chunk_stats(x) if stats is None else stats
    if stats is None:
        return torch.softmax(x, dim=-1)
    cmax, _, csum = stats
    m = cmax.amax(-1, keepdim=True)  # [..., 1]
    total = (csum * torch.exp(cmax - m)).sum(-1, keepdim=True)
    return torch.exp(x - m) / total


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, truncate: bool | int = True) -> torch.Tensor:
    """p̃ per row: logits [B, V], temperature/top_k/top_p [B] -> probabilities [B, V] (float32).

    Rows with temperature 0 get the point mass on their argmax (ties: lowest id). `truncate=False`
    skips top-k/top-p (a caller that knows no row uses them saves a sort over the vocabulary); an int K
    promises every row has 0 < top_k <= K (`truncation`): the K most probable tokens are selected instead
    of sorting the vocabulary, and top-k then top-p act on them exactly as on the sorted vocabulary (only
    the order among tokens of equal probability may differ). No data-dependent control flow: the
    function is CUDA-graph capturable.
    """
    logits = logits.float()
    B, V = logits.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]  # a greedy row's t is 1: its scaled logits are its logits
    stats = chunk_stats(scaled)
    probs = chunked_softmax(scaled, stats)
    if truncate is True:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    elif truncate:
        sorted_p, order = probs.topk(min(int(truncate), V), dim=-1, sorted=True)  # [B, K] descending
    if truncate:
        n = sorted_p.shape[-1]
        rank = torch.arange(n, device=logits.device).expand(B, n)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
        keep = rank < k[:, None]
        sorted_p = sorted_p * keep
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = cumsum_last(sorted_p) - sorted_p
        # (the top token always stays: a top_p that rounds to 0 in float32 means top-1, not nothing)
        keep = keep & ((mass_before < top_p[:, None].float()) | (rank == 0))
        sorted_p = sorted_p * keep
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        # a row that filters nothing keeps its softmax's bits: the batch's other rows decide `truncate`, and
        # the sort, the renormalisations and a float32 cumulative mass reaching 1 before the tail would
        # otherwise give it other probabilities in another batch than alone
        plain = ((top_k <= 0) | (top_k >= V)) & (top_p >= 1)
        probs = torch.where(plain[:, None], probs, torch.zeros_like(probs).scatter_(-1, order, sorted_p))
    onehot = torch.zeros_like(probs).scatter_(-1, chunked_argmax(scaled, stats)[:, None], 1.0)
    return torch.where(greedy[:, None], onehot, probs)


def params_tensors(params: list[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (temperature, top_k, top_p) tensors [B] for `filtered_probs` (float32, int64, float32; built
    through numpy: a few times faster than torch.tensor of Python lists, same values)."""
    n = len(params)
    temperature, top_p = (to_float32(np.fromiter((getattr(p, name) for p in params), np.float64, n))
                          for name in ("temperature", "top_p"))
    top_k = np.fromiter((p.top_k for p in params), np.int64, n)
    return tuple(torch.from_numpy(a).to(device) for a in (temperature, top_k, top_p))


def to_float32(values: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to nearest as torch.tensor(..., dtype=float32) does (beyond its range: ±inf,
    without numpy's overflow warning)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


class RequestRNG:
    """A request's random numbers (`idlm.decoding.rng`): its 64-bit seed (the Philox key) and how many
    draws it has taken (the counter). Where torch code would hold a torch.Generator per request, idlm
    holds one of these: a step's random numbers are then a pure function of (seed, draw number),
    computed on the device inside the step's graph, the same in any batch, on CPU and GPU.
    A request without a seed gets one from torch's global generator (so torch.manual_seed governs it)."""
    __slots__ = ("seed", "key", "draw")

    def __init__(self, seed: int | None = None):
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed) % 2**64
        self.key = (self.seed & 0xFFFFFFFF, self.seed >> 32)
        self.draw = 0


def take_draws(rngs: list[RequestRNG | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [B, 2], draw numbers [B]) for one step's draws of these requests, as host int64 tensors, and
    each request's counter advanced: every step of a request uses numbers no other step of it uses.
    A None (a caller that keeps no stream, e.g. for greedy rows) draws from a fresh unseeded stream."""
    rngs = [r if r is not None else RequestRNG() for r in rngs]
    n = len(rngs)
    keys = np.fromiter((k for r in rngs for k in r.key), np.int64, 2 * n).reshape(n, 2)  # numpy: ~10x faster
    draw = np.fromiter((r.draw for r in rngs), np.int64, n)                             # than torch.tensor(list)
    for r in rngs:
        r.draw += 1
    return torch.from_numpy(keys), torch.from_numpy(draw)


@torch.library.custom_op("idlm::cumsum_last", mutates_args=())
def _cumsum_op(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(-1)


@_cumsum_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1); inside a compiled function, ATen's cumsum as an opaque call. Why: for a few rows of a
    long vocabulary torch 2.11's inductor generates a split-scan Triton kernel, and fails ("list indices must
    be integers or slices, not NoneType") as soon as a per-row value — a row's temperature, its accepted
    count, a normaliser — is fused into it: the whole sampled decode step then ran eagerly at SmolLM2's and
    Qwen3's vocabularies (docs/sampling.md). Opaque, the scan's input is its own fused kernel and the scan
    ATen's. Same values as x.cumsum(-1) on the same device."""
    return _cumsum_op(x) if torch.compiler.is_compiling() else x.cumsum(-1)


# inverse_cdf's block: rows longer than two blocks are inverted in two levels (a block, then a token in it)
CDF_BLOCK = 1024
_BELOW_ONE = 1.0 - 2.0 ** -24  # the largest float32 below 1


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token per distribution by inversion: probs [..., V] (rows sum to ~1), u [...] in (0, 1) -> [...] long.
    Picks the first index whose cumulative mass exceeds u times the row's total, so token i comes with
    probability p_i and a token of probability 0 never does. One uniform per distribution; no host sync.

    A row longer than 2·CDF_BLOCK is inverted in two levels, without a scan over the whole vocabulary: the
    block masses (one reduction), the block whose cumulative mass first exceeds x = u·total, then the
    token inside that block at x's place in it (a scan over CDF_BLOCK entries). The same token as the flat
    cumulative sum in exact arithmetic (only float rounding at an interval's edge may differ). Why: a
    scan over the vocabulary per distribution was the sampled step's largest kernel at batch 64 on the H200
    (ATen's innermost-dim scan: 0.23 ms of a 3.6 ms SmolLM2 R-ISD step, for 50 MB; docs/sampling.md)."""
    p = probs.float()
    V = p.shape[-1]
    if V <= 2 * CDF_BLOCK:
        return _inverse_cdf_flat(p, u)
    lead, full = p.shape[:-1], V // CDF_BLOCK
    sums = p[..., : full * CDF_BLOCK].reshape(*lead, full, CDF_BLOCK).sum(-1)  # block masses  [..., nb]
    if V % CDF_BLOCK:
        sums = torch.cat([sums, p[..., full * CDF_BLOCK:].sum(-1, keepdim=True)], -1)
    csum = cumsum_last(sums)  # [..., nb] (a few dozen entries)
    x = u * csum[..., -1]  # [...]
    j = torch.searchsorted(csum.contiguous(), x.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    j = torch.minimum(j, _last_positive(sums))  # x rounded onto the total: the last block with mass
    base = torch.where(j > 0, csum.gather(-1, (j - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    mass = sums.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    pos = j.unsqueeze(-1) * CDF_BLOCK + torch.arange(CDF_BLOCK, device=p.device)  # the block's ids  [..., BLK]
    inner = p.gather(-1, pos.clamp(max=V - 1)) * (pos < V)  # (the last block may be short)
    c = cumsum_last(inner)  # [..., BLK]
    # x's place inside the block, as a fraction of its mass, then against the block's own cumulative sum
    frac = ((x - base) / torch.where(mass > 0, mass, 1.0)).clamp(0.0, _BELOW_ONE)
    k = torch.searchsorted(c, (frac * c[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    k = torch.minimum(k, _last_positive(inner))  # never past the block's last token with mass
    return j * CDF_BLOCK + k


def _inverse_cdf_flat(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`inverse_cdf` over one cumulative sum of the whole row (short rows)."""
    cdf = cumsum_last(p)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), x.contiguous(), right=True).squeeze(-1)
    return torch.minimum(idx, _last_positive(p))


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Index of the last positive entry along the last dim (0 for a row without one): [..., n] -> [...]."""
    ids = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x > 0, ids, 0).amax(-1)


def sample(probs: torch.Tensor, rngs: list[RequestRNG], stream: int = rng.STREAM_TOKENS) -> torch.Tensor:
    """One token per distribution: probs [B, ..., V] -> [B, ...] long, row b with request b's numbers
    (one draw of its counter)."""
    keys, draw = take_draws(rngs)
    shape = probs.shape[1:-1]
    u = rng.uniforms(keys.to(probs.device), draw.to(probs.device), stream, math.prod(shape))
    return inverse_cdf(probs, u.view(probs.shape[0], *shape))


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  rngs: list[RequestRNG]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from p̃ of logits [B, V] -> (tokens [B] long, p̃(token) [B])."""
    probs = filtered_probs(logits, *params_tensors(params, logits.device))
    tokens = sample(probs, rngs)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)
