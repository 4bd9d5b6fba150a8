"""The adaptive stride (`--stride auto`): which N each decode step uses, from what has been committed so far.

Why: a fixed stride cannot win everywhere (SPEC §9, issue 13). A larger N drafts more tokens per step,
but the step costs more (2N−1 query tokens per request, which matters once the batch is large), and a
row whose far drafts are rarely accepted loses more than it gains: ISD cold-starts after every rejection,
and a cold step commits one token. So each step the engine picks the N ∈ {1, 2, …, 8} (1 = a plain AR
step) that maximises committed tokens per second, from
  (a) each request's acceptance so far, per draft position (`DecodeStats`, Beta-smoothed towards the
      engine-wide estimate, so a new request starts from what the others show), and
  (b) a step-cost model cost(batch, query tokens) of the device (`StepCostModel`).

Exactness: the choice reads only statistics of already-committed steps, never the current draws, and a
stride change is itself exact (drafts of another length are dropped and the row restarts cold, drawing
from p̃ as always), so the output distribution is the same as with any fixed N.

The math, as small pure functions:
- `isd_tpf(a)`: expected tokens per forward of ISD with stride N = len(a) + 1 and conditional
  acceptance a_j of draft j given drafts 1..j−1 were accepted. ISD alternates cold steps (commit 1,
  draft N−1) and verify steps (commit 1 + the accepted prefix; after a rejection the next step is
  cold). A renewal argument gives TPF = (1 − P + E) / (2 − P), P = Π a_j (all accepted: verify again),
  E = 1 + Σ_j Π_{i ≤ j} a_i (tokens of a verify step). With a_j = p this is SPEC §7's
  (2 + p + … + p^(N−2)) / (2 − p^(N−1)).
  With rejection branches (`EngineConfig.branches`) no step is cold after the first: TPF = E, and a step
  of stride N carries N² query tokens (`query_len_of`).
- `acceptance_estimate`: per-position conditional acceptance from counts, smoothed by a prior.
- `choose_stride`: argmax over N of Σ_rows TPF_row(N) / step seconds(N), the step time measured at this
  batch bucket where the stride has run (`StepTimer`), else cost(batch, batch·(2N−1)) — with a hysteresis
  (a change must gain a few percent: every change drops the rows' drafts), the modelled cost corrected
  per stride by the median measured/modelled ratio of the engine's own recent steps (`CostTracker`;
  steps that captured a CUDA graph or compiled a kernel are not counted).
- `row_strides` (per_row): within a step of stride N each row runs its own n <= N, the one its acceptance
  commits most tokens with; the block is padded to the step's 2N−1 slots (so the step's cost is N's), and
  a step is never longer than its longest row's stride.
- `choose_layout`: with rejection branches, each layout's choice (`choose_stride` with and without them) and
  the better one: branches pay at small batches and lose at large ones, where query tokens cost.
- `stride_to_probe`: while only ISD strides (or only plain AR steps) have run, a stride of the other kind
  whose expected rate comes close to the chosen one's is run for one interval, so its cost is measured
  rather than borrowed from a step of another kind.
- `stride_to_refresh`: now and then the runner-up stride is run for one interval when its measurement at
  this batch bucket has expired, so a measurement taken at a slow moment does not exclude it for good.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np

MAX_STRIDE = 8
STRIDES = tuple(range(1, MAX_STRIDE + 1))


def isd_tpf(accept: Sequence[float], branches: bool = False) -> float:
    """Expected committed tokens per forward of ISD with stride len(accept) + 1 (see the module
    docstring); accept[j] = P(draft j+1 accepted | drafts before it accepted). [] -> 1 (plain AR).
    branches: with rejection branches (every step verifies). One row of `isd_tpf_rows`."""
    return float(isd_tpf_rows(np.asarray(accept, dtype=np.float64).reshape(1, -1), branches)[0])


def isd_tpf_rows(accept, branches: bool = False) -> "np.ndarray":
    """`isd_tpf` of many rows at once: accept [B, N−1] conditional acceptances -> [B] expected tokens per
    forward at stride N (N = 1: a [B, 0] array, every row 1). The engine's path at large batches."""
    a = np.asarray(accept, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"isd_tpf_rows needs a [rows, positions] array, got shape {a.shape}")
    if a.size and not ((a >= 0.0) & (a <= 1.0)).all():
        raise ValueError("acceptance probabilities must be in [0, 1]")
    if a.shape[1] == 0:
        return np.ones(a.shape[0])
    run = np.cumprod(a, axis=1)  # P(drafts 1..j accepted)
    p_all, verify_tokens = run[:, -1], 1.0 + run.sum(axis=1)
    if branches:  # no cold steps: every step is a verify step
        return verify_tokens
    return (1.0 - p_all + verify_tokens) / (2.0 - p_all)


def sampling_class(params) -> tuple:
    """The key under which the adaptive stride pools the acceptance of requests sampled alike (the prior of a
    request with no history yet): draft acceptance depends on how tokens are drawn — greedy drafts of the
    same model may be accepted 80% of the time and T = 1 ones 50% (idlm-tiny on the H200, docs/stride.md) —
    so a T = 1 request must not start from what greedy ones showed. Temperature to 0.1 (at most 2), top-p to
    0.05, top-k as given (0 = off) up to 1000, the draft rule and the draft temperature (to 0.1, at most 2;
    None: the temperature): a bounded set of keys."""
    def key(temperature: float) -> float:
        return min(2.0, round(temperature, 1))

    t = 0.0 if params.temperature <= 0 else key(params.temperature)
    td = t if params.draft_temperature is None or t == 0 else key(params.draft_temperature)
    return t, min(int(params.top_k), 1000), round(float(params.top_p) * 20) / 20, params.draft, td


def acceptance_rows(accepted, verified, prior, strength: float = 8.0) -> "np.ndarray":
    """`acceptance_estimate` of many rows at once: accepted / verified [B, k] counts, prior [k] (every row's)
    or [B, k] (each row its own) -> [B, k] smoothed conditional acceptance."""
    acc, ver = np.asarray(accepted, dtype=np.float64), np.asarray(verified, dtype=np.float64)
    p = np.asarray(prior, dtype=np.float64)
    return (acc + strength * p) / (ver + strength)


def position_counts(stats: Sequence, k: int) -> tuple["np.ndarray", "np.ndarray"]:
    """(accepted, verified) [len(stats), k] int arrays of per-position draft counts from `DecodeStats`-like
    objects (`accepted_per_position` / `verified_per_position` lists of any length: cut or padded to k)."""
    acc, ver = np.zeros((len(stats), k), dtype=np.int64), np.zeros((len(stats), k), dtype=np.int64)
    for i, st in enumerate(stats):
        a, v = st.accepted_per_position[:k], st.verified_per_position[:k]
        acc[i, :len(a)], ver[i, :len(v)] = a, v
    return acc, ver


def acceptance_estimate(accepted: Sequence[int], verified: Sequence[int], prior: Sequence[float],
                        strength: float = 8.0) -> list[float]:
    """Per-position conditional acceptance: (accepted_j + s·prior_j) / (verified_j + s) for j < len(prior);
    positions with no counts take the prior. accepted/verified: a request's `DecodeStats` per-position
    counts (verified_j = drafts at position j that were checked, accepted_j = those accepted). One row of
    `acceptance_rows`."""
    k = len(prior)
    pad = lambda c: list(c[:k]) + [0] * (k - len(c[:k]))  # noqa: E731
    return acceptance_rows([pad(accepted)], [pad(verified)], prior, strength)[0].tolist()


def default_prior(accepted: Sequence[int], verified: Sequence[int], length: int = MAX_STRIDE - 1,
                  fallback: float = 0.5) -> list[float]:
    """The engine-wide prior per position: pooled rates where there are counts; further positions
    repeat the last measured conditional rate (acceptance does not rise with distance); `fallback`
    before anything was measured."""
    out, last = [], fallback
    for j in range(length):
        v = verified[j] if j < len(verified) else 0
        if v > 0:
            last = accepted[j] / v
        out.append(last)
    return out


@dataclass
class StepCostModel:
    """Seconds of one decode step as a function of (batch size B, query tokens per request Q):
    cost = base + per_row·B + per_token·B·Q (weights read once per step; per-row work; per-token FLOPs
    and KV writes). Fitted from measurements (`fit`), e.g. a start-up calibration on the device, or given."""
    base: float = 1e-3
    per_row: float = 0.0
    per_token: float = 1e-5

    def __post_init__(self):
        for name in ("base", "per_row", "per_token"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"StepCostModel.{name} must be a finite number >= 0, got {v!r}")
        if self.base + self.per_row + self.per_token <= 0:
            raise ValueError("StepCostModel: every coefficient is 0")

    def cost(self, batch: int, query_len: int) -> float:
        return self.base + self.per_row * batch + self.per_token * batch * query_len

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> StepCostModel:
        """Least squares (non-negative by clipping) over (batch, query_len, seconds) samples. A term the
        samples cannot tell apart from the others is 0: per_row when every sample has the same batch (an
        engine of max_num_seqs 1 calibrates batch 1 only), per_token too when they share one batch x
        query_len as well."""
        import numpy as np

        if not samples:
            raise ValueError("StepCostModel.fit needs at least one (batch, query_len, seconds) sample")
        x = np.array([[1.0, b, b * q] for b, q, _ in samples])
        y = np.array([t for _, _, t in samples])
        cols = [0] + [c for c in (1, 2) if len(set(x[:, c])) > 1]  # the terms the samples determine
        coef = np.zeros(3)
        coef[cols], *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        coef = np.clip(coef, 0.0, None)
        if coef.sum() <= 0:
            coef[0] = float(y.mean())
        return cls(*map(float, coef))


def query_len_of(stride: int, branches: bool = False) -> int:
    """Query tokens per request of an ISD step with this stride (1: a plain AR step): 2N − 1, or N² with
    rejection branches."""
    return 1 if stride == 1 else stride * stride if branches else 2 * stride - 1


@dataclass
class StrideChoice:
    stride: int  # the step's stride: its query blocks are 2N−1 tokens (N = 1: a plain AR step)
    rate: float  # expected committed tokens per second of the batch at that stride
    rates: dict[int, float] = field(default_factory=dict)
    rows: list[int] | None = None  # per_row: each row's own stride (<= stride) at choice time
    branches: bool = False  # the step's layout: with rejection branches (N² query tokens a row; N >= 2 only)


def tpf_table(accepts, strides: Sequence[int], branches: bool = False) -> "np.ndarray":
    """`isd_tpf_rows` of every row at every stride in `strides` at once: accepts [B, >= max(strides) − 1]
    -> [B, len(strides)] (one cumulative product and sum serve all strides: the adaptive stride's choice
    runs every few steps on the host, between device steps of well under a millisecond). branches: with
    rejection branches."""
    a = np.asarray(accepts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"tpf_table needs a [rows, positions] array, got shape {a.shape}")
    if a.size and not ((a >= 0.0) & (a <= 1.0)).all():
        raise ValueError("acceptance probabilities must be in [0, 1]")
    n = np.asarray(strides, dtype=np.int64)
    if a.shape[1] == 0:
        return np.ones((a.shape[0], len(n)))
    run = np.cumprod(a, axis=1)  # P(drafts 1..j accepted)
    verify_tokens = 1.0 + np.cumsum(run, axis=1)
    col = np.clip(n - 2, 0, None)
    p_all = run[:, col]
    tpf = verify_tokens[:, col].copy() if branches else (1.0 - p_all + verify_tokens[:, col]) / (2.0 - p_all)
    tpf[:, n == 1] = 1.0  # a plain AR step
    return tpf


def _best_within(table: "np.ndarray", upto: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Per row, the first column of the maximum among columns 0..upto -> ([B] column, [B] value)."""
    best = table[:, : upto + 1].argmax(axis=1)  # the first maximum: the smaller stride on ties
    return best, table[np.arange(len(table)), best]


def row_strides(accepts, strides: Sequence[int], limit: int, branches: bool = False
                ) -> tuple["np.ndarray", "np.ndarray"]:
    """Each row's best stride among `strides` that are <= limit, by expected tokens per forward
    (`isd_tpf`; ties: the smaller stride), and that TPF: accepts [B, >= limit − 1] -> ([B] int, [B] float).
    In a step of stride `limit` every row pays for 2·limit − 1 query slots whatever its own N (the batch is
    rectangular), so each row simply takes the N it commits most tokens with — not always the largest:
    a row whose far drafts are rarely accepted cold-starts after most steps (TPF is not monotone in N)."""
    cands = sorted(n for n in strides if n <= limit) or [limit]
    best, tpf = _best_within(tpf_table(accepts, cands, branches), len(cands) - 1)
    return np.asarray(cands)[best], tpf


def choose_stride(row_accepts: Sequence[Sequence[float]], cost: StepCostModel, strides: Sequence[int] = STRIDES,
                  current: int | None = None, hysteresis: float = 0.03,
                  cost_scale: dict[int, float] | None = None,
                  measured: dict[int, float] | None = None, per_row: bool = False,
                  ar_margin: float = 0.1, branches: bool = False) -> StrideChoice:
    """The batch's stride: argmax_N of Σ_rows isd_tpf(a_row[:N−1]) / seconds_N, expected committed tokens
    per second of the batch. seconds_N: the `measured` step time of stride N at this batch size
    (`StepTimer`) where it has run, else the model's cost(B, Q(N)) · scale_N (cost_scale: measured /
    modelled step time per stride, what the forward-only model misses — sampling, host work; 1 where
    unknown). row_accepts: each row's conditional acceptance per position (at least max(strides) − 1 long;
    positions never measured carry an optimistic prior, so a long stride may be rated best, run, and then
    judged by what its drafts and steps really did). The current stride is kept unless another one is more
    than `hysteresis` faster (a change drops every row's drafts). An ISD stride (N ≥ 2) is taken over the
    plain AR step (N = 1, when a candidate) only if rated more than `ar_margin` faster, whatever runs now:
    its rate rests on estimated acceptances while the AR step's does not, and the argmax over noisy
    estimates favours the ones that are too high (on the H200 at T = 1, C = 8, where ISD and AR steps
    were rated within 6% of each other, the policy's ISD steps realised 4% less than the AR engine's).
    per_row: rows of one step may run different N (`row_strides`): a step of stride N commits
    Σ_rows max_{n <= N} TPF_row(n) and costs a step of the longest stride its rows take (a longer step would
    only pad every block: on the H200 a step of N = 8 whose rows all took 4 cost 12% more than an N = 4
    step, and N = 4 was never run so never measured), so the choice is that stride (a tie keeps the
    smaller N). branches: the ISD steps carry rejection branches (`isd_tpf`, `query_len_of`)."""
    if len(row_accepts) == 0:
        raise ValueError("choose_stride needs at least one row")
    if not strides or any(s < 1 or s > MAX_STRIDE for s in strides):
        raise ValueError(f"strides must be within 1..{MAX_STRIDE}, got {list(strides)}")
    B = len(row_accepts)
    accepts = np.asarray(row_accepts, dtype=np.float64)  # [B, positions]
    if accepts.ndim != 2 or accepts.shape[1] < max(strides) - 1:
        raise ValueError(f"row_accepts must be [rows, >= {max(strides) - 1} positions], got {accepts.shape}")
    rates, runs_as = {}, {}
    cands = sorted(set(strides))
    table = tpf_table(accepts, cands, branches)  # [B, strides]
    for i, n in enumerate(cands):
        if per_row:  # the step runs as long as its longest row needs: N's rate is that stride's
            own, tpf = _best_within(table, i)
            tokens, runs = float(tpf.sum()), cands[int(own.max())]
        else:
            tokens, runs = float(table[:, i].sum()), n
        seconds = ((measured or {}).get(runs)
                   or cost.cost(B, query_len_of(runs, branches)) * (cost_scale or {}).get(runs, 1.0))
        rates[n], runs_as[n] = tokens / seconds, runs
    best = max(rates, key=lambda n: (rates[n], -n))  # ties: the smaller stride
    current = runs_as.get(current, current)
    if current in rates and rates[best] <= rates[current] * (1.0 + hysteresis):
        best = current
    if best != 1 and 1 in rates and rates[best] <= rates[1] * (1.0 + ar_margin):
        best = 1  # ISD must clearly beat the AR step it would replace
    rows = [cands[j] for j in _best_within(table, cands.index(best))[0]] if per_row else None
    return StrideChoice(best, rates[best], rates, rows, branches=branches and best > 1)


def choose_layout(choices: Sequence[StrideChoice], current: StrideChoice | None = None,
                  hysteresis: float = 0.03) -> StrideChoice:
    """The better of each layout's `choose_stride` (an engine with rejection branches weighs its steps with and
    without them: a branch step of stride N commits more a step but carries N² query tokens a row instead of
    2N − 1, which pays where query tokens are cheap — small batches — and loses where they are not: on the
    H200 at T = 0.7, C = 64 a fixed N = 2 without branches ran 1.09x AR while the branch-only policy ran 0.97x).
    The highest rate; the current layout is kept unless the other is more than `hysteresis` faster (a change
    runs a synchronous step); ties: a plain AR step, then the smaller stride, then no branches. A choice of
    N = 1 is a plain AR step whatever its layout."""
    if not choices:
        raise ValueError("choose_layout needs at least one choice")
    best = max(choices, key=lambda c: (c.rate, c.stride == 1, -c.stride, not c.branches))
    if current is not None:
        kept = [c for c in choices if c.branches == current.branches]
        if kept and kept[0] is not best and best.rate <= kept[0].rate * (1.0 + hysteresis):
            best = kept[0]
    if best.branches and best.stride == 1:
        best = StrideChoice(1, best.rate, best.rates, best.rows, branches=False)
    return best


def stride_to_probe(choice: StrideChoice, measured: Collection[int], within: float = 0.5) -> int | None:
    """A stride to run for one interval instead of `choice`, so that its real cost gets measured: one of a
    kind (a plain AR step, N = 1, or an ISD step, N ≥ 2) no stride of which has run yet, whose expected
    rate — costed with a scale borrowed from the other kind — is at least `within` of the chosen stride's.
    Borrowing across kinds can be far off (a sampled ISD step's decoder work and host time say little about
    a plain AR step's), and a stride never run is never measured, so without probing the policy could keep
    ISD steps slower than AR for good; within a kind the nearest measured stride's scale is a fair guess.
    None before any stride has run and once both kinds have (the best-rated candidate first). `within` 0.5:
    with a borrowed scale a plain AR step is rated 1 / TPF of an ISD stride as costly, so where ISD commits
    fewer than two tokens a step (T = 1: 1.46 at N = 4 on idlm-tiny) its AR step is rated at 0.5-0.7 of
    the ISD stride — where, measured, it is faster (the H200: 0.51 vs 1.0 ms a step; with 0.75 the
    policy never ran it and lost 0.74x to AR at T = 1, C = 1)."""
    if not measured:
        return None
    kinds = {n == 1 for n in measured}
    near = [n for n, r in choice.rates.items()
            if (n == 1) not in kinds and n != choice.stride and r >= within * choice.rate]
    return max(near, key=lambda n: (choice.rates[n], -n)) if near else None


def stride_to_refresh(choice: StrideChoice, expired: Collection[int], within: float = 0.6) -> int | None:
    """The best-rated stride other than `choice` whose step time at this batch bucket was measured but has
    expired (`StepTimer.expired`), if its expected rate is at least `within` of the chosen stride's; else
    None. The engine runs it for one interval now and then (`EngineConfig.auto_refresh`), so that one
    measurement taken at a slow moment cannot exclude a stride for good: a stride that is not chosen is
    never re-measured, and its rate then rests on that old reading (the cost model's scale), while host
    timing drifts by ±30% (seen on the H200: at T = 1, C = 1 the policy kept ISD steps against a 0.87 ms
    reading of its own plain AR step while AR's engine ran its step at 0.66 ms in the same cell; at T = 0,
    C = 1 it ran N = 2–3 where N = 4 was best). A stride never run at this bucket is rated by the model and
    its nearest stride's scale instead, and tried when that rates it best."""
    others = {n: r for n, r in choice.rates.items() if n != choice.stride and n in expired}
    if not others:
        return None
    n = max(others, key=lambda m: (others[m], -m))
    return n if others[n] >= within * choice.rate else None


class CostTracker:
    """Per stride, the median of the last `window` ratios measured step time / modelled step time: corrects
    the forward-only cost model for what it does not see (the decoder's sampling and acceptance work, host
    bookkeeping) from the engine's own steps. A median, not a mean: one slow step (a garbage collection, a
    kernel compiled on first use) must not rate a stride thousands of times too slow, because a stride rated
    too slow is never chosen again and so never re-measured (seen on the H200: a 4000x outlier kept the
    policy on N = 8 where N = 4 was best). A stride not yet run takes the ratio of the nearest stride that
    has run (1 before any step), so only measured differences between strides move the choice.

    The ratio also depends on the batch (on the H200, idlm-tiny at T = 1: a sampled N = 7 step measured
    1.3x the model at batch 8 and 3.5x at batch 64, where the decoder's work over [B, K, V] grows and the
    forward-only model does not see it), so `scales(strides, batch)` takes each stride's ratios from the
    batch-size class (powers of two) nearest to `batch` where it has run; `scale` keeps the all-batch
    median per stride, for reports."""

    def __init__(self, model: StepCostModel, window: int = 16, branches: bool = False):
        if window < 1:
            raise ValueError(f"CostTracker window must be >= 1, got {window}")
        self.model, self.window, self.branches = model, window, branches  # branches: steps of N² query tokens
        self._ratios: dict[int, list[float]] = {}
        self._by_class: dict[tuple[int, int], list[float]] = {}  # (stride, batch.bit_length()) -> ratios

    @property
    def measured(self) -> bool:
        """Whether any step has been observed."""
        return bool(self._ratios)

    @property
    def scale(self) -> dict[int, float]:
        """stride -> current estimate (median of its window, any batch). Computed when read (at a choice,
        every `auto_interval` steps), not at every step's `observe`: that runs on the step's critical path."""
        return {n: statistics.median(v) for n, v in self._ratios.items()}

    def observe(self, stride: int, batch: int, seconds: float) -> None:
        ratio = seconds / self.model.cost(batch, query_len_of(stride, self.branches))
        by_class = self._by_class.setdefault((stride, batch.bit_length()), [])
        for ratios in (self._ratios.setdefault(stride, []), by_class):
            ratios.append(ratio)
            if len(ratios) > self.window:
                del ratios[0]

    def _at(self, stride: int, batch: int | None) -> float:
        if batch is None:
            return statistics.median(self._ratios[stride])
        c = batch.bit_length()
        k = min((k for (n, k) in self._by_class if n == stride), key=lambda k: (abs(k - c), k))
        return statistics.median(self._by_class[(stride, k)])

    def scales(self, strides: Sequence[int], batch: int | None = None) -> dict[int, float]:
        """stride -> measured / modelled step time for a step of `batch` rows (None: over every batch)."""
        if not self._ratios:
            return {n: 1.0 for n in strides}
        own = {n: self._at(n, batch) for n in self._ratios}
        return {n: own[min(own, key=lambda m: (abs(m - n), m))] for n in strides}


class StepTimer:
    """Per (stride, batch bucket), the measured seconds of the engine's recent decode steps (the median of
    the last `window`). Keyed by the runner's batch bucket because a step runs that bucket's CUDA graph, so
    its cost is the bucket's, not a smooth function of the batch size that `StepCostModel` can fit: the
    engine's per-row host work, a sampled step's extra kernels and a graph's padding are all in it. A step
    time needs `min_samples` steps and expires `stale_steps` observed steps after its stride last ran at
    that bucket, so it gets re-measured. Step time, not committed tokens per second: tokens per step are
    estimated from the acceptance counts of every step (`isd_tpf`), far less noisy at batch 1 than the
    tokens of a few steps (at T = 1 one ISD step commits 1 to 4)."""

    def __init__(self, window: int = 16, min_samples: int = 3, stale_steps: int = 512):
        if not 1 <= min_samples <= window or stale_steps < 1:
            raise ValueError(f"StepTimer needs 1 <= min_samples <= window and stale_steps >= 1, got "
                             f"window={window}, min_samples={min_samples}, stale_steps={stale_steps}")
        self.window, self.min_samples, self.stale_steps = window, min_samples, stale_steps
        self._samples: dict[tuple[int, int], list[float]] = {}
        self._last: dict[tuple[int, int], int] = {}
        self.steps = 0

    def observe(self, stride: int, bucket: int, seconds: float) -> None:
        if seconds <= 0:
            return
        self.steps += 1
        key = (stride, bucket)
        samples = self._samples.setdefault(key, [])
        if samples and self.steps - 1 - self._last[key] >= self.stale_steps:
            samples.clear()  # expired: a re-measurement starts afresh, not mixed with the old moment's times
        samples.append(seconds)
        del samples[:-self.window]
        self._last[key] = self.steps

    def expired(self, bucket: int) -> set[int]:
        """Strides measured at this bucket whose measurement is no longer fresh (`stale_steps`)."""
        return {n for (n, b) in self._samples if b == bucket and self.steps - self._last[(n, b)] >= self.stale_steps}

    def seconds(self, bucket: int) -> dict[int, float]:
        """stride -> measured seconds of a step at this bucket (fresh and with enough samples only)."""
        return {n: statistics.median(v) for (n, b), v in self._samples.items()
                if b == bucket and len(v) >= self.min_samples and self.steps - self._last[(n, b)] < self.stale_steps}
