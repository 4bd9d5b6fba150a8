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
# (label, dynamic, inductor options, only the batch dim symbolic). torch 2.11's inductor asserts in
# tiling_utils.get_pw_red_splits on some dynamic-shape graphs: on the H200 it hit sampled_isd_step when a
# second batch size recompiled it with a symbolic batch (the first compile, at batch 1, specializes it),
# and the sampled ISD step then ran eagerly at 2-4x its cost. The assertion is reached from the coalescing
# analysis of tiling and (newer torch) from loop re-indexing after fusion, both mere tile/loop choices, so
# the first retry turns them off. It fires where a size is a product of a symbol and a sum (batch x
# (Q + 1) // 2 - 1: the fix upstream compares such forms symbolically), so the next retry keeps only the
# batch dim symbolic — every other dim of every tensor argument static (one graph per query length, not
# per batch bucket) — and the next compiles every shape statically. On the H200 the sampled ISD step at
# Qwen3-8B's vocabulary (151,936) failed even the static compile (`TypeError: list indices must be integers
# or slices, not NoneType` in inductor's scheduler; docs/stride.md); at idlm-tiny's it compiles. A reduction
# over a vocabulary that long in a batch of a few rows is where inductor splits reductions in two kernels,
# so the last two attempts (a guess, not yet run on the GPU) turn the split off: one program per row.
RETRY_OPTIONS = {"triton.coalesce_tiling_analysis": False, "loop_reindexing_after_fusion": False}
NO_SPLIT_OPTIONS = {**RETRY_OPTIONS, "split_reductions": False}
ATTEMPTS = (("dynamic", True, None, False),
            ("dynamic, tiling analysis off", True, RETRY_OPTIONS, False),
            ("only the batch dynamic", True, RETRY_OPTIONS, True),
            ("static", False, RETRY_OPTIONS, False),
            ("only the batch dynamic, split reductions off", True, NO_SPLIT_OPTIONS, True),
            ("static, split reductions off", False, NO_SPLIT_OPTIONS, False))


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


def _mark_all_but_batch_static(args) -> None:
    for a in args:
        if isinstance(a, torch.Tensor):
            for d in range(1, a.dim()):
                torch._dynamo.mark_static(a, d)


def batch_rows_of(args) -> list:
    """`args` as a decode step's compiled function takes them (`cuda_fused(batch_rows=True)`): each tensor
    contiguous, and a batch of one row (dim 0) padded to two by repeating it. Why: dynamo specializes a
    dim of size 1, so a step compiled at batch 1 (the start-up warm-up) is compiled again at the first larger
    batch, and it guards on strides, which for the engine's graph inputs (views into one packed buffer) change
    with the width of the whole packed row; on the H200 such recompiles of the sampled ISD step (4-5 s each,
    14 of them) stalled an adaptive-stride run's first T = 0.7 cells for minutes. Padded and contiguous, one
    compile per (stride, variant) serves every batch bucket. (Marking the batch dim unbacked instead made
    each compile of that step 20-27 s on the H200.) Row-wise functions only: a row's outputs must not
    depend on the other rows."""
    out, rows = [], args[0].shape[0]
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.contiguous()
            if rows == 1:
                a = a.expand(2, *a.shape[1:]).contiguous()
        out.append(a)
    return out


def _first_rows(result, rows: int):
    if isinstance(result, torch.Tensor):
        return result[:rows]
    if isinstance(result, (tuple, list)):
        return type(result)(_first_rows(r, rows) for r in result)
    return result


def cuda_fused(fn=None, *, start: str = ATTEMPTS[0][0], batch_rows: bool = False):
    """`fn` compiled on CUDA (eager elsewhere), as `@cuda_fused` or `@cuda_fused(start=label)` to begin
    at a later one of ATTEMPTS (a function known to fail the earlier ones on the torch we run). A failed
    compilation moves on to the next attempt, past the last `fn` runs eagerly for good, with a warning
    each time (a Triton or inductor problem on some machine must cost speed, never a request;
    IDLM_FUSE_TRACE=1 adds the traceback). The eager function stays reachable as `__wrapped__` (for calls
    from inside another compiled function). `batch_rows`: the compiled function gets its tensor arguments
    through `batch_rows_of` (a decode step's function: dim 0 is the batch of every tensor argument and of
    every output, rows independent) and its outputs cut back to the batch."""
    labels = [a[0] for a in ATTEMPTS]
    if start not in labels:
        raise ValueError(f"cuda_fused: start must be one of {labels}, got {start!r}")
    if fn is None:
        return functools.partial(cuda_fused, start=start, batch_rows=batch_rows)
    pad = batch_rows
    first = labels.index(start)
    compiled = None
    attempt = first

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, attempt
        while attempt < len(ATTEMPTS) and args[0].is_cuda and os.environ.get("IDLM_FUSE", "1") != "0":
            _, dynamic, options, only_batch_dynamic = ATTEMPTS[attempt]
            if compiled is None:
                raise_dynamo_limits()
                compiled = torch.compile(fn, dynamic=dynamic, options=known_options(options))
            call_args = batch_rows_of(args) if pad else args
            if only_batch_dynamic:
                _mark_all_but_batch_static(call_args)
            try:
                if pad:
                    return _first_rows(compiled(*call_args), args[0].shape[0])
                return compiled(*call_args)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # (errors of fn itself are raised as they are)
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


def cat_columns(pieces) -> torch.Tensor:
    """torch.cat(pieces, -1) of [..., w_i] tensors of one dtype, written as one elementwise expression (each
    output column a gather from its piece, picked by column index) instead of a concatenation. Same values.
    Why: inside a compiled decode step, inductor's lowering of `cat` may realize each input into its slice
    of the output with a kernel of its own (torch 2.11 on the H200: the greedy ISD step's packed output was
    five launches of ~1 µs, and `rotary_qkv`'s q/k/v three, docs/risd.md sessions 27 and 30); an expression
    leaves nothing to that choice and fuses with what computes the pieces."""
    pieces = list(pieces)
    if not pieces or any(p.dtype != pieces[0].dtype for p in pieces):
        raise ValueError("cat_columns needs at least one piece, all of one dtype")
    total = sum(p.shape[-1] for p in pieces)
    col = torch.arange(total, device=pieces[0].device)
    out, end = None, total
    for p in reversed(pieces):  # the last piece first; an earlier one takes the columns before its end
        w = p.shape[-1]
        start = end - w
        val = p.gather(-1, (col - start).clamp(0, w - 1).expand(*p.shape[:-1], total))
        out = val if out is None else torch.where(col < end, val, out)
        end = start
    return out


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
