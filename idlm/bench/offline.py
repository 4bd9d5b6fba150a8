"""`idlm bench offline`: engine speed vs concurrency and temperature on a fixed prompt set, optionally
side by side with plain AR on the same model.

For each cell (temperature T, concurrency C), waves of exactly C requests are submitted together
(`num_requests` in all, default max(8, 2·C)); a wave runs to completion before the next starts, so every
request decodes alongside C − 1 others from its first token to its last. Reported per cell:
- per-request decode speed: mean over requests of (tokens − 1) / (finish − first token) — the
  user-visible tokens/s once streaming starts (the paper's per-request tok/s, SPEC §9),
- throughput: all generated tokens / wall time, and TPF (committed tokens per decode forward).
A warm-up pass over the same workload runs first (untimed) so CUDA-graph capture is not measured.
Outputs are fixed length (`ignore_eos`, `max_tokens`) so every decoder generates the same token count.
`stop_at_eos=True` lets requests end at their end token instead (`max_tokens` a cap), as real requests
do: a drafting decoder's acceptance past an answer's natural end (text the model was never meant to
write) is not what users see. Greedy outputs are still identical between AR and a lossless decoder;
`generated_tokens` reports what each run produced.

Host timing varies from run to run, so a cell is measured `reps` times and the row is the rep with the
median per-request speed (all its fields), with every rep's speeds beside it (`reps_*`). With an AR
engine (`ar_engine_for`: the same model and engine options, decoder "ar", no LoRA) the decoder's and
AR's reps are interleaved (A B B A ...), so drift in clocks or load hits both alike, and the row adds
AR's median run and the ratios `per_request_over_ar` and `throughput_over_ar` — the speed-up a user
sees, measured in one process on one workload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time

from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import freeze_gc
from idlm.errors import ConfigError
from idlm.eval.tasks import COMMITTED_TASKS, load_jsonl
from idlm.layers.fused import compile_fallbacks, fallen_back


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat prompts from the committed held-out tasks, kinds interleaved (deterministic)."""
    rows = load_jsonl(COMMITTED_TASKS)
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    out = []
    i = 0
    while len(out) < n:
        k = kinds[i % len(kinds)]
        r = by_kind[k][(i // len(kinds)) % len(by_kind[k])]
        msgs = [{"role": "user", "content": r["prompt"]}]
        out.append(tokenizer.encode_chat(msgs) if tokenizer.chat_template else tokenizer.encode(r["prompt"]))
        i += 1
    return out


def check_bench_options(temperatures: list[float], reps: int = 1, num_requests: int | None = None,
                        decoder: str | None = None, compare_ar: bool = False) -> None:
    """ConfigError (naming the option) for a sweep that cannot run; checked before any model loads."""
    if not temperatures:
        raise ConfigError("--temperature: give at least one temperature", param="temperature")
    for t in temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"--temperature {t!r}: each temperature must be a finite number >= 0 (0 = greedy)",
                              param="temperature")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ConfigError(f"--reps {reps!r}: must be a positive integer (repetitions per cell)", param="reps")
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int)
                                     or num_requests < 1):
        raise ConfigError(f"--num-requests {num_requests!r}: must be a positive integer", param="num_requests")
    if compare_ar and decoder == "ar":
        raise ConfigError("--compare-ar: the decoder under test is already 'ar'; compare a decoder such as "
                          "--decoder isd, risd or sdar against it", param="compare_ar")


def ar_engine_for(engine):
    """A plain-AR LLMEngine on the same model object: the same EngineConfig but decoder "ar", and no LoRA
    (stride and stride schedule are dropped: AR has none). Its KV pool is its own: with `num_pages` unset
    it is sized from the memory the first engine left, so on a GPU give `num_pages` for equal pools."""
    from idlm.engine.llm_engine import LLMEngine

    if engine.config.decoder == "ar":
        raise ConfigError("--compare-ar: the decoder under test is already 'ar'", param="compare_ar")
    cfg = dataclasses.replace(engine.config, decoder="ar", stride=1, stride_schedule=None)
    try:
        return LLMEngine(engine.model, engine.tokenizer, cfg, eos_token_ids=engine.eos)
    except MemoryError as e:
        raise ConfigError(f"--compare-ar: no room for the AR engine's KV pool ({e}); pass --num-pages "
                          "to size both engines' pools", param="num_pages") from None


def count_delta(counts: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    """What a counter dict (e.g. `LLMEngine.stride_mix`) gained since `before`."""
    return {n: c - before.get(n, 0) for n, c in sorted(counts.items()) if c > before.get(n, 0)}


def step_stride(engine, mix_before: dict[int, int]) -> int | None:
    """The stride of the one decode step an engine ran since `mix_before` (a copy of its `stride_mix`); None
    where it ran none (a prefill-only step) or several."""
    ran = count_delta(engine.stride_mix, mix_before)
    return next(iter(ran)) if len(ran) == 1 and sum(ran.values()) == 1 else None


def step_split(engine, before: dict) -> dict:
    """Decode steps chained (launched before the last one's results were read) and synchronous since the
    counters `before` (a copy of `LLMEngine.counters`): their counts and mean wall ms, the stride changes, the
    steps with rejection branches and the prefill time. A chained step's time is its wait for the step before
    plus its launch; a synchronous one's, everything else the step did (drain, schedule, inputs, launch)."""
    d = {k: engine.counters[k] - before.get(k, 0) for k in
         ("decode_forwards", "overlapped_steps", "decode_time_s", "chained_time_s", "stride_changes", "branch_steps",
          "prefill_time_s")}
    chained, sync = d["overlapped_steps"], d["decode_forwards"] - d["overlapped_steps"]
    return {"chained_steps": chained, "sync_steps": sync,
            "chained_step_ms": round(1e3 * d["chained_time_s"] / chained, 4) if chained else None,
            "sync_step_ms": round(1e3 * (d["decode_time_s"] - d["chained_time_s"]) / sync, 4) if sync > 0 else None,
            "stride_changes": d["stride_changes"], "branch_steps": d["branch_steps"],
            "prefill_s": round(d["prefill_time_s"], 4)}


def _run(engine, prompts, params, wave: int) -> dict:
    seqs = []
    counters0 = dict(engine.counters)
    forwards0, decode_t0 = counters0["decode_forwards"], counters0["decode_time_s"]
    mix0, rows0, breaks0 = dict(engine.stride_mix), dict(engine.row_stride_mix), dict(engine.chain_breaks)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), wave):
        seqs += [engine.seqs[engine.add_request(p, params)] for p in prompts[i: i + wave]]
        while engine.has_unfinished():
            engine.step()
    wall = time.perf_counter() - t0
    speeds = [(len(s.output.token_ids) - 1) / (s.finish_time - s.first_token_time)
              for s in seqs if len(s.output.token_ids) > 1 and s.finish_time > s.first_token_time]
    tokens = sum(len(s.output.token_ids) for s in seqs)
    committed = sum(s.output.stats.committed for s in seqs)
    forwards = sum(s.output.stats.forwards for s in seqs)
    ttft = [s.first_token_time - s.arrival for s in seqs]
    if engine.block_manager.num_free_pages != engine.block_manager.num_pages:
        raise RuntimeError("KV pages leaked during the benchmark")
    return {"requests": len(seqs), "generated_tokens": tokens, "wall_s": round(wall, 4),
            "throughput_tok_s": round(tokens / wall, 1),
            "per_request_tok_s": round(statistics.mean(speeds), 1) if speeds else None,
            "tpf": round(committed / forwards, 4) if forwards else None,
            "batch_forwards": engine.counters["decode_forwards"] - forwards0,
            # wall time of one decode step (forward + acceptance + host bookkeeping), averaged
            "decode_step_ms": round(1e3 * (engine.counters["decode_time_s"] - decode_t0)
                                    / max(1, engine.counters["decode_forwards"] - forwards0), 4),
            "mean_ttft_s": round(statistics.mean(ttft), 4),
            # where the decode time went: steps chained behind the one before (overlapped) and the others
            # (synchronous: a batch change, a stride change, ... `chain_breaks`), prefill apart
            **step_split(engine, counters0),
            "chain_breaks": count_delta(engine.chain_breaks, breaks0),
            # decode steps per stride N (1 = plain AR steps): the adaptive stride's mix
            "stride_mix": count_delta(engine.stride_mix, mix0),
            # decode rows per the stride each row ran (auto per row: rows of one step may differ)
            "row_stride_mix": count_delta(engine.row_stride_mix, rows0),
            # fused functions that failed to compile and ran eagerly: such a run is not the compiled step's speed
            "eager_fallbacks": fallen_back(), "compile_fallbacks": compile_fallbacks()}


def median_run(runs: list[dict]) -> dict:
    """The rep with the median per-request tok/s (the upper one of an even count), all its fields, plus
    every rep's per-request speed and throughput."""
    ordered = sorted(runs, key=lambda r: -1.0 if r["per_request_tok_s"] is None else r["per_request_tok_s"])
    return dict(ordered[len(ordered) // 2], reps_per_request_tok_s=[r["per_request_tok_s"] for r in runs],
                reps_throughput_tok_s=[r["throughput_tok_s"] for r in runs])


def paired_ratio(a: list[float | None], b: list[float | None]) -> float | None:
    """The median over reps i of a[i] / b[i] (3 decimals), reported beside the ratio of the two medians:
    reps run side by side (A B, B A, ...) share the host's state of the moment, so a slow spell that hits
    both reps of a pair cancels in that pair (on the H200 the AR engine's own three reps of one cell spread
    over 201–277 tok/s). None if no pair has both values."""
    pairs = [x / y for x, y in zip(a, b) if x is not None and y]
    return round(statistics.median(pairs), 3) if pairs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 decimals; None where either is missing or b is 0."""
    return round(a / b, 3) if a is not None and b else None


def _check_pool(engine, work: list[list[int]], max_tokens: int, c: int) -> None:
    """A wave of c requests must fit the KV pool at once, or they would not decode side by side."""
    bm = engine.block_manager
    longest = sorted((len(p) for p in work), reverse=True)[:c]
    need = sum(bm.pages_needed(n + max_tokens + engine.max_query_len) for n in longest)
    if need > bm.num_pages:
        raise ConfigError(f"the {engine.config.decoder} engine's KV pool has {bm.num_pages} pages but a wave of "
                          f"{c} requests needs up to {need}: raise --num-pages or lower --max-tokens / "
                          "--concurrency", param="num_pages")


def bench_compare(engine, prompts: list[list[int]], concurrency: list[int], temperatures: list[float],
                  max_tokens: int = 128, num_requests: int | None = None, warmup: bool = True, reps: int = 1,
                  ar_engine=None, stop_at_eos: bool = False, decoding: dict | None = None) -> list[dict]:
    """One row per temperature × concurrency cell (temperatures outermost): the decoder's median run of
    `reps` and, with `ar_engine`, AR's median run under "ar" and the ratios decoder / AR. decoding: further
    `SamplingParams` fields of every request (e.g. draft, draft_temperature, verification; AR ignores them)."""
    check_bench_options(temperatures, reps, num_requests, engine.config.decoder, ar_engine is not None)
    if ar_engine is not None and ar_engine.config.decoder != "ar":
        raise ConfigError(f"ar_engine runs decoder {ar_engine.config.decoder!r}, not 'ar'", param="compare_ar")
    engines = [engine] if ar_engine is None else [engine, ar_engine]
    results = []
    for t in temperatures:
        params = SamplingParams(temperature=t, max_tokens=max_tokens, ignore_eos=not stop_at_eos, seed=0,
                                **(decoding or {}))
        for c in concurrency:
            n = num_requests or max(8, 2 * c)
            work = [prompts[i % len(prompts)] for i in range(n)]
            for e in engines:
                _check_pool(e, work, max_tokens, c)
                e.scheduler.max_num_seqs = c
                if warmup:
                    _run(e, work, params, c)
            freeze_gc()  # what lives now, out of the collector's view: no full collection stalls a timed run
            runs = [[] for _ in engines]
            for rep in range(reps):
                order = range(len(engines)) if rep % 2 == 0 else reversed(range(len(engines)))  # A B, B A, ...
                for k in order:
                    runs[k].append(_run(engines[k], work, params, c))
            row = {"decoder": engine.config.decoder, "temperature": t, "concurrency": c, "stop_at_eos": stop_at_eos,
                   **median_run(runs[0])}
            if ar_engine is not None:
                ar = median_run(runs[1])
                row.update(ar=ar, per_request_over_ar=ratio(row["per_request_tok_s"], ar["per_request_tok_s"]),
                           throughput_over_ar=ratio(row["throughput_tok_s"], ar["throughput_tok_s"]),
                           per_request_over_ar_paired=paired_ratio(row["reps_per_request_tok_s"],
                                                                   ar["reps_per_request_tok_s"]))
            results.append(row)
    return results


def bench_offline(engine, prompts: list[list[int]], concurrency: list[int], max_tokens: int = 128,
                  temperature: float = 0.0, num_requests: int | None = None, warmup: bool = True,
                  stop_at_eos: bool = False) -> list[dict]:
    """One temperature, one measurement per concurrency, no AR side (`bench_compare` with reps=1)."""
    return bench_compare(engine, prompts, concurrency, [temperature], max_tokens, num_requests, warmup,
                         stop_at_eos=stop_at_eos)


@contextlib.contextmanager
def traced_choices(engine):
    """Record every choice of a `--stride auto` engine while the block runs: yields a list that fills with
    [batch, chosen stride, its rate, {stride: rate} of every stride rated, {stride: measured ms per step}
    at the batch's bucket, whether the step carries rejection branches] (rates in committed tokens/s of the
    batch; rates and times those of the chosen layout), so a run can say why the policy took a stride.
    `sample_trace` thins it for a report."""
    trace: list = []
    choose = engine._choose_stride

    def traced(decodes):
        c = choose(decodes)
        measured = engine._trackers[c.branches][1].seconds(engine.runner.bucket(len(decodes)))
        trace.append([len(decodes), c.stride, round(c.rate, 1), {n: round(r, 1) for n, r in sorted(c.rates.items())},
                      {n: round(t * 1e3, 4) for n, t in sorted(measured.items())}, c.branches])
        return c

    engine._choose_stride = traced
    try:
        yield trace
    finally:
        del engine._choose_stride  # the class's method again


def sample_trace(trace: list, most: int = 24) -> list:
    """At most `most` entries of a trace, spread evenly."""
    return trace[:: max(1, -(-len(trace) // most))]


def step_phases(engine, prompt: list[int], params: SamplingParams) -> dict:
    """Where one request's decode steps spend their time (a diagnostic; run it on an idle engine): every
    step's wall time, split into the decoder's host inputs (`step_inputs`), the runner's device step
    (`decode`, synchronized so it holds the GPU time), the decoder's `finish`, and the rest of the engine
    step (scheduler, commits, outputs); and that rest split further: the scheduler (`schedule_ms`, the
    adaptive stride's choice included), the step's block arrays and KV slots (`batch_ms`), the commits and
    outputs (`apply_ms`), the decode phase's remainder (`sync_ms`: the host sync's copy, copies of kept q̃
    rows that sit a step out, counters) and the engine step's own (`outside_ms`). Medians in ms, the number
    of steps, the CUDA graphs captured meanwhile and the slowest step (a capture or compile shows there); on
    CUDA also the caching allocator's retries meanwhile and the free device memory."""
    import torch

    from idlm.engine import model_runner

    cuda = engine.runner.device.type == "cuda"
    parts: dict[str, list[float]] = {"inputs": [], "decode": [], "finish": []}
    extra_parts: dict[str, list[float]] = {"schedule": [], "batch": [], "apply": [], "phase": []}
    runner_parts: dict[str, list[float]] = {"arrays": [], "fill": [], "replay": []}  # inside the runner's decode
    patched = []

    def wrap(obj, attr: str, key: str, synced: bool = False) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if synced and cuda:
                torch.cuda.synchronize()
            (parts if key in parts else extra_parts if key in extra_parts else runner_parts)[key].append(
                time.perf_counter() - t0)
            return out

        setattr(obj, attr, timed)
        patched.append((obj, attr, fn))

    steps: list[float] = []
    strides: list[int | None] = []  # each step's stride (None: a prefill-only step)
    graphs0, generated0 = engine.runner.graphs_captured, engine.counters["generated_tokens"]
    retries0 = torch.cuda.memory_stats(engine.runner.device).get("num_alloc_retries", 0) if cuda else 0
    if isinstance(engine.config.stride, int):
        engine._decoder(engine.config.stride)  # created before the run, so that it is timed
    try:
        for d in engine._decoders.values():
            wrap(d, "step_inputs", "inputs")
            wrap(d, "finish", "finish")
        wrap(engine.runner, "decode", "decode", synced=True)
        wrap(engine.scheduler, "schedule", "schedule")
        for attr, key in (("_decode_batch", "batch"), ("_apply_each", "apply"), ("_decode", "phase")):
            wrap(engine, attr, key)
        wrap(engine.runner, "_batch_arrays", "arrays")
        wrap(model_runner, "_fill", "fill")  # a module function: the runner looks it up by name at each call
        if cuda:
            wrap(torch.cuda.CUDAGraph, "replay", "replay")  # the host's side of a replay (the launch)
        engine.add_request(prompt, params)
        while engine.has_unfinished():
            mix = dict(engine.stride_mix)
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
            strides.append(step_stride(engine, mix))
    finally:
        for obj, attr, original in reversed(patched):
            if obj is model_runner or obj is torch.cuda.CUDAGraph:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # the instance attribute goes; the class method shows through again

    def ms(v: list[float]) -> float | None:
        return round(1e3 * statistics.median(v), 4) if v else None

    memory = {}
    if cuda:  # allocation retries (a cudaMalloc that failed, the cache freed, tried again): memory pressure
        memory = {"alloc_retries": torch.cuda.memory_stats(engine.runner.device).get("num_alloc_retries", 0)
                  - retries0, "free_gib": round(torch.cuda.mem_get_info(engine.runner.device)[0] / 2**30, 2)}
    decode_steps = steps[1:]  # the first step is the prefill
    rest = [s - a - b - c for s, a, b, c in zip(decode_steps, parts["inputs"], parts["decode"], parts["finish"])]
    # the decode steps' entries (the prefill step also schedules and applies: its entries are dropped)
    sched, batch, apply, phase = (v[len(v) - len(decode_steps):] for v in extra_parts.values())
    sync = [ph - b - i - d - f - a for ph, b, i, d, f, a in zip(phase, batch, parts["inputs"], parts["decode"],
                                                                parts["finish"], apply)]
    outside = [s - ph - sc for s, ph, sc in zip(decode_steps, phase, sched)]
    by_stride: dict[int, dict[str, list[float]]] = {}  # an adaptive engine's steps, each stride apart
    for i, n in enumerate(strides[1:]):
        if n is not None and i < len(rest):
            row = by_stride.setdefault(n, {"step": [], "decode": [], "rest": [], "schedule": []})
            for key, values in (("step", decode_steps), ("decode", parts["decode"]), ("rest", rest),
                                ("schedule", sched)):
                row[key].append(values[i])
    return {"steps": len(decode_steps), "step_ms": ms(decode_steps), **{f"{k}_ms": ms(v) for k, v in parts.items()},
            "rest_ms": ms(rest), "schedule_ms": ms(sched), "batch_ms": ms(batch), "apply_ms": ms(apply),
            "sync_ms": ms(sync), "outside_ms": ms(outside),
            # the runner's host work inside `decode_ms`: the step's arrays, their copy into the staging
            # buffers, and the graph launch (None where absent: no graphs on CPU)
            **{f"runner_{k}_ms": ms(v[max(0, len(v) - len(decode_steps)):]) for k, v in runner_parts.items()},
            "max_step_ms": round(1e3 * max(decode_steps), 2) if decode_steps else None,
            "new_graphs": engine.runner.graphs_captured - graphs0,  # (the first token comes from the prefill)
            "tokens_per_step": round((engine.counters["generated_tokens"] - generated0 - 1)
                                     / max(1, len(decode_steps)), 3), "eager_fallbacks": fallen_back(),
            "compile_fallbacks": compile_fallbacks(), **memory,
            "by_stride": {n: {"steps": len(v["step"]), **{f"{k}_ms": ms(x) for k, x in v.items()}}
                          for n, v in sorted(by_stride.items())}}


def interleaved_steps(cases: dict, rounds: int = 20, chunk: int = 10, fresh: bool = False) -> dict:
    """Decode-step wall times of several engines measured in turns, so that the host's slow spells (its
    timing moves ±30% between runs a few hundred ms apart) fall on every case alike: `cases` maps a name
    to (engine, prompt, params) — one request per engine, restarted when it finishes; each round runs
    `chunk` decode steps of every case in turn. -> per case the median step (ms), each round's median
    and the tokens per step; and each case's ratio to the first case, round by round (median of the
    per-round ratios: the measure for "a step of B costs ≤ x × a step of A").

    fresh: every round's chunk starts a new request (the last one aborted), so every case is timed over
    the same contexts — its prompt plus at most chunk × its tokens per step — instead of one that commits
    more tokens a step (ISD) being timed, as its request runs on, at ever longer contexts than AR."""
    if rounds < 1 or chunk < 1:
        raise ConfigError(f"interleaved_steps needs rounds >= 1 and chunk >= 1, got {rounds} and {chunk}")
    per_round: dict[str, list[list[float]]] = {name: [] for name in cases}
    tokens = {name: [0, 0] for name in cases}  # generated tokens, decode steps
    for _ in range(rounds):
        for name, (eng, prompt, params) in cases.items():
            times: list[float] = []
            if fresh:
                for rid in list(eng.seqs):
                    eng.abort_request(rid)
            while len(times) < chunk:
                if not eng.has_unfinished():
                    eng.add_request(prompt, params)
                c = eng.counters
                f, t, g = c["decode_forwards"], c["decode_time_s"], c["generated_tokens"]
                eng.step()
                if eng.counters["decode_forwards"] == f + 1:  # a decode step (not the prefill)
                    times.append(eng.counters["decode_time_s"] - t)
                    tokens[name][0] += eng.counters["generated_tokens"] - g
                    tokens[name][1] += 1
            per_round[name].append(times)
    first = next(iter(cases))
    out = {}
    for name, rounds_ in per_round.items():
        meds = [statistics.median(r) for r in rounds_]
        ratios = [m / statistics.median(f) for m, f in zip(meds, per_round[first])]
        out[name] = {"step_ms": round(1e3 * statistics.median([t for r in rounds_ for t in r]), 4),
                     "rounds_ms": [round(1e3 * m, 4) for m in meds],
                     "tokens_per_step": round(tokens[name][0] / max(1, tokens[name][1]), 3),
                     f"over_{first}": round(statistics.median(ratios), 3)}
    return out
