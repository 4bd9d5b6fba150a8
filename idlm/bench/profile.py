"""Profiles of engine decode steps (torch.profiler) summarised per step, for the GPU drivers in scripts/.

`profile_steps` runs an engine's next `steps` steps under the profiler (CUDA activity where the engine
is on CUDA) and returns the profile and the decode wall time per step; `summarize` turns it into the
per-step numbers the drivers report: GPU kernel time and kernel count, the costliest kernels and the
costliest host operations.
"""

from __future__ import annotations

import torch


def profile_steps(engine, steps: int):
    """(profiler, decode ms per step) over the engine's next `steps` steps (its requests must last them)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    f0, t0 = engine.counters["decode_forwards"], engine.counters["decode_time_s"]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    step_ms = 1e3 * (engine.counters["decode_time_s"] - t0) / max(1, engine.counters["decode_forwards"] - f0)
    return prof, step_ms


def capture(fn, warmup: int = 2):
    """`fn` captured in a CUDA graph (-> torch.cuda.CUDAGraph), after `warmup` calls on a side stream (compiles,
    kernel choices, lazy allocations: nothing of that may happen during the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_times(graph, reps: int = 50) -> dict:
    """A captured CUDA graph timed three ways (medians, ms): `gpu_ms` back-to-back replays (CUDA events: the
    GPU's time alone), `replay_call_ms` the host's launch call of one replay, `replay_sync_ms` one replay and
    its sync (wall: what a step that waits for its graph pays). Run it before any torch.profiler session of
    the process: CUPTI slows every later launch (`idlm.bench.timed_before_profiled`)."""
    import statistics
    import time

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    call, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        call.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return {"gpu_ms": round(start.elapsed_time(end) / reps, 4),
            "replay_call_ms": round(1e3 * statistics.median(call), 4),
            "replay_sync_ms": round(1e3 * statistics.median(wall), 4)}


def summarize(prof, steps: int, top_kernels: int = 10, top_host: int = 14, counts: bool = False) -> dict:
    """Per-step GPU kernel time (ms) and kernel count, the top kernels (µs per step; counts: [µs, launches]
    per step) and the top host ops ([µs per step, calls per step]) of a profile of `steps` steps."""
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    return {
        "gpu_kernel_ms_per_step": round(sum(e.self_device_time_total for e in kernels) / steps / 1e3, 4),
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "top_kernels_us_per_step": {e.key[:120 if counts else 70]: (
            [round(e.self_device_time_total / steps, 1), e.count / steps] if counts
            else round(e.self_device_time_total / steps, 1))
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top_kernels]},
        "top_host_us_per_step": {e.key[:70]: [round(e.self_cpu_time_total / steps, 1), e.count / steps]
                                 for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top_host]},
    }
