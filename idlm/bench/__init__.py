"""Benchmarks: `offline` (engine throughput and per-request speed vs concurrency) and `latency`
(per-forward latency vs query tokens and batch size). Each prints one JSON object as its last line."""


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


def save_record(record, name: str, out: str | None = None) -> str | None:
    """Write a benchmark record as <out>/<name> (JSON, atomically); `out` defaults to $OUT, where the device
    tool collects outputs; nothing without either. A driver calls it after every stage, so a run stopped by
    a time limit keeps what it measured. -> the path written, or None."""
    import json
    import os

    from idlm.atomic import atomic_write_text

    out = out or os.environ.get("OUT")
    if not out:
        return None
    path = os.path.join(out, name)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path
