"""`idlm bench latency`: the cost of one forward vs query tokens per request and batch size.

Every request holds `context` tokens of KV in the paged pool and feeds Q query tokens (Q = 1 is an
AR step, Q = 2N−1 an ISD step: 7 at N = 4), so a row of the table is exactly the engine's decode
forward at that (batch, Q): paged attention, vocabulary projection at every query position, the
CUDA graph when on GPU, plus an argmax and the one device-to-host copy of a step. Achieved memory
bandwidth counts the bytes a forward must read: all weights once plus each request's KV.

`bench_prefill` (`idlm bench prefill`) times the engine's chunked prefill of one long prompt (chunks of
`chunk` tokens, the engine's `max_num_batched_tokens`) up to its first token, and reports tokens/s and
the achieved TFLOP/s: 2 × tokens × the weight matmuls' elements (the LM head once per chunk: prefill
computes logits only at a chunk's last position) plus causal attention's 2 × layers × heads × head_dim
× tokens² (QKᵀ and PV over the causal half), as a fraction of `peak_tflops` when given.

With `roofline`, each row also gets its floors, measured in the same run (`idlm.bench.roofline`): the
GEMM-only CUDA graph of the model's own weight matmuls on the same B·Q rows (`gemm_floor_ms`,
`efficiency` = floor / latency) and the bytes the step must read at the device's measured copy
bandwidth (`bandwidth_floor_ms`, `bandwidth_efficiency`).
"""

from __future__ import annotations

import torch

from idlm.bench.roofline import copy_bandwidth, gemm_floor
from idlm.engine.block_manager import PageManager
from idlm.engine.calibrate import context_rows, hold_context, time_decode
from idlm.engine.model_runner import ModelRunner
from idlm.layers.paged_attention import PagedKVCache


@torch.no_grad()
def bench_latency(model, query_sizes: list[int], batch_sizes: list[int], context: int = 1024, iters: int = 20,
                  block_size: int = 16, cuda_graphs: bool = True, attention: str = "auto",
                  roofline: bool = False) -> list[dict]:
    cfg = model.config
    per_seq = -(-(context + max(query_sizes)) // block_size)
    num_blocks = per_seq * max(batch_sizes) + 1
    runner = ModelRunner(model, block_size, num_blocks, context + max(query_sizes), cuda_graphs=cuda_graphs,
                         max_num_seqs=max(batch_sizes), attention=attention)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token_bytes = PagedKVCache.bytes_per_block(cfg, 1, model.dtype)
    copy_bw = copy_bandwidth(runner.device) if roofline else None
    floors: dict[int, float] = {}
    results = []
    for B in batch_sizes:
        bm = PageManager(num_blocks, block_size, enable_prefix_caching=False)
        hold_context(bm, list(range(B)), context)
        for Q in query_sizes:
            rows = context_rows(bm, list(range(B)), context, Q)
            dt = sum(time_decode(runner, rows, Q, iters, warmup=3)) / iters
            bytes_read = weight_bytes + B * (context + Q) * kv_token_bytes
            row = {"batch": B, "query_len": Q, "context": context, "latency_ms": round(dt * 1e3, 4),
                   "tokens_per_s": round(B * Q / dt, 1), "bandwidth_gb_s": round(bytes_read / dt / 1e9, 1)}
            if roofline:
                if B * Q not in floors:
                    floors[B * Q] = gemm_floor(model, B * Q, iters=iters, cuda_graph=cuda_graphs)["seconds"]
                floor, bw_floor = floors[B * Q], bytes_read / copy_bw
                row.update(gemm_floor_ms=round(floor * 1e3, 4), efficiency=round(floor / dt, 3),
                           bandwidth_floor_ms=round(bw_floor * 1e3, 4), bandwidth_efficiency=round(bw_floor / dt, 3),
                           copy_gb_s=round(copy_bw / 1e9, 1))
            results.append(row)
    return results


def prefill_flops(cfg, tokens: int, chunks: int) -> int:
    """FLOPs of a causal prefill of `tokens` tokens in `chunks` chunks (see the module docstring)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    matmuls = 2 * tokens * cfg.num_hidden_layers * per_layer + 2 * chunks * h * cfg.vocab_size
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * tokens * tokens
    return matmuls + attention


@torch.no_grad()
def bench_prefill(model, prompt_len: int, chunk: int = 8192, iters: int = 3, peak_tflops: float | None = None,
                  attention: str = "auto") -> dict:
    """The engine's prefill of one prompt of `prompt_len` tokens in chunks of `chunk` (median of `iters`
    runs after a warm-up): seconds to its first token, tokens/s, TFLOP/s and the fraction of peak."""
    import statistics
    import time

    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    if prompt_len + 1 > model.config.max_position_embeddings:
        raise ValueError(f"prompt_len {prompt_len} does not fit the model's {model.config.max_position_embeddings} "
                         "positions")
    engine = LLMEngine(model, None, EngineConfig(decoder="ar", max_num_seqs=1, max_num_batched_tokens=chunk,
                                                 max_model_len=prompt_len + 1, attention=attention,
                                                 enable_prefix_caching=False))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    times = []
    for rep in range(iters + 1):
        sync()
        t0 = time.perf_counter()
        engine.run([prompt], params)
        sync()
        if rep:  # the first run warms up (kernel selection, allocations)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    chunks = -(-prompt_len // chunk)
    tflops = prefill_flops(model.config, prompt_len, chunks) / seconds / 1e12
    out = {"prompt_len": prompt_len, "chunk": chunk, "chunks": chunks, "seconds": round(seconds, 4),
           "tokens_per_s": round(prompt_len / seconds, 1), "tflops": float(f"{tflops:.4g}")}
    if peak_tflops:
        out.update(peak_tflops=peak_tflops, fraction_of_peak=float(f"{tflops / peak_tflops:.4g}"))
    return out
