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


# Inductor options of the one retry after a failed compilation. torch 2.11's coalescing analysis of
# tiling asserts on some dynamic-shape graphs (tiling_utils.get_pw_red_splits; on the H200 it hit
# sampled_isd_step when a second batch size recompiled it, and the sampled ISD step then ran eagerly at
# 2-4x its cost); the analysis only picks tile shapes, so the retry turns it off.
RETRY_OPTIONS = {"triton.coalesce_tiling_analysis": False}

# Every `cuda_fused` function, so a benchmark can say which of them run eagerly after a failed
# compilation (`fallen_back`): a number measured on an eager fallback is not the compiled step's.
_FUSED: list = []


def fallen_back() -> list[str]:
    """Names of the `cuda_fused` functions that gave up compiling and run eagerly for good."""
    return sorted(w.__qualname__ for w in _FUSED if w.fell_back())


def cuda_fused(fn):
    """`fn` compiled on CUDA (eager elsewhere). A failed compilation is retried once with
    RETRY_OPTIONS, then `fn` runs eagerly for good, with a warning each time (a Triton or inductor
    problem on some machine must cost speed, never a request; IDLM_FUSE_TRACE=1 adds the traceback).
    The eager function stays reachable as `__wrapped__` (for calls from inside another compiled
    function)."""
    compiled = None
    options = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, options
        while compiled is not False and args[0].is_cuda and os.environ.get("IDLM_FUSE", "1") != "0":
            if compiled is None:
                raise_dynamo_limits()
                compiled = torch.compile(fn, dynamic=True, options=options)
            try:
                return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # (errors of fn itself are raised as they are)
                retry = options is None
                logger.warning("compiling %s failed; %s: %s", fn.__qualname__,
                               "retrying with %s" % RETRY_OPTIONS if retry else "it runs eagerly from now on", e,
                               exc_info=os.environ.get("IDLM_FUSE_TRACE") == "1")
                compiled, options = (None, dict(RETRY_OPTIONS)) if retry else (False, options)
        return fn(*args)

    wrapper.fell_back = lambda: compiled is False
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
