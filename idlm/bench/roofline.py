"""The floor a decode step is measured against (SPEC §9; `idlm bench latency --roofline`).

A decode step of B requests × Q query tokens must at least run every weight matmul of the model on
B·Q rows: each layer's projections and the LM head. `gemm_floor` times exactly those matmuls, on the
model's own weights and with the same fusion as the engine (one [q; k; v] and one [gate; up] matmul per
layer where the model is fused), captured in one CUDA graph and replayed, so no attention,
norm, sampling or host work is in it: what is left between it and a measured step is what the engine
could still remove. `copy_bandwidth` measures the device's achievable memory bandwidth (a large
device-to-device copy, read + write bytes), which turns the bytes a step must read into a second
floor. On CPU both run eagerly (for tests; the numbers mean little there).
"""

from __future__ import annotations

import statistics
import time

import torch


def _time(fn, iters: int, sync) -> float:
    """Median seconds of fn() over iters calls (each synchronized)."""
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_gemm_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The weight of every matmul of one forward of `model`, as its decode step runs them: the fused
    [q; k; v] and [gate; up] copies where the model is fused, else the separate projections; then the
    LM head (the embedding when tied)."""
    out = []
    for li, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        attn = [("qkv", a.qkv[0])] if a.qkv is not None else [("q", a.q_proj.weight), ("k", a.k_proj.weight),
                                                                ("v", a.v_proj.weight)]
        mlp = [("gate_up", m.gate_up[0])] if m.gate_up is not None else [("gate", m.gate_proj.weight),
                                                                          ("up", m.up_proj.weight)]
        out += [(f"{n}.{li}", w) for n, w in attn + [("o", a.o_proj.weight)] + mlp + [("down", m.down_proj.weight)]]
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return out + [("lm_head", head)]


@torch.no_grad()
def gemm_floor(model, rows: int, iters: int = 20, cuda_graph: bool = True, seed: int = 0) -> dict:
    """Seconds of the model's weight matmuls alone on `rows` = B·Q rows (median of `iters` replays of one
    CUDA graph holding them all, on CUDA), on the model's own weights, with the bytes they read."""
    weights = model_gemm_weights(model)
    device, dtype = weights[0][1].device, weights[0][1].dtype
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = {k: torch.randn(rows, k, generator=g, device=device).to(dtype)
              for k in {w.shape[1] for _, w in weights}}
    outs = [torch.empty(rows, w.shape[0], device=device, dtype=dtype) for _, w in weights]

    def run():
        for (_, w), out in zip(weights, outs):
            torch.mm(inputs[w.shape[1]], w.t(), out=out)

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn = run
    if cuda and cuda_graph:
        from idlm.bench.profile import capture

        fn = capture(run).replay
    for _ in range(3):
        fn()
    seconds = _time(fn, iters, sync)
    return {"rows": rows, "seconds": seconds, "gemms": len(weights),
            "weight_bytes": sum(w.numel() * w.element_size() for _, w in weights),
            "flops": 2 * rows * sum(w.numel() for _, w in weights)}


@torch.no_grad()
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Achievable memory bandwidth in bytes/s: a device-to-device copy of nbytes, counting the bytes read
    and the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        dst.copy_(src)
    seconds = _time(lambda: dst.copy_(src), iters, sync)
    return 2 * src.numel() * src.element_size() / seconds
