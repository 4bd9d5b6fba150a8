"""Start-up calibration of the decode-step cost model that the adaptive stride uses (`stride="auto"`).

Why: whether a 2N−1-token ISD step pays depends on the device, the model and the batch (SPEC §9: at
batch 128 an 8B model's Q = 7 step costs 4.6× its Q = 1 step on an H200, at batch 1 almost the same), so
the engine measures it where it runs: a few decode forwards of the engine's own runner (CUDA graphs,
attention backend and KV pool as in serving) at batch 1, max/4 and max and Q = 1, 7 and the largest
query length, each the median of a few timed steps, fitted to cost = base + per_row·B + per_token·B·Q
(`StepCostModel.fit`). The result is cached per device + model + engine shape under
`$IDLM_CACHE/step_cost/` (a few seconds saved at every later start); `EngineConfig.step_cost` skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time

import torch

from idlm.atomic import atomic_write_text
from idlm.decoding.stride_policy import StepCostModel, query_len_of
from idlm.engine.model_runner import Row
from idlm.errors import ConfigError

logger = logging.getLogger(__name__)

CONTEXT = 128  # KV tokens per request while measuring


class ForwardOnly:
    """A stand-in decoder for timing (here and `idlm bench latency`): the decode step's forward and
    logits, then an argmax."""
    name = "forward"
    fused = True
    uses_lora = False

    def __init__(self, query_len: int):
        self.query_len = self.stride = query_len

    def compute(self, logits, tensors):
        return logits.argmax(-1).float(), None


def time_decode(runner, rows: list[Row], query_len: int, iters: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `iters` decode forwards of these rows (after `warmup` untimed ones: graph
    capture, kernel selection), each including the step's one host sync."""
    dec = ForwardOnly(query_len)
    for _ in range(warmup):
        runner.decode(rows, dec, {}, {})[0].tolist()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.decode(rows, dec, {}, {})[0].tolist()
        times.append(time.perf_counter() - t0)
    return times


def hold_context(bm, ids: list, context: int) -> None:
    """Dummy requests `ids` in page manager `bm`, each holding `context` committed tokens of KV (token 1)."""
    for rid in ids:
        bm.allocate(rid, [1] * context)
        bm.commit(rid, context, [1] * context, release=False)


def context_rows(bm, ids: list, context: int, query_len: int) -> list[Row]:
    """One decode row of `query_len` query tokens right after the context of each of `hold_context`'s
    requests (their slots reserved)."""
    rows = []
    for rid in ids:
        if not bm.reserve(rid, query_len):
            raise ConfigError(f"the KV pool ({bm.num_pages} pages of {bm.page_size} tokens) cannot hold {len(ids)} "
                              f"rows of {context} + {query_len} tokens: give it more pages or time fewer rows")
        rows.append(Row([1] * query_len, context, bm.slots(rid, context, query_len), bm.block_table(rid)))
    return rows


def calibration_points(max_num_seqs: int, max_stride: int, capacity: int,
                       branches: bool = False) -> list[tuple[int, int]]:
    """(batch, query_len) pairs to time: batches 1, max/4, max (within what the pool holds), Q = 1, 7, max
    (max: `query_len_of` the largest stride, N² with rejection branches); batch 2 as well where no other batch
    fits (so the per-row term is measured, not assumed 0)."""
    batches = sorted({1, max(1, max_num_seqs // 4), max_num_seqs})
    batches = [b for b in batches if b <= capacity] or [1]
    if batches == [1] and min(max_num_seqs, capacity) >= 2:
        batches.append(2)
    queries = sorted({1, min(7, query_len_of(max_stride, branches)), query_len_of(max_stride, branches)})
    return [(b, q) for b in batches for q in queries]


def calibration_context(free_pages: int, page_size: int, max_query: int) -> int:
    """KV tokens each calibration row holds: CONTEXT, or what a pool too small for one row of CONTEXT plus the
    longest query leaves beside that query (a small pool serves short requests; its calibration must fit it)."""
    fits = (free_pages * page_size) - max_query
    if fits < 1:
        raise ConfigError(f"the KV pool ({free_pages} free pages of {page_size} tokens) cannot hold one decode block "
                          f"of {max_query} query tokens after a token of context: give the engine more pages or a "
                          "smaller auto_max_stride")
    return min(CONTEXT, fits)


def _cache_key(engine, context: int = CONTEXT) -> str:
    runner, cfg = engine.runner, engine.config
    ident = {"device": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
             "torch": torch.__version__, "model": repr(engine.model.config), "dtype": str(engine.model.dtype),
             "graphs": runner.use_graphs, "attention": cfg.attention, "max_num_seqs": cfg.max_num_seqs,
             "max_stride": cfg.auto_max_stride, "lora": engine.lora is not None, "context": context,
             "branches": cfg.branches}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def measure_step_costs(engine, points: list[tuple[int, int]], iters: int = 5,
                       context: int = CONTEXT) -> list[tuple[int, int, float]]:
    """Median seconds of the engine runner's decode forward at each (batch, query_len), over dummy requests
    that hold `context` tokens of KV (allocated from the engine's pool and freed again)."""
    bm, runner = engine.block_manager, engine.runner
    max_b, max_q = max(b for b, _ in points), max(q for _, q in points)
    ids = [f"__calibrate_{i}" for i in range(max_b)]
    samples = []
    caching, bm.enable_prefix_caching = bm.enable_prefix_caching, False  # dummy KV must never be a prefix hit
    try:
        hold_context(bm, ids, context)
        context_rows(bm, ids, context, max_q)  # every row's slots reserved for the longest query at once
        for B, Q in points:
            rows = context_rows(bm, ids[:B], context, Q)
            samples.append((B, Q, statistics.median(time_decode(runner, rows, Q, iters))))
    finally:
        for rid in ids:
            if rid in bm:
                bm.free(rid)
        bm.enable_prefix_caching = caching
    return samples


def calibrate_step_cost(engine, use_cache: bool = True) -> StepCostModel:
    """The engine's StepCostModel: from the cache, or measured now (and cached)."""
    from idlm.models.registry import cache_dir

    cfg = engine.config
    max_q = query_len_of(cfg.auto_max_stride, cfg.branches)
    context = calibration_context(engine.block_manager.num_free_pages, cfg.page_size, max_q)
    path = cache_dir() / "step_cost" / f"{_cache_key(engine, context)}.json"
    if use_cache and path.exists():
        try:
            data = json.loads(path.read_text())
            return StepCostModel(*data["coefficients"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring the unreadable step-cost cache %s: %s", path, e)
    capacity = engine.block_manager.num_free_pages // (-(-(context + max_q) // cfg.page_size))
    points = calibration_points(cfg.max_num_seqs, cfg.auto_max_stride, capacity, cfg.branches)
    t0 = time.perf_counter()
    samples = measure_step_costs(engine, points, context=context)
    model = StepCostModel.fit(samples)
    logger.info("step-cost calibration (%.1f s): %s", time.perf_counter() - t0, model)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"coefficients": [model.base, model.per_row, model.per_token],
                                                "samples": samples}, indent=1))
        except OSError as e:
            logger.warning("could not cache the step-cost calibration at %s: %s", path, e)
    return model
