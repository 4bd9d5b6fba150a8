"""The adaptive stride on a model whose drafts are accepted with a known probability (issue 13).

Why: the policy (`idlm.decoding.stride_policy`) trades committed tokens per step against step cost, and on
an 8B-class model a long query block costs real time at large batches (SPEC §9). To see it choose — N ≈ 4
at small batches, smaller N as the batch grows — without a trained 8B drafter, the acceptance is made
synthetic: `synthetic_acceptance` replaces the verification outcome of every ISD step with the leading
successes of independent Bernoulli(p) draws, one per draft, so a row of stride n accepts j drafts with
probability p^j (1 − p) (all n − 1 with p^(n−1)), whatever the weights. Everything else is the real engine:
the forward of 2N − 1 query tokens per row on the real weight shapes, the CUDA graphs, the host work, the
policy's own cost model and acceptance estimates. The tokens are meaningless (drafts of random weights
committed as if accepted): a benchmark of speed and of the policy only, never of output.

`bench_policy` runs one cell (a concurrency) and reports the policy's predicted committed tokens per
second (the rate of each choice it made, `StrideChoice.rate`, averaged over its steps) beside the measured
one (tokens committed by decode steps / decode time), per request, and the stride mix.

`virtual_device` goes one step further for tests and what-if studies on a CPU: the engine's clock becomes
a virtual one that each decode step advances by a given step-time function of (stride, batch), with
optional noise, so the closed loop — measured step times, acceptance estimates, choices — runs exactly
as on a device with those costs, deterministically (`tests/test_policy_bench.py` checks that the policy
falls back to AR steps where ISD loses and keeps ISD where it wins).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from idlm.bench.offline import count_delta
from idlm.decoding.sampling import SamplingParams


def leading_successes(rng: np.random.Generator, p, k: np.ndarray) -> np.ndarray:
    """[B] the number of leading successes among k[b] independent Bernoulli(p) draws (0..k[b]); p a float or
    [B, 1] per-row probabilities."""
    k = np.asarray(k, dtype=np.int64)
    width = int(k.max(initial=0))
    if width == 0:
        return np.zeros(len(k), dtype=np.int64)
    ok = rng.random((len(k), width)) < p
    ok &= np.arange(width)[None, :] < k[:, None]
    return np.cumprod(ok, axis=1).sum(axis=1)


def synthetic_acceptance(engine, p: float | Callable[[SamplingParams], float], seed: int = 0) -> None:
    """Make every ISD step of `engine` accept its drafts with probability p each (module docstring): the
    decoders it builds from now on get a `finish` that overwrites column 0 of the packed results (the
    number of accepted drafts) of each verifying row before the usual bookkeeping. p may be a function of a
    request's SamplingParams (e.g. greedy requests' drafts accepted more often than T = 1 ones)."""
    def check(value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"acceptance probability must be in [0, 1], got {value!r}")
        return value

    prob = p if callable(p) else (lambda _params, value=check(p): value)
    rng = np.random.default_rng(seed)
    build = engine._decoder
    patched: set[int] = set()

    def decoder(stride: int, branches: bool | None = None):
        dec = build(stride, branches)
        if id(dec) not in patched and hasattr(dec, "row_strides"):
            patched.add(id(dec))
            finish = dec.finish

            def synthetic_finish(states, packed, extra, params, stats):
                rows_n = dec.row_strides(states)
                k = np.full(len(states), dec.stride - 1) if rows_n is None else rows_n - 1
                verify = np.fromiter((s.mode == "V" for s in states), bool, len(states))
                packed = packed.copy()
                rows = np.array([check(prob(params[b])) for b in np.flatnonzero(verify)])[:, None]
                packed[verify, 0] = leading_successes(rng, rows, k[verify])
                return finish(states, packed, extra, params, stats)

            dec.finish = synthetic_finish
        return dec

    engine._decoder = decoder


def bench_policy(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """One cell: `concurrency` requests of `max_tokens` new tokens each (end token ignored), all at once, on
    an adaptive-stride engine -> predicted and measured committed tokens/s per request, stride mix, TPF."""
    choices: list[tuple[float, int]] = []  # (predicted batch rate, batch size) of each choice
    choose = engine._choose_stride

    def recording(decodes):
        c = choose(decodes)
        choices.append((c.rate, len(decodes)))
        return c

    engine._choose_stride = recording
    before, graphs = dict(engine.counters), engine.runner.graphs_captured
    mix0, rows0 = dict(engine.stride_mix), dict(engine.row_stride_mix)
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for _ in range(concurrency)]
        outs = engine.run([prompts[i % len(prompts)] for i in range(concurrency)], params)
    finally:
        engine._choose_stride = choose
    steps = engine.counters["decode_forwards"] - before["decode_forwards"]
    seconds = engine.counters["decode_time_s"] - before["decode_time_s"]
    decoded = sum(len(o.token_ids) for o in outs) - len(outs)  # each request's first token comes from prefill
    mix, rows = count_delta(engine.stride_mix, mix0), count_delta(engine.row_stride_mix, rows0)
    predicted = float(np.mean([r / b for r, b in choices])) if choices else None
    return {"concurrency": concurrency, "decode_steps": steps, "decode_s": round(seconds, 4),
            "measured_tok_s_per_request": round(decoded / seconds / concurrency, 1) if seconds else None,
            "predicted_tok_s_per_request": None if predicted is None else round(predicted, 1),
            "tpf": round(decoded / max(1, sum(rows.values())), 3) if rows else None,
            "stride_mix": dict(sorted(mix.items())), "row_stride_mix": dict(sorted(rows.items())),
            "new_graphs": engine.runner.graphs_captured - graphs}  # > 0: a capture's seconds are in decode_s


class VirtualClock:
    """A stand-in for the `time` module in `idlm.engine.llm_engine`: `perf_counter` returns virtual seconds,
    advanced only by the decode steps of engines attached with `VirtualClock.attach` (prefill takes none)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def attach(self, engine, step_seconds: Callable[[int, int], float], noise: float = 0.0, seed: int = 0) -> None:
        """Every decode step of `engine` (stride n, batch B) takes step_seconds(n, B) · (1 + noise · z) virtual
        seconds, z standard normal (clipped so a step never takes under 30% of its time)."""
        rng = np.random.default_rng(seed)
        decode = engine.runner.decode

        def timed(batch, decoder, tensors, static):
            out = decode(batch, decoder, tensors, static)
            rows = len(batch) if isinstance(batch, list) else batch.tokens.shape[0]
            self.now += step_seconds(decoder.stride, rows) * max(0.3, 1.0 + noise * rng.standard_normal())
            return out

        engine.runner.decode = timed


@contextlib.contextmanager
def virtual_device() -> Iterator[VirtualClock]:
    """Within the block, engines measure time on a `VirtualClock` (attach each engine to give its steps
    their costs); the real clock is restored on exit."""
    from idlm.engine import llm_engine

    clock, real = VirtualClock(), llm_engine.time
    llm_engine.time = clock
    try:
        yield clock
    finally:
        llm_engine.time = real
