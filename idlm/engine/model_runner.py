"""Runs the model for the engine: builds flat padded batches over the paged KV pool, and replays
CUDA graphs for decode steps.

A forward takes rows (one per request) of T query tokens each, right-padded to one T: tokens at
positions start..start+n−1, written at the slots the block manager maps them to (padding writes the
pool's trash slot). Prefill chunks come as `Row`s; a decode step as one `DecodeBatch` of host arrays
(the engine builds it without per-request objects: `PageManager.decode_mapping`, `Decoder.blocks`).
Prefill chunks run eagerly; only the last token's hidden state of a finished prompt goes through the
vocabulary projection (plus, for requests that want prompt logprobs, the prompt positions they still
need). A decode step of a fused decoder (AR, ISD, R-ISD) is forward + logits + the decoder's `compute`
(sampling, verification) in one function; on CUDA it is captured once per (batch bucket, Q, page
bucket, decoder options — incl. the static logprobs width, so steps without logprobs keep their own
graphs) and replayed, so one step is a few host-to-device copies, one graph launch and one
device-to-host copy (the packed results). `decode_next` continues the last graph step without the host: a
second graph per step graph forms the next inputs from the last output on the device, then runs the step
(the engine's overlapped steps).
The KV pool is sized from free GPU memory (`gpu_memory_utilization`; on CPU from what the model and
`max_num_seqs` requests of `max_model_len` need, at most 1 GiB) or given as `num_pages`.
Decode steps attend over the pool with the Triton paged kernel on CUDA (`attention="auto"`); prefill
chunks, and every step elsewhere, take the gather + SDPA reference path. On CUDA every model runs q/k/v
and gate/up as two fused matmuls per layer (`fuse_projections`: the parameters become slices of the
fused weights, so no memory is added), and an R-ISD adapter is folded into the projections
(`Transformer.fuse_lora`, layout `lora_layout`: [x, g·x] times [W | D], x times [W ; W + D], or W and the
low-rank factors in one Triton kernel; "auto": `resolve_lora_layout`) when those copies take ≤ 1 GiB, so an
R-ISD step runs as many matmuls as an AR step.
`exact=True` (issue 16) runs every forward, prefill chunks included, through the batch-invariant matmul
and the paged kernel's exact variant (and the compiled elementwise kernels in prefill too), so a
token row's values do not depend on the batch, its query block or its prefill chunk.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from idlm.decoding.logprobs import score as score_logprobs
from idlm.errors import ConfigError
from idlm.layers.fused import cat_columns, cuda_fused, eager_fused
from idlm.layers.lora_kernel import choose_lora_layout
from idlm.layers.paged_attention import PagedAttention, PagedKVCache
from idlm.layers.paged_kernel import head_dim_supported, triton_usable

SCORE_CHUNK = 512  # prompt positions per vocabulary projection when scoring prompt logprobs (bounds memory)
FUSE_MAX_BYTES = 1 << 30  # auto-fold an R-ISD adapter ([W | D] copies of the projections) up to this
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


@dataclass
class DecodeBatch:
    """A decode step's rows as host arrays: Q query tokens per request, row b = one request."""
    tokens: np.ndarray  # [B, Q] int64
    starts: np.ndarray  # [B] int64, position of tokens[:, 0]
    slots: np.ndarray  # [B, Q] int64, physical KV slots of the tokens
    tables: np.ndarray  # [B, M] int64, page ids covering positions 0..start+Q−1 (padded with page 0)
    is_mask: np.ndarray | None = None  # [B, Q] bool (R-ISD)
    gate: np.ndarray | None = None  # [B, Q] bool (R-ISD; None: all off)
    visible: np.ndarray | None = None  # [B, Q] int64 (SDAR; None: causal)
    # a tree of query rows (ISD's rejection branches): token i of a row sits at position start + offsets[b, i]
    # (None: start + i) and does not see the block's tokens hide[b, i, 0] <= j < hide[b, i, 1]
    offsets: np.ndarray | None = None  # [B, Q] int64
    hide: np.ndarray | None = None  # [B, Q, 2] int64

    @classmethod
    def from_rows(cls, rows: list[Row]) -> "DecodeBatch":
        """Rows of one length Q as a batch (same padding as the prefill path)."""
        tables = np.zeros((len(rows), max(len(r.block_table) for r in rows)), dtype=np.int64)
        for b, r in enumerate(rows):
            tables[b, : len(r.block_table)] = r.block_table
        q = len(rows[0].tokens)

        def optional(name, default, dtype):
            if all(getattr(r, name) is None for r in rows):
                return None
            return np.array([default if getattr(r, name) is None else getattr(r, name) for r in rows], dtype=dtype)

        def ints(values) -> np.ndarray:
            return np.array(values, dtype=np.int64)

        return cls(ints([r.tokens for r in rows]), ints([r.start for r in rows]), ints([r.slots for r in rows]), tables,
                   optional("is_mask", [False] * q, bool), optional("gate", [False] * q, bool),
                   optional("visible", list(range(q)), np.int64))


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


# the kernel path's smallest decode block table (pages): with 16-token pages, contexts up to 1024 tokens
KERNEL_TABLE_PAGES = 64
CPU_FULL_REQUESTS = 4  # CPU KV pool: room for this many full-length requests (see ModelRunner._cpu_blocks)
CPU_KV_MAX_BYTES = 1 << 30


def resolve_lora_layout(layout: str, model, lora, exact: bool = False) -> str:
    """The fused-LoRA layout to build: `layout` itself, or for "auto" `choose_lora_layout`'s pick from the step's
    weight bytes and the GPU's L2 ("select" off the GPU, without Triton, and in exact mode, where the
    batch-invariant matmuls replace the kernel)."""
    if layout != "auto":
        return layout
    if exact or model.device.type != "cuda" or not triton_usable(model.device):
        return "select"
    step = model.lora_step_bytes(lora)
    l2 = torch.cuda.get_device_properties(model.device).L2_cache_size
    return choose_lora_layout(step["select"], step["lowrank"], l2)


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int | None, max_model_len: int, lora=None,
                 gpu_memory_utilization: float = 0.85, cuda_graphs: bool = True, max_num_seqs: int = 256,
                 attention: str = "auto", fuse_projections: bool | None = None, max_query_len: int = 1,
                 exact: bool = False, lora_layout: str = "auto"):
        self.model, self.lora, self.exact = model, lora, exact
        self.attn_kernel = _use_kernel(attention, model.device)
        if exact and not triton_usable(model.device):
            raise ConfigError("exact mode needs the Triton kernels: a CUDA device with triton installed "
                              "(or TRITON_INTERPRET=1 on CPU, for tests)")
        if exact and not head_dim_supported(model.config.head_dim):
            raise ConfigError(f"exact mode's attention kernel needs a head dim that is a power of two >= 16; "
                              f"this model's is {model.config.head_dim}")
        if fuse_projections is None:  # auto: on CUDA (fusing costs no memory); R-ISD if its [W | D] copies are small
            fuse_projections = model.device.type == "cuda" and (
                lora is None or model.fusable_bytes(lora=True) <= FUSE_MAX_BYTES)
        self.lora_layout = None  # the fused LoRA's layout built (None: no adapter, or not fused)
        if fuse_projections:
            model.fuse_projections()
            if lora is not None:  # R-ISD: the gated LoRA folded into the projections (as many matmuls as AR)
                self.lora_layout = resolve_lora_layout(lora_layout, model, lora, exact)
                model.fuse_lora(lora, self.lora_layout)
        self.config = cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        # a request's last decode block may reach max_query_len − 1 positions past max_model_len
        self.max_pages = -(-(max_model_len + max_query_len) // block_size)
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(gpu_memory_utilization, max_num_seqs)
        self.kv = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                               cfg.head_dim, self.dtype, self.device)
        self.num_blocks = num_blocks
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        # without graphs, still pass a decode step's inputs as the graph path does (strided views into packed
        # buffers): lets CPU tests run the graph path's input layout through the kernels (set by tests)
        self.packed_inputs = False
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        # a decode graph's block-table width: a power of two >= this many pages. The kernel reads only the
        # entries a row uses, so its graphs take a wide floor (one graph serves every context up to
        # KERNEL_TABLE_PAGES pages instead of one per doubling); gather + SDPA reads every entry: narrow
        self.min_table = KERNEL_TABLE_PAGES if self.attn_kernel else 4
        self._graphs: dict[tuple, _Graph] = {}
        self._last: tuple | None = None  # (graph, rows, decoder) of the last graph step (`decode_next`)
        self._captures = 0  # step graphs and chained steps' graphs captured (`graphs_captured`)
        self._pool = None

    def bucket(self, batch: int) -> int:
        """The padded batch size a decode step of `batch` rows runs at (its CUDA graph's)."""
        return _bucket(batch, self.batch_buckets)

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far, chained steps' too (a step that captures one also compiles its kernels:
        seconds, not milliseconds, so timing-based decisions skip it)."""
        return self._captures

    def _blocks_from_memory(self, utilization: float, max_num_seqs: int) -> int:
        """Pages for the KV pool: `utilization` of the free device memory (less 512 MiB for activations
        and graphs), at most what max_num_seqs requests of full length can use. CPU: `_cpu_blocks`."""
        per_block = PagedKVCache.bytes_per_block(self.config, self.block_size, self.dtype)
        cap = max_num_seqs * self.max_pages
        if self.device.type != "cuda":
            return self._cpu_blocks(per_block, cap, max_num_seqs)
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = free * utilization - (512 << 20)
        if budget < per_block * self.max_pages:
            raise MemoryError(f"not enough free GPU memory for a KV cache of one full-length request "
                              f"({free / 2**30:.1f} GiB free)")
        return int(min(cap, budget // per_block))

    def _cpu_blocks(self, per_block: int, cap: int, max_num_seqs: int) -> int:
        """CPU pages, sized to the model rather than to a fixed 1 GiB (which made a 14.6 M model's server
        take 1.5 GB): room for min(max_num_seqs, CPU_FULL_REQUESTS) full-length requests or as many bytes
        as the weights take, whichever is more, never above what max_num_seqs full-length requests can
        use nor above 1 GiB (but always one full-length request). A CPU decodes few long requests at a
        time; when the pool runs out the engine preempts and recomputes, so outputs do not change."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        want = max(min(max_num_seqs, CPU_FULL_REQUESTS) * self.max_pages, weights // per_block)
        ceiling = max(self.max_pages, CPU_KV_MAX_BYTES // per_block)
        return max(16, min(cap, want, ceiling))

    # ----------------------------------------------------------------- batch tensors

    def _tensors(self, rows: list[Row], T: int, B: int, M: int) -> dict[str, torch.Tensor]:
        """Right-padded host tensors for B >= len(rows) rows of T tokens and M block-table entries
        (built in numpy: a few microseconds per row)."""
        n_rows = len(rows)
        tokens = np.zeros((B, T), dtype=np.int64)
        slots = np.full((B, T), self.kv.trash_slot, dtype=np.int64)
        tables = np.zeros((B, M), dtype=np.int64)
        starts = np.zeros(B, dtype=np.int64)
        starts[:n_rows] = [r.start for r in rows]
        for b, r in enumerate(rows):
            n = len(r.tokens)
            tokens[b, :n] = r.tokens
            slots[b, :n] = r.slots
            tables[b, : len(r.block_table)] = r.block_table
        out = {"tokens": tokens, "positions": starts[:, None] + np.arange(T), "slots": slots, "tables": tables,
               "starts": starts}
        if any(r.is_mask is not None for r in rows):
            out["is_mask"] = np.zeros((B, T), dtype=bool)
            out["gate"] = np.zeros((B, T), dtype=bool)
            for b, r in enumerate(rows):
                out["is_mask"][b, : len(r.tokens)] = r.is_mask
                out["gate"][b, : len(r.tokens)] = r.gate if r.gate is not None else False
        if any(r.visible is not None for r in rows):
            out["visible"] = np.tile(np.arange(T), (B, 1))
            for b, r in enumerate(rows):
                if r.visible is not None:
                    out["visible"][b, : len(r.tokens)] = r.visible
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def _batch_tensors(self, batch: DecodeBatch, B: int, M: int) -> dict[str, torch.Tensor]:
        """`_tensors` of a decode batch, padded to B >= its rows and M >= its table width."""
        return {k: torch.from_numpy(v) for k, v in self._batch_arrays(batch, B, M).items()}

    def _batch_arrays(self, batch: DecodeBatch, B: int, M: int) -> dict[str, np.ndarray]:
        """`_batch_tensors` as numpy arrays (what a graph replay copies into its staging buffers)."""
        n, Q = batch.tokens.shape

        def pad(a: np.ndarray, fill, width: int | None = None) -> np.ndarray:
            out = np.full((B, width or a.shape[1]), fill, dtype=a.dtype)
            out[:n, : a.shape[1]] = a
            return out

        starts = np.zeros(B, dtype=np.int64)
        starts[:n] = batch.starts
        def per_index(a: np.ndarray | None) -> np.ndarray:  # [B, Q] of a's rows, padded rows (and a None) 0..Q−1
            out = np.tile(np.arange(Q), (B, 1))
            if a is not None:
                out[:n] = a
            return out

        out = {"tokens": pad(batch.tokens, 0), "positions": starts[:, None] + per_index(batch.offsets),
               "slots": pad(batch.slots, self.kv.trash_slot), "tables": pad(batch.tables, 0, M), "starts": starts}
        if batch.is_mask is not None:
            out["is_mask"] = pad(batch.is_mask, False)
            out["gate"] = pad(batch.gate, False) if batch.gate is not None else np.zeros((B, Q), dtype=bool)
        if batch.visible is not None:
            out["visible"] = per_index(batch.visible)
        if batch.hide is not None:
            out["hide"] = np.zeros((B, Q, 2), dtype=np.int64)  # padded rows: lo = hi, nothing hidden
            out["hide"][:n] = batch.hide
        return out

    def _forward(self, t: dict[str, torch.Tensor], kernel: bool = False,
                 host_rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Tensors of `_tensors` (on the device) -> hidden [B, T, H]. kernel: attention through the Triton
        kernel (decode steps; prefill chunks of every length take the reference path, so the kernel
        is compiled for a few decode block shapes only)."""
        attn = PagedAttention(self.kv, t["slots"], t["tables"], t["starts"], t.get("visible"), kernel=kernel,
                              exact=self.exact, host_rows=host_rows, hide=t.get("hide"))
        kwargs = {}
        if "is_mask" in t and self.lora is not None:
            kwargs = dict(lora=self.lora, lora_gate=t["gate"], is_mask=t["is_mask"])
        return self.model(t["tokens"], t["positions"], attn, exact=self.exact, **kwargs)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden, exact=self.exact)

    def _pages(self, rows: list[Row]) -> int:
        return max(len(r.block_table) for r in rows)

    # ----------------------------------------------------------------- entry points

    # Eager forwards run the eager versions of the `cuda_fused` functions: a compiled dynamic-shape call
    # costs ~0.24 ms of host time (guards, wrappers) against ~0.03 ms eager, and prefill chunks are not
    # CUDA graphs (measured on an H200: scripts/bench_risd.py churn, docs/runs/risd/smollm2_pilot/).
    @torch.no_grad()
    @eager_fused
    def forward_logits(self, rows: list[Row], last_only: bool = True, score: dict | None = None):
        """Eager forward (prefill chunks, non-fused decoders): logits [B, V] at each row's last token,
        or [B, T, V] at every position with last_only=False.

        score = {row index: (first, targets, k)} (prompt logprobs) also scores that row's positions
        first..first+len(targets)−1 against `targets` (the tokens they predict): the vocabulary
        projection runs on those positions only, SCORE_CHUNK at a time. Then returns (logits,
        {row index: (logprobs, top-k lists)})."""
        T = max(len(r.tokens) for r in rows)
        t = {k: v.to(self.device) for k, v in self._tensors(rows, T, len(rows), self._pages(rows)).items()}
        hidden = self._forward(t, host_rows=[(r.start, len(r.tokens)) for r in rows])
        if not last_only:
            return self._logits(hidden)
        last = torch.tensor([len(r.tokens) - 1 for r in rows], device=self.device)
        logits = self._logits(hidden[torch.arange(len(rows), device=self.device), last])
        if score is None:
            return logits
        scored = {}
        for i, (first, targets, k) in score.items():
            lps, tops = [], []
            for a in range(0, len(targets), SCORE_CHUNK):
                part = targets[a: a + SCORE_CHUNK]
                lp, top = score_logprobs(self._logits(hidden[i, first + a: first + a + len(part)]),
                                         part, k)
                lps += lp
                tops += top
            scored[i] = (lps, tops)
        return logits, scored

    @torch.no_grad()
    def decode_logits(self, batch: DecodeBatch) -> torch.Tensor:
        """Eager decode forward (non-fused decoders): logits [B, Q, V] at every query position."""
        host = self._batch_tensors(batch, len(batch.tokens), batch.tables.shape[1])
        t = {k: v.to(self.device) for k, v in host.items()}
        return self._logits(self._forward(t))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch | list[Row], decoder, tensors: dict[str, torch.Tensor], static: dict,
               defer: bool = False):
        """One fused decode step: a batch (or rows) of Q tokens each -> decoder.compute's (packed [B, F], extra).
        `tensors` are decoder.step_inputs' (host or device tensors with B rows). defer (graph path): return a
        `PendingStep` at once instead, its packed rows on their way to the host, and keep the graph as the one
        `decode_next` continues from."""
        if defer and not self.use_graphs:
            raise ValueError("a deferred decode step needs the graph path (use_graphs)")
        if not isinstance(batch, DecodeBatch):
            batch = DecodeBatch.from_rows(batch)
        (B, Q), pages = batch.tokens.shape, batch.tables.shape[1]
        if not self.use_graphs:
            if self.packed_inputs:  # the graph path's input layout (views into packed buffers), no graph
                host = self._batch_tensors(batch, B, pages)
                on_host, on_device = _decoder_inputs(tensors)
                host.update(on_host)
                layout, _, buffers = _pack(host, B, self.device, pin=False)
                return self._packed_step(decoder, _unpack(layout, buffers, on_device, B), static)
            t = {k: v.to(self.device) for k, v in self._batch_tensors(batch, B, pages).items()}
            dec = {k: v.to(self.device) for k, v in tensors.items()}
            return self._device_step(decoder, t, dec, static)
        Bp = self.bucket(B)
        M = min(_pow2_at_least(pages, self.min_table), self.max_pages)
        host: dict = self._batch_arrays(batch, Bp, M)  # numpy, Bp rows; the decoder's B rows are padded in `_fill`
        on_host, on_device = _decoder_inputs(tensors)
        host.update(on_host)
        key = (Bp, Q, M, decoder.name, decoder.stride, tuple(sorted(static.items())),
               tuple(sorted(host)), tuple(sorted(on_device)))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(decoder, host, on_device, static, Bp)
            self._captures += 1
        _fill(g.views, g.layout, host, Bp, g.filled)
        for group in g.layout:  # one host-to-device copy per dtype group
            g.buffers[group].copy_(g.staging[group], non_blocking=True)
        for k, v in on_device.items():
            g.dev_inputs[k][:B].copy_(v)
        g.graph.replay()
        self._last = (g, B, decoder)
        if defer:
            return self._pending(g, B)
        packed, extra = g.outputs
        return packed[:B], (None if extra is None else extra[:B])

    @torch.no_grad()
    def decode_next(self, decoder, tables: np.ndarray | None = None, padding: list[int] | None = None
                    ) -> "PendingStep":
        """Launch the step after the last graph step (`decode`, `decode_next`) of the same rows and decoder
        without waiting for its results: one more graph (`_chain_step`, captured on first use) forms the
        inputs that follow from the last output on the device and runs the step. tables: [B, M'] the rows'
        page tables when a page was added since (M' <= `table_width`), else None. padding: rows (< B) that
        run on as padding rows from this step on (a request that ended: its KV slots become the trash slot,
        so it writes no page it no longer owns; `advanced_inputs` keeps a padding row's). -> its `PendingStep`."""
        if self._last is None or self._last[2] is not decoder:
            raise ValueError(f"decode_next continues the last graph step of the same decoder; the last was "
                             f"{None if self._last is None else self._last[2].name!r}")
        g, B, _ = self._last
        for b in padding or ():  # (stream-ordered after the step in flight, which still reads these inputs)
            if not 0 <= b < B:
                raise ValueError(f"padding row {b} is not one of the step's {B} rows")
            g.raw["slots"][b].fill_(self.kv.trash_slot)  # (a view of the graph's int64 input buffer)
        if tables is not None:
            if tables.shape[1] > self.table_width:
                raise ValueError(f"{tables.shape[1]} pages exceed the graph's table width {self.table_width}")
            tables = torch.from_numpy(_pad_cols(tables, self.table_width))
            if g.tables_pinned is not None:  # through the one of two pinned buffers no copy in flight reads
                g.flip_tables ^= 1
                tables = g.tables_pinned[g.flip_tables][:B].copy_(tables)
            g.buffers["t"][:B].copy_(tables, non_blocking=True)  # (rows 0..B−1: padding rows keep theirs)
        if g.chain is None:
            g.chain = self._capture_chain(g, decoder)
            self._captures += 1
        g.chain.replay()
        return self._pending(g, B)

    def chained_inputs(self, g: "_Graph", decoder):
        """-> a function that writes the inputs of the step after graph `g`'s last one into `g`'s input buffers,
        on the device: the int64 inputs from the last output (`advanced_inputs`, one compiled function on
        CUDA) and, for a sampled ISD step, the drafts' q̃ (the last step's output; a device input, on CPU a
        packed one)."""
        cols, trash, bs = g.layout["i"], self.kv.trash_slot, self.block_size
        kept = g.dev_inputs.get("dec.q_old", g.raw.get("dec.q_old"))

        def write():
            g.buffers["i"].copy_(advanced_inputs(g.outputs[0], g.buffers["i"], g.buffers["t"], decoder, cols, trash,
                                                 bs))
            if kept is not None:
                kept.copy_(g.outputs[1][:, : kept.shape[1]])

        return write

    def _chain_step(self, g: "_Graph", decoder):
        """The function a chained step's graph runs: the next step's inputs (`chained_inputs`), then the step,
        its outputs into the step graph's output tensors (where the next chained step and the host read them)."""
        write_inputs = self.chained_inputs(g, decoder)

        def step():
            write_inputs()
            packed, extra = g.run()
            g.outputs[0].copy_(packed)
            if extra is not None:
                g.outputs[1].copy_(extra)

        return step

    def _capture_chain(self, g: "_Graph", decoder):
        step = self._chain_step(g, decoder)
        if g.pinned is None:  # CPU (tests): run it eagerly
            return _Eager(step)
        stream = torch.cuda.Stream()  # warm up (compile) `advanced_inputs` outside the graph: a pure function
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            advanced_inputs(g.outputs[0], g.buffers["i"], g.buffers["t"], decoder, g.layout["i"],
                            self.kv.trash_slot, self.block_size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()  # (the step's own kernels ran in the step graph's capture)
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        self._pool = graph.pool()
        return graph

    @property
    def table_width(self) -> int:
        """The block-table width (pages) of the last graph step (what `decode_next` can take)."""
        return 0 if self._last is None else self._last[0].raw["tables"].shape[1]

    def _pending(self, g: "_Graph", B: int) -> "PendingStep":
        packed, extra = g.outputs
        if g.pinned is None:  # (CPU: the step has run)
            return PendingStep(packed[:B].clone(), None, None if extra is None else extra[:B])
        # two host buffers in turn: a step's rows are read before the step after next is launched, while the
        # next one's copy may land before the host reads this one's
        g.flip ^= 1
        host = g.pinned[g.flip][:B]
        host.copy_(packed[:B], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(host, event, None if extra is None else extra[:B])

    def _device_step(self, decoder, t: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], static: dict):
        """The device part of a fused decode step (what a CUDA graph captures): forward, vocabulary
        projection, decoder.compute -> (packed, extra)."""
        logits = self._logits(self._forward(t, self.attn_kernel))
        with self.decoder_math():
            return decoder.compute(logits, dec, **static)

    def _packed_step(self, decoder, inputs: dict[str, torch.Tensor], static: dict):
        """`_device_step` on `_unpack`ed inputs, whose decoder tensors carry the "dec." prefix."""
        dec = {k[4:]: v for k, v in inputs.items() if k.startswith("dec.")}
        return self._device_step(decoder, inputs, dec, static)

    def decoder_math(self):
        """Context for a decoder's sampling math (`compute`, `start`, `step`): in exact mode its compiled
        functions run eagerly, because ATen reduces a row (softmax, log_softmax, cumsum) the same way for
        any number of rows while inductor may split a lone row's reduction (batch 1 is compiled apart)."""
        return torch.compiler.set_stance("force_eager") if self.exact else contextlib.nullcontext()

    def _capture(self, decoder, host, on_device, static, Bp) -> "_Graph":
        cuda = self.device.type == "cuda"
        layout, staging, buffers = _pack(host, Bp, self.device, pin=cuda)
        dev_inputs = {k: _pad_rows(v, Bp).clone() for k, v in on_device.items()}

        def run():
            return self._packed_step(decoder, _unpack(layout, buffers, dev_inputs, Bp), static)

        views = {g: t.numpy() for g, t in staging.items()}  # numpy views of the (pinned) staging buffers
        raw = _unpack(layout, buffers, {}, Bp, raw=True)
        # what each staging column last received (`_fill` skips an input that is the same read-only object)
        filled: dict = {}
        if not cuda:  # (tests) the graph path on CPU: "replay" reruns the step into the same output tensors
            graph = _EagerGraph(run)
            return _Graph(graph, staging, views, buffers, layout, dev_inputs, graph.outputs, filled, raw, run)
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
        pinned = [torch.empty(outputs[0].shape, dtype=outputs[0].dtype, pin_memory=True) for _ in range(2)]
        tables = [torch.empty(staging["t"].shape, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        return _Graph(graph, staging, views, buffers, layout, dev_inputs, outputs, filled, raw, run, pinned, tables)


@dataclass
class _Graph:
    """A captured decode step: the CUDA graph, its host staging buffers (and their numpy views), the device
    buffers it reads (`_pack`), device-side decoder inputs, its static outputs (packed, extra)."""
    graph: object  # torch.cuda.CUDAGraph, or an `_EagerGraph` on CPU
    staging: dict[str, torch.Tensor]
    views: dict[str, np.ndarray]
    buffers: dict[str, torch.Tensor]
    layout: dict
    dev_inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor | None]
    filled: dict
    raw: dict[str, torch.Tensor]  # each packed input as a writable view [rows, ...] of its buffer's dtype
    run: object  # the step as a function (what the graph captured)
    pinned: list[torch.Tensor] | None = None  # CUDA: two host buffers for the packed output (`PendingStep`)
    tables_pinned: list[torch.Tensor] | None = None  # CUDA: two host buffers for the tables (`decode_next`)
    chain: object = None  # the chained step's graph (`decode_next`), captured on first use
    flip: int = 0
    flip_tables: int = 0


class _EagerGraph:
    """A decode step "captured" on CPU (tests of the graph path): each replay runs it and copies the results
    into the tensors of the first run, as a CUDA graph overwrites its static outputs."""

    def __init__(self, run):
        self.run = run
        self.outputs = run()

    def replay(self) -> None:
        packed, extra = self.run()
        self.outputs[0].copy_(packed)
        if extra is not None:
            self.outputs[1].copy_(extra)


class _Eager:
    """A chained step "captured" on CPU (tests): each replay runs it."""

    def __init__(self, fn):
        self.replay = fn


@cuda_fused(batch_rows=True)
def advanced_inputs(packed: torch.Tensor, ints: torch.Tensor, tables: torch.Tensor, decoder, cols: tuple,
                    trash: int, bs: int) -> torch.Tensor:
    """A chained step's int64 inputs [B, W] (the packed "i" group, its `_pack` layout `cols`) from the last
    step's: packed output [B, F], its int64 inputs and the block tables [B, M]. The decoder's next inputs
    (`Decoder.next_inputs`: tokens, MASK / gate, its per-row state) and draw numbers (one more) for every row;
    starts and positions moved by each row's advance and KV slots looked up in its table for the batch's rows
    only: a padding row (its KV slots the trash slot) keeps its positions and trash slots. Block row i's KV
    slot is that of position start + i (not of its position: rejection branches share positions). Row-wise,
    pure."""
    raw = {name: ints[:, a:b].reshape(-1, *shape) for name, a, b, shape, _ in cols}
    raw["tables"] = tables
    advance, new = decoder.next_inputs(packed, raw)
    valid = raw["slots"][:, 0] != trash  # [B]
    advance = torch.where(valid, advance, 0)
    starts = raw["starts"] + advance
    at = starts[:, None] + torch.arange(raw["slots"].shape[1], device=ints.device)
    slots = torch.where(valid[:, None], tables.gather(1, at // bs) * bs + at % bs, raw["slots"])
    values = {**new, "starts": starts, "positions": raw["positions"] + advance[:, None], "slots": slots}
    if "dec.draw" in raw:  # a sampled step: each row's next draw number (`take_draws`: one a step)
        values["dec.draw"] = raw["dec.draw"] + 1
    return cat_columns([ints[:, a:b] if name not in values else values[name].reshape(ints.shape[0], b - a).long()
                        for name, a, b, _, _ in cols])


class PendingStep:
    """A launched decode step: `result()` waits for its packed rows on the host (numpy [B, F], a copy: the
    host buffer is the next step's too); `extra` is its device output the next step may read."""

    def __init__(self, host: torch.Tensor, event, extra: torch.Tensor | None):
        self.host, self.event, self.extra = host, event, extra

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy().copy()


def _decoder_inputs(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A decoder's step tensors under "dec."-prefixed names: (host ones, packed with the batch's inputs;
    device ones, e.g. a kept q̃, copied into the step's own buffers)."""
    on_host, on_device = {}, {}
    for k, v in tensors.items():
        (on_host if v.is_cpu else on_device)["dec." + k] = v
    return on_host, on_device


def _torch_dtype(v) -> torch.dtype:
    return v.dtype if isinstance(v, torch.Tensor) else torch.from_numpy(np.empty(0, dtype=v.dtype)).dtype


def _pack(host: dict, rows: int, device, pin: bool):
    """A decode step's host inputs (torch CPU tensors or numpy arrays; ≤ rows rows each, padded by `_fill`)
    as the CUDA graph takes them: an int64 group (ids, positions, slots, bools), a float32 group and the
    block tables (their own group: a chained step copies only them, `decode_next`), each one [rows, width]
    buffer (one host-to-device copy per group).
    -> (layout {group: ((name, first column, end column, shape, dtype), ...)}, host staging buffers, device
    buffers)."""
    groups: dict[str, list] = {"i": [], "f": [], "t": []}
    # within a group, the inputs of one dtype side by side (`_unpack` converts each dtype's columns at once)
    typed = sorted(((name, v, _torch_dtype(v)) for name, v in host.items()), key=lambda t: (str(t[2]), t[0]))
    for name, v, dtype in typed:
        groups["t" if name == "tables" else "f" if dtype.is_floating_point else "i"].append((name, v, dtype))
    layout, staging, buffers = {}, {}, {}
    for g, inputs in groups.items():
        if not inputs:
            continue
        cols, off = [], 0
        for name, v, dtype in inputs:
            shape = tuple(v.shape[1:])
            cols.append((name, off, off + math.prod(shape), shape, dtype))
            off += math.prod(shape)
        layout[g] = tuple(cols)
        staging[g] = torch.empty(rows, off, dtype=torch.float32 if g == "f" else torch.int64)
        if pin:
            staging[g] = staging[g].pin_memory()
    _fill({g: t.numpy() for g, t in staging.items()}, layout, host, rows)
    for g in layout:
        buffers[g] = staging[g].to(device)
    return layout, staging, buffers


def _fill(staging: dict[str, np.ndarray], layout, host: dict, rows: int, filled: dict | None = None) -> None:
    """Write a step's host inputs into the staging buffers' numpy views, in `layout`'s columns; an input of
    fewer rows is padded by repeating its row 0 (as `_pad_rows`). numpy assignments in place: about half
    the time of building the buffer with torch ops (reshape, cast, cat per input): on this project's CPU
    35 vs 76 µs a greedy ISD step at batch 1 (`scripts/host_pack.py`). filled: {name: the object last
    written} of these buffers, updated here; an input that is that same object is not written again (the
    decoders' per-params tensors, read-only and shared by every step of an unchanged batch: 8 of an R-ISD
    step's 17 inputs)."""
    for g, names in layout.items():
        buf = staging[g]
        for name, lo, hi, _, _ in names:
            v = host[name]
            if filled is not None:
                if filled.get(name) is v:
                    continue
                filled[name] = v
            a = v.numpy() if isinstance(v, torch.Tensor) else v
            n = a.shape[0]
            cols = buf[:, lo:hi]
            cols[:n] = a.reshape(n, hi - lo)
            if n < rows:
                cols[n:] = cols[0]


def _unpack(layout, buffers, dev_inputs: dict[str, torch.Tensor], rows: int, raw: bool = False
            ) -> dict[str, torch.Tensor]:
    """The step's inputs as views into the packed device buffers — strided, not contiguous: every kernel
    of the step must honour its inputs' strides (`ModelRunner.packed_inputs` tests that without a GPU).
    An input of another dtype than its buffer's (the bools of the int64 group: R-ISD's gate and MASK flags,
    the decoder's) is a view of one conversion of all that dtype's columns (`_pack` puts them side by side):
    one kernel a step where each input's own conversion took one each (six for an R-ISD step).
    raw: each in its buffer's dtype (int64 / float32): writable views."""
    out = dict(dev_inputs)
    for g, names in layout.items():
        buf = buffers[g]
        converted: dict[torch.dtype, tuple[int, torch.Tensor]] = {}
        if not raw:
            for dtype in {dtype for *_, dtype in names if dtype != buf.dtype}:
                cols = [(lo, hi) for _, lo, hi, _, d in names if d == dtype]
                lo, hi = min(c[0] for c in cols), max(c[1] for c in cols)
                if hi - lo != sum(b - a for a, b in cols):
                    raise ValueError(f"the {dtype} inputs of group {g!r} are not side by side in its layout")
                converted[dtype] = (lo, buf[:, lo:hi].to(dtype))
        for name, lo, hi, shape, dtype in names:
            if dtype in converted:
                first, block = converted[dtype]
                out[name] = block[:, lo - first:hi - first].reshape(rows, *shape)
            else:
                out[name] = buf[:, lo:hi].reshape(rows, *shape)
    return out


def _pad_cols(a: np.ndarray, width: int) -> np.ndarray:
    """[B, m] -> [B, width] zero-padded (page tables to a graph's width)."""
    if a.shape[1] == width:
        return a
    out = np.zeros((a.shape[0], width), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _use_kernel(attention: str, device: torch.device) -> bool:
    """Whether attention runs the Triton paged kernel (where it supports the query; see PagedAttention)."""
    usable = triton_usable(device)
    if attention == "triton" and not usable:
        raise ConfigError("attention='triton' needs the triton package and a CUDA device "
                          "(or TRITON_INTERPRET=1 on CPU)")
    return attention != "sdpa" and usable and (attention == "triton" or device.type == "cuda")


def _pad_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 to `rows` by repeating row 0 (valid values for the unused rows of a batch bucket)."""
    if v.shape[0] == rows:
        return v
    return torch.cat([v, v[:1].expand(rows - v.shape[0], *v.shape[1:])])
