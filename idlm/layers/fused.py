"""Elementwise chains fused into one kernel on CUDA (torch.compile → Triton), eager elsewhere.

A decode step of a small model is bound by the number of kernels, not by FLOPs or bytes: RMSNorm
in the HF formula is five kernels, rotate-half RoPE five per tensor, SiLU·up two. `cuda_fused`
compiles such a function once (dynamic shapes, so every batch and query size shares it) and uses the
compiled version only for CUDA tensors; CPU keeps the eager reference (bit parity with HF in tests).
The compiled kernels are ordinary launches, so the engine's CUDA graphs capture them.
Set IDLM_FUSE=0 to disable (debugging, or a machine without a working Triton).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)


def raise_dynamo_limits() -> None:
    """Many shapes (stride curriculum, batch buckets) must not exhaust dynamo's default recompile limit,
    past which it silently falls back to eager code."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)


# What to try after a failed compilation, in order, each a fresh torch.compile (then eager for good):
# (label, dynamic, inductor options, only the batch dim symbolic, the batch dim size-oblivious). torch 2.11's
# inductor asserts in tiling_utils.get_pw_red_splits on some dynamic-shape graphs: on the H200 it hit
# sampled_isd_step when a second batch size recompiled it with a symbolic batch (the first compile, at
# batch 1, specializes it), and the sampled ISD step then ran eagerly at 2-4x its cost. The assertion is
# reached from the coalescing analysis of tiling and (newer torch) from loop re-indexing after fusion, both
# mere tile/loop choices, so the first retry turns them off. It fires where a size is a product of a symbol
# and a sum (batch x (Q + 1) // 2 - 1: the fix upstream compares such forms symbolically), so the next
# retries keep only the batch dim symbolic — every other dim of every tensor argument static (one graph per
# query length, not per batch bucket) — first size-oblivious (an unbacked batch: batch 1 is not
# specialized, so one compile serves every batch size), then an ordinary symbolic batch (batch 1 compiled
# apart), and the last compiles every shape statically.
# A decode step's own functions start at "batch-oblivious": compiled with a batch-1 request at start-up
# (`LLMEngine.warmup`) they serve every batch bucket; specialized on batch 1, each (stride, kept-q̃ or not)
# compiled again the first time a larger batch ran it — seen on the H200: 14 such compiles of the sampled
# ISD step, 4-5 s each, stalled an adaptive-stride run's first T = 0.7 cells for minutes.
RETRY_OPTIONS = {"triton.coalesce_tiling_analysis": False, "loop_reindexing_after_fusion": False}
# an unbacked batch also trips inductor's constant folding of uniform tensors (a guard on batch ∈ {0, 1}:
# the greedy ISD step's ones_like, on torch 2.13's CPU inductor)
OBLIVIOUS_OPTIONS = {**RETRY_OPTIONS, "joint_graph_constant_folding": False}
ATTEMPTS = (("dynamic", True, None, False, False),
            ("dynamic, tiling analysis off", True, RETRY_OPTIONS, False, False),
            ("batch-oblivious", True, OBLIVIOUS_OPTIONS, True, True),
            ("only the batch dynamic", True, RETRY_OPTIONS, True, False),
            ("static", False, RETRY_OPTIONS, False, False))


def known_options(options: dict | None) -> dict | None:
    """`options` less the inductor settings this torch does not have (torch.compile refuses unknown ones)."""
    if options is None:
        return None
    import torch._inductor.config as config

    def has(key: str) -> bool:
        obj = config
        for part in key.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    return {k: v for k, v in options.items() if has(k)}


# Every `cuda_fused` function, so a benchmark can say which of them run eagerly after a failed
# compilation (`fallen_back`) or compiled on a fallback attempt (`compile_fallbacks`): a number measured
# on an eager fallback is not the compiled step's.
_FUSED: list = []


def fallen_back() -> list[str]:
    """Names of the `cuda_fused` functions that gave up compiling and run eagerly for good."""
    return sorted(w.__qualname__ for w in _FUSED if w.fell_back())


def compile_fallbacks() -> dict[str, str]:
    """{name: the attempt in use ("eager" past the last)} of the `cuda_fused` functions whose first
    compilation failed."""
    return {w.__qualname__: w.attempt() for w in sorted(_FUSED, key=lambda w: w.__qualname__) if w.moved_on()}


def _mark_all_but_batch_static(args, oblivious: bool = False) -> None:
    """Every dim but dim 0 of each tensor argument static; `oblivious`: dim 0 unbacked (no 0/1
    specialization, so a batch of 1 and a batch of 64 share one compiled graph)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if oblivious and a.dim() > 0:
                torch._dynamo.decorators.mark_unbacked(a, 0)
            for d in range(1, a.dim()):
                torch._dynamo.mark_static(a, d)


def _unmark_unbacked(args) -> None:
    for a in args:
        if isinstance(a, torch.Tensor):
            getattr(a, "_dynamo_unbacked_indices", set()).discard(0)


def _compile_errors(oblivious: bool) -> tuple:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if oblivious:
        return torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode
    return (torch._dynamo.exc.BackendCompilerFailed,)


def cuda_fused(fn=None, *, start: str = ATTEMPTS[0][0]):
    """`fn` compiled on CUDA (eager elsewhere), as `@cuda_fused` or `@cuda_fused(start=label)` to begin
    at a later one of ATTEMPTS (a function known to fail the earlier ones on the torch we run). A failed
    compilation moves on to the next attempt, past the last `fn` runs eagerly for good, with a warning
    each time (a Triton or inductor problem on some machine must cost speed, never a request;
    IDLM_FUSE_TRACE=1 adds the traceback). The eager function stays reachable as `__wrapped__` (for calls
    from inside another compiled function)."""
    labels = [a[0] for a in ATTEMPTS]
    if start not in labels:
        raise ValueError(f"cuda_fused: start must be one of {labels}, got {start!r}")
    if fn is None:
        return functools.partial(cuda_fused, start=start)
    first = labels.index(start)
    compiled = None
    attempt = first

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, attempt
        while attempt < len(ATTEMPTS) and args[0].is_cuda and os.environ.get("IDLM_FUSE", "1") != "0":
            _, dynamic, options, only_batch_dynamic, oblivious = ATTEMPTS[attempt]
            if compiled is None:
                raise_dynamo_limits()
                compiled = torch.compile(fn, dynamic=dynamic, options=known_options(options))
            if only_batch_dynamic:
                _mark_all_but_batch_static(args, oblivious)
            try:
                return compiled(*args)
            # (errors of fn itself are raised as they are; an unbacked batch may also fail in tracing, e.g. on
            # a guard on its value: any error of dynamo's is then a failed compilation)
            except _compile_errors(oblivious) as e:
                if oblivious:  # the marks stay on the arguments, which the next attempt compiles with
                    _unmark_unbacked(args)
                attempt, compiled = attempt + 1, None
                logger.warning("compiling %s (%s) failed; %s: %s", fn.__qualname__, ATTEMPTS[attempt - 1][0],
                               "trying %s" % ATTEMPTS[attempt][0] if attempt < len(ATTEMPTS)
                               else "it runs eagerly from now on", e,
                               exc_info=os.environ.get("IDLM_FUSE_TRACE") == "1")
        return fn(*args)

    wrapper.fell_back = lambda: attempt >= len(ATTEMPTS)
    wrapper.moved_on = lambda: attempt != first
    wrapper.attempt = lambda: ATTEMPTS[attempt][0] if attempt < len(ATTEMPTS) else "eager"
    _FUSED.append(wrapper)
    return wrapper


def eager_fused(fn):
    """Run the method `fn` with every `cuda_fused` function in it eager (torch.compile's "force_eager"
    stance): for forwards outside CUDA graphs, where a compiled dynamic-shape call costs more host time
    than its eager kernels. Not when the object's `exact` is true (issue 16's exact mode): there prefill
    and decode rows must run the same kernels. The stance is entered per call (importing dynamo on first
    use, not at import time)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(args[0], "exact", False):
            return fn(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return wrapper
