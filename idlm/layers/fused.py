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


def cuda_fused(fn):
    """`fn` compiled on CUDA (eager elsewhere, and eager for good after a compilation error, with one
    warning: a Triton or inductor problem on some machine must cost speed, never a request). The eager
    function stays reachable as `__wrapped__` (for calls from inside another compiled function)."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if compiled is not False and args[0].is_cuda and os.environ.get("IDLM_FUSE", "1") != "0":
            if compiled is None:
                raise_dynamo_limits()
                compiled = torch.compile(fn, dynamic=True)
            try:
                return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # (errors of fn itself are raised as they are)
                logger.warning("compiling %s failed; it runs eagerly from now on: %s", fn.__qualname__, e)
                compiled = False
        return fn(*args)

    return wrapper


def eager_fused(fn):
    """Run `fn` with every `cuda_fused` function in it eager (torch.compile's "force_eager" stance): for
    forwards outside CUDA graphs, where a compiled dynamic-shape call costs more host time than its eager
    kernels. The stance is entered per call (importing dynamo on first use, not at import time)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return wrapper
