"""Benchmarks: `offline` (engine throughput and per-request speed vs concurrency) and `latency`
(per-forward latency vs query tokens and batch size). Each prints one JSON object as its last line."""

import contextlib
import os


def environment(device) -> dict:
    """What every benchmark record starts with: the device's name ("cpu" off CUDA), torch and CUDA versions;
    with $IDLM_COMPILE_CACHE also what that compile cache gave this process (`compile_cache.from_env`:
    loaded now, saved at exit), since a warm-up or first-step time depends on it."""
    import torch

    from idlm.engine import compile_cache

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    cache = compile_cache.from_env()
    if cache is not None:
        record["compile_cache"] = cache
    return record


@contextlib.contextmanager
def environ_restored(names):
    """Environment variables `names` as they were before the block, whatever it set or removed (a driver
    timing several settings read from the environment, e.g. the attention kernel's knobs)."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sampling_attributes(values: dict):
    """`idlm.decoding.sampling` module attributes (e.g. VOCAB_CHUNK, CHUNKED_FROM) set to `values` while the block
    runs, then as they were: a driver timing the decode step's variants (the compiled step functions guard on
    them, so an engine built under other values compiles its steps again)."""
    from idlm.decoding import sampling

    old = {a: getattr(sampling, a) for a in values}
    try:
        for a, v in values.items():
            setattr(sampling, a, v)
        yield
    finally:
        for a, v in old.items():
            setattr(sampling, a, v)


def timed_before_profiled(stages: list[str], profiled: set[str]) -> list[str]:
    """A driver's stages with those that run torch.profiler (`profiled`) moved after the others, each group
    in its given order. Once a profiler with CUDA activity has run, CUPTI stays attached to the process and
    every later CUDA call pays for it: on the H200 a decode graph's launch took 80 µs instead of 5 µs for the
    rest of the process (session 28, docs/risd.md), so a step timed after a profile is ~0.08 ms slower and an
    R-ISD / AR step ratio measured there reads too low."""
    return [s for s in stages if s not in profiled] + [s for s in stages if s in profiled]


def save_record(record, name: str, out: str | None = None) -> str | None:
    """Write a benchmark record as <out>/<name> (JSON, atomically); `out` defaults to $OUT, where the device
    tool collects outputs; nothing without either. A driver calls it after every stage, so a run stopped by
    a time limit keeps what it measured. -> the path written, or None."""
    import json

    from idlm.atomic import atomic_write_text

    out = out or os.environ.get("OUT")
    if not out:
        return None
    path = os.path.join(out, name)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path
