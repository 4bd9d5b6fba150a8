"""Portable torch.compile caches: what one process compiled, saved to one file and loaded by the next.

Why: an engine compiles its fused decode steps (`idlm.layers.fused.cuda_fused`) the first time each
(stride, variant) runs, and an adaptive-stride engine warms every stride up before serving — 378 s for
idlm-tiny's eight strides on the H200 (docs/stride.md, attempt 10): minutes before a server answers, and
most of a 10-minute GPU call. torch keeps inductor's caches on local disk (`/tmp/torchinductor_<user>`),
so a restart on the same machine is faster already; a fresh machine (a container, the device tool's
machines) starts cold. `torch.compiler.save_cache_artifacts` serialises the cache entries this process
created (inductor's generated code and kernels, AOTAutograd's graphs) and `load_cache_artifacts` seeds
a new process's caches with them, so its compiles become cache hits (dynamo still traces each function).

The file is only a cache: it is tied to the torch version and the GPU it was made with, a mismatched or
damaged file costs nothing but the cold compile (a warning says why), and it is written atomically; a
path ending in ".gz" is gzip-compressed (the device tool brings back files of at most 16 MiB).

    IDLM_COMPILE_CACHE=/path/cache.bin python scripts/bench_stride.py   (loaded now, rewritten at exit)
"""

from __future__ import annotations

import atexit
import gzip
import os
import warnings
from pathlib import Path

from idlm.atomic import atomic_file

ENV = "IDLM_COMPILE_CACHE"
_ACTIVE: dict[str, dict] = {}  # path -> `load`'s summary, for the paths `from_env` set up in this process


def load(path: str | os.PathLike) -> dict:
    """Seed this process's compile caches from `path` -> {"loaded", "bytes", "entries", "error"}; a missing
    file is not an error (nothing loaded: the first run makes it)."""
    path = Path(path)
    if not path.is_file():
        return {"loaded": False, "bytes": 0, "entries": 0, "error": None}
    data = path.read_bytes()
    try:
        import torch

        info = torch.compiler.load_cache_artifacts(gzip.decompress(data) if path.suffix == ".gz" else data)
    except Exception as e:  # another torch version, a damaged file: compile cold, say why
        warnings.warn(f"compile cache {path} not loaded ({type(e).__name__}: {e}); compiling from scratch",
                      stacklevel=2)
        return {"loaded": False, "bytes": len(data), "entries": 0, "error": f"{type(e).__name__}: {e}"}
    if info is None:  # torch logs why (e.g. a checksum mismatch) and returns None
        warnings.warn(f"compile cache {path} not loaded (torch could not read it); compiling from scratch",
                      stacklevel=2)
        return {"loaded": False, "bytes": len(data), "entries": 0, "error": "unreadable"}
    return {"loaded": True, "bytes": len(data), "entries": _entries(info), "error": None}


def save(path: str | os.PathLike) -> dict:
    """Write the compile cache entries this process created or hit (torch records both) to `path`, atomically
    -> {"saved", "bytes" (as written), "entries"} ("saved" False: nothing was compiled)."""
    import torch

    got = torch.compiler.save_cache_artifacts()
    if got is None:
        return {"saved": False, "bytes": 0, "entries": 0}
    data, info = got
    if Path(path).suffix == ".gz":
        data = gzip.compress(data, compresslevel=6)
    with atomic_file(path, "wb") as f:
        f.write(data)
    return {"saved": True, "bytes": len(data), "entries": _entries(info)}


def from_env() -> dict | None:
    """With $IDLM_COMPILE_CACHE set: load it now and save back to it when the process exits (a run stopped by
    a time limit's SIGTERM does not reach the exit hook: run under `timeout -s INT` to keep its compiles).
    -> `load`'s summary, or None without the variable. Once per path and process (a driver that also runs
    the CLI in-process loads and saves it once)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    if path in _ACTIVE:
        return _ACTIVE[path]
    summary = _ACTIVE[path] = load(path)

    def _save() -> None:
        try:
            save(path)
        except Exception as e:  # a cache: never fail the run over it
            warnings.warn(f"compile cache {path} not saved ({type(e).__name__}: {e})", stacklevel=1)

    atexit.register(_save)
    return summary


def _entries(info) -> int:
    """How many cache entries a torch CacheInfo lists (over its kinds: inductor, triton, aot_autograd, ...)."""
    artifacts = getattr(info, "artifacts", None) or {}
    return sum(len(v) for v in artifacts.values())
