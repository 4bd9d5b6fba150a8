"""Runs the model for the engine: builds flat padded batches over the paged KV pool, and replays
CUDA graphs for decode steps.

A forward takes rows (one per request) of T query tokens each, right-padded to one T: tokens at
positions start..start+n−1, written at the slots the block manager maps them to (padding writes the
pool's trash slot). Prefill chunks run eagerly; only the last token's hidden state of a finished
prompt goes through the vocabulary projection. A decode step of a fused decoder (AR, ISD, R-ISD)
is forward + logits + the decoder's `compute` (sampling, verification) in one function; on CUDA it
is captured once per (batch bucket, Q, page bucket, decoder options) and replayed, so one step is
a few host-to-device copies, one graph launch and one device-to-host copy (the packed results).
The KV pool is sized from free GPU memory (`gpu_memory_utilization`) or given as `num_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.layers.paged_attention import PagedAttention, PagedKVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class Row:
    """One request's query tokens for a forward."""
    tokens: list[int]
    start: int  # position of tokens[0]
    slots: list[int]  # physical KV slots of the tokens
    block_table: list[int]  # page ids covering positions 0..start+len(tokens)-1
    is_mask: list[bool] | None = None  # R-ISD: MASK slots take the adapter's MASK embedding
    gate: list[bool] | None = None  # R-ISD: LoRA gate
    visible: list[int] | None = None  # block-bidirectional attention (SDAR); None = causal


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    return n


def _pow2_at_least(n: int, floor: int = 4) -> int:
    m = floor
    while m < n:
        m *= 2
    return m


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int | None, max_model_len: int, lora=None,
                 gpu_memory_utilization: float = 0.85, cuda_graphs: bool = True, max_num_seqs: int = 256):
        self.model, self.lora = model, lora
        self.config = cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        self.max_pages = -(-(max_model_len + 64) // block_size)  # + room for a decode block past the end
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(gpu_memory_utilization)
        self.kv = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                               cfg.head_dim, self.dtype, self.device)
        self.num_blocks = num_blocks
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

    def _blocks_from_memory(self, utilization: float) -> int:
        per_block = PagedKVCache.bytes_per_block(self.config, self.block_size, self.dtype)
        if self.device.type != "cuda":
            return max(64, min(4096, (1 << 30) // per_block))  # CPU: up to 1 GiB of KV
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - utilization) * total - (1 << 30)  # keep 1 GiB for activations and graphs
        if budget < per_block * 16:
            raise MemoryError(f"not enough free GPU memory for a KV cache ({free / 2**30:.1f} GiB free)")
        return int(budget // per_block)

    # ----------------------------------------------------------------- batch tensors

    def _tensors(self, rows: list[Row], T: int, B: int, M: int) -> dict[str, torch.Tensor]:
        """Right-padded host tensors for B >= len(rows) rows of T tokens and M block-table entries."""
        trash = self.kv.trash_slot
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        slots = torch.full((B, T), trash, dtype=torch.long)
        tables = torch.zeros(B, M, dtype=torch.long)
        starts = torch.zeros(B, dtype=torch.long)
        out = {"tokens": tokens, "positions": positions, "slots": slots, "tables": tables, "starts": starts}
        if any(r.is_mask is not None for r in rows):
            out["is_mask"] = torch.zeros(B, T, dtype=torch.bool)
            out["gate"] = torch.zeros(B, T, dtype=torch.bool)
        if any(r.visible is not None for r in rows):
            out["visible"] = torch.arange(T).repeat(B, 1)
        for b, r in enumerate(rows):
            n = len(r.tokens)
            tokens[b, :n] = torch.tensor(r.tokens)
            positions[b] = r.start + torch.arange(T)
            slots[b, :n] = torch.tensor(r.slots)
            tables[b, : len(r.block_table)] = torch.tensor(r.block_table)
            starts[b] = r.start
            if r.is_mask is not None:
                out["is_mask"][b, :n] = torch.tensor(r.is_mask)
                out["gate"][b, :n] = torch.tensor(r.gate if r.gate is not None else [False] * n)
            if r.visible is not None:
                out["visible"][b, :n] = torch.tensor(r.visible)
        return out

    def _forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tensors of `_tensors` (on the device) -> hidden [B, T, H]."""
        attn = PagedAttention(self.kv, t["slots"], t["tables"], t["starts"], t.get("visible"))
        kwargs = {}
        if "is_mask" in t and self.lora is not None:
            kwargs = dict(lora=self.lora, lora_gate=t["gate"], is_mask=t["is_mask"])
        return self.model(t["tokens"], t["positions"], attn, **kwargs)

    def _pages(self, rows: list[Row]) -> int:
        return max(len(r.block_table) for r in rows)

    # ----------------------------------------------------------------- entry points

    @torch.no_grad()
    def forward_logits(self, rows: list[Row], last_only: bool = True) -> torch.Tensor:
        """Eager forward (prefill chunks, non-fused decoders): logits [B, V] at each row's last token,
        or [B, T, V] at every position with last_only=False."""
        T = max(len(r.tokens) for r in rows)
        t = {k: v.to(self.device) for k, v in self._tensors(rows, T, len(rows), self._pages(rows)).items()}
        hidden = self._forward(t)
        if not last_only:
            return self.model.compute_logits(hidden)
        last = torch.tensor([len(r.tokens) - 1 for r in rows], device=self.device)
        return self.model.compute_logits(hidden[torch.arange(len(rows), device=self.device), last])

    @torch.no_grad()
    def decode(self, rows: list[Row], decoder, tensors: dict[str, torch.Tensor], static: dict):
        """One fused decode step: rows of Q tokens each -> decoder.compute's (packed [B, F], extra)."""
        B, Q = len(rows), len(rows[0].tokens)
        if not self.use_graphs:
            t = {k: v.to(self.device) for k, v in self._tensors(rows, Q, B, self._pages(rows)).items()}
            return decoder.compute(self.model.compute_logits(self._forward(t)), tensors, **static)
        Bp = _bucket(B, self.batch_buckets)
        M = min(_pow2_at_least(self._pages(rows)), self.max_pages)
        host = self._tensors(rows, Q, Bp, M)
        key = (Bp, Q, M, decoder.name, getattr(decoder, "stride", 1), tuple(sorted(static.items())),
               tuple(sorted(tensors)), tuple(sorted(host)))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(decoder, host, tensors, static, Bp)
        graph, inputs, (packed, extra) = entry
        for k, v in host.items():
            inputs[k].copy_(v, non_blocking=True)
        for k, v in tensors.items():
            inputs["dec." + k][:B].copy_(v)
        graph.replay()
        return packed[:B], (None if extra is None else extra[:B])

    def _capture(self, decoder, host, tensors, static, Bp):
        inputs = {k: v.to(self.device) for k, v in host.items()}
        for k, v in tensors.items():  # pad rows past B with copies of row 0 (valid values; ignored)
            pad = v[:1].expand(Bp - v.shape[0], *v.shape[1:])
            inputs["dec." + k] = torch.cat([v, pad]).contiguous()

        def run():
            dec = {k[4:]: v for k, v in inputs.items() if k.startswith("dec.")}
            return decoder.compute(self.model.compute_logits(self._forward(inputs)), dec, **static)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (kernel selection, lazy init) outside the graph
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = run()
        self._pool = graph.pool()
        return graph, inputs, outputs
