"""How long the host takes to launch a decode step's CUDA graph, and which node types the graph holds.

Why it exists: in one `bench_risd.py profile` process on the H200 (session 28) the host's launch call of a
decode graph took 4 µs for the first graph and 30-83 µs for every graph after it. This script times the
engine's graphs in a process that never runs torch.profiler and lists their node kinds through the CUDA
runtime's graph API: they launch in 3-11 µs (105-360 kernel nodes, one small memcpy node, one root), so the
slow launches came from the profiler (CUPTI stays attached to the process; `idlm.bench.timed_before_profiled`):

  toy     graphs of K small kernels (K = 100, 350), alone and with one device-to-device memcpy node
          (a contiguous `copy_`): the host's launch call and replay + sync wall time
  engine  the decode graphs of AR and R-ISD ("select") on idlm-tiny-ar and a SmolLM2-135M shape (random
          weights), their cudaGraph_t kept: node types, root nodes, memcpy extents, clustered kernels (through
          the CUDA runtime's graph API), and each graph's launch call / replay + sync / back-to-back GPU time;
          KEEP=0: the graphs as the runner makes them (keep_graph=False), timings only

    python scripts/graph_launch.py toy,engine        (JSON lines, a summary last; $OUT/graph_launch.json)
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench import environment, save_record  # noqa: E402
from idlm.bench.profile import graph_times  # noqa: E402

results: dict = environment("cuda")
KEEP = os.environ.get("KEEP", "1") == "1"  # engine stage: graphs made with keep_graph=True (0: torch's default)


def stage_toy() -> dict:
    out = {}
    x = torch.zeros(1024, device="cuda")
    y = torch.empty_like(x)
    for k in (100, 350):
        for extra in ("none", "memcpy"):
            def body():
                for i in range(k):
                    x.add_(1.0)
                    if i == k // 2 and extra == "memcpy":
                        y.copy_(x)  # contiguous, same dtype: cudaMemcpyAsync -> a memcpy node
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            out[f"k{k}/{extra}"] = graph_times(g)
            print(json.dumps({f"toy/k{k}/{extra}": out[f"k{k}/{extra}"]}), flush=True)
    return out


def _cudart():
    """The CUDA runtime library this process loaded (torch's), through ctypes."""
    import ctypes

    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
    if not paths:
        raise RuntimeError("libcudart is not loaded in this process")
    return ctypes.CDLL(paths[0])


def graph_nodes(raw: int) -> dict:
    """Node kinds of a cudaGraph_t (cudaGraphGetNodes / cudaGraphNodeGetType), its root nodes, the extents of
    its memcpy nodes and how many kernel nodes carry a cluster dimension > 1."""
    import ctypes

    rt = _cudart()
    graph = ctypes.c_void_p(raw)
    n = ctypes.c_size_t(0)
    assert rt.cudaGraphGetNodes(graph, None, ctypes.byref(n)) == 0
    nodes = (ctypes.c_void_p * n.value)()
    assert rt.cudaGraphGetNodes(graph, nodes, ctypes.byref(n)) == 0
    roots = ctypes.c_size_t(0)
    assert rt.cudaGraphGetRootNodes(graph, None, ctypes.byref(roots)) == 0
    names = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
             7: "event_record", 8: "ext_sem_signal", 9: "ext_sem_wait", 10: "mem_alloc", 11: "mem_free",
             12: "batch_mem_op", 13: "conditional"}
    kinds: collections.Counter = collections.Counter()
    memcpy, clustered = [], 0

    class Params3D(ctypes.Structure):  # cudaMemcpy3DParms
        _fields_ = [("srcArray", ctypes.c_void_p), ("srcPos", ctypes.c_size_t * 3),
                    ("srcPtr", ctypes.c_void_p), ("srcPitch", ctypes.c_size_t), ("srcX", ctypes.c_size_t),
                    ("srcY", ctypes.c_size_t), ("dstArray", ctypes.c_void_p), ("dstPos", ctypes.c_size_t * 3),
                    ("dstPtr", ctypes.c_void_p), ("dstPitch", ctypes.c_size_t), ("dstX", ctypes.c_size_t),
                    ("dstY", ctypes.c_size_t), ("extent", ctypes.c_size_t * 3), ("kind", ctypes.c_int)]

    for node in nodes:
        t = ctypes.c_int(-1)
        assert rt.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)) == 0
        kinds[names.get(t.value, str(t.value))] += 1
        if t.value == 1:
            p = Params3D()
            if rt.cudaGraphMemcpyNodeGetParams(ctypes.c_void_p(node), ctypes.byref(p)) == 0:
                memcpy.append({"extent": list(p.extent), "kind": p.kind, "src": p.srcPtr, "dst": p.dstPtr})
        elif t.value == 0:
            value = (ctypes.c_uint * 16)()
            ok = rt.cudaGraphKernelNodeGetAttribute(ctypes.c_void_p(node), 4, value) == 0  # cluster dimension
            clustered += ok and value[0] * value[1] * value[2] > 1
    return {"nodes": dict(kinds), "roots": roots.value, "memcpy": memcpy[:8], "clustered_kernels": clustered}


def stage_engine() -> dict:
    from idlm.bench.offline import bench_prompts
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.models.loader import load_pretrained, resolve_model_path
    from idlm.models.random import random_model

    made: list = []
    base = torch.cuda.CUDAGraph

    class KeptGraph(base):  # every graph the runner captures (its cudaGraph_t kept for inspection with $KEEP=1)
        def __new__(cls, keep_graph: bool = False):
            return super().__new__(cls, KEEP)

        def __init__(self, keep_graph: bool = False):
            super().__init__(KEEP)
            made.append(self)

    out = {}
    torch.cuda.CUDAGraph = KeptGraph
    try:
        for name in ("idlm-tiny-ar", "smollm2-135m"):
            for dec in ("ar", "risd"):
                if name == "idlm-tiny-ar":
                    model, tok = load_pretrained(name, dtype="bfloat16", device="cuda")
                    lora = LoRAAdapter.load(resolve_model_path("idlm-tiny-ar-risd-lora"), model.config, device="cuda",
                                            dtype=model.dtype)
                    prompt = bench_prompts(tok, 1)[0]
                else:
                    model, tok = random_model(name, dtype="bfloat16", device="cuda"), None
                    lora = LoRAAdapter(model.config, LoRAConfig(rank=32)).init_weights(std=0.02, seed=0, zero_b=False)
                    lora, prompt = lora.to(device="cuda", dtype=model.dtype), list(range(100, 164))
                made.clear()
                eng = LLMEngine(model, tok, EngineConfig(decoder=dec, stride=4, max_num_seqs=1, num_pages=512),
                                lora=lora if dec == "risd" else None)
                eng.run([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
                graph = made[-1]
                timing = graph_times(graph)  # (replay instantiates a kept graph first)
                key = f"{name}/{dec}"
                out[key] = {"graphs": len(made), **timing,
                            **(graph_nodes(graph.raw_cuda_graph()) if KEEP else {})}
                print(json.dumps({key: out[key]}), flush=True)
    finally:
        torch.cuda.CUDAGraph = base
    return out


if __name__ == "__main__":
    stages = (sys.argv[1] if len(sys.argv) > 1 else "toy,engine").split(",")
    for st in stages:
        results[st] = {"toy": stage_toy, "engine": stage_engine}[st]()
        save_record(results, "graph_launch.json")
    print(json.dumps({"summary": True, **{k: v for k, v in results.items() if k in stages}}))
