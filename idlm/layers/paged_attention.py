"""Attention over a paged KV pool: the serving engine's backend (SPEC §8).

The pool is one tensor per K and V, [layers, slots + 1, Hkv, D]; page p holds slots
p·bs .. p·bs+bs−1 (`idlm.engine.block_manager` hands out pages and maps positions to slots). The one
extra slot at the end is a *trash slot*: padded query tokens (right-padded prefill chunks, the unused
rows of a CUDA-graph batch bucket) write there, and no block table ever points at it.

`PagedAttention` is the backend of one forward over a right-padded batch [B, T]: row b's tokens sit at
positions starts[b] .. starts[b]+T−1, are written at `slot_mapping[b]`, and query t attends to
positions 0 .. starts[b]+visible[b, t] (default t: causal), read through the row's block table. This
is two paths with one meaning:
- the reference path (gather the row's pages, then SDPA under an explicit mask) runs on every device,
  has no data-dependent shapes for a fixed (B, T, pages) and is therefore CUDA-graph capturable; the
  mask hides both the gathered slots past a row's context and block-table padding;
- `kernel=True` (the engine's decode steps on CUDA) runs `idlm.layers.paged_kernel`, one Triton launch
  per layer that reads the pool through the block table, for query blocks it supports (short ones);
  other queries (long prefill chunks) still take the reference path;
- `exact=True` (issue 16's exact mode) runs every query — decode blocks and prefill chunks alike —
  through the kernel's fixed-tile exact variant, so a token row's output has the same bits whatever
  the query length, the batch and the other rows.
"""

from __future__ import annotations

import torch

from idlm.layers.attention import cache_mask, causal_sdpa, hidden_slots, last_visible, sdpa
from idlm.layers.fused import cuda_fused
from idlm.layers.paged_kernel import kernel_supported, paged_attention, split_counters, store_kv


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.trash_slot = num_blocks * block_size
        shape = (num_layers, self.trash_slot + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # the decode kernel's fused split-KV combine: a ticket per (row, KV head), zero between launches
        self.split_counters = split_counters((num_blocks + 1) * num_kv_heads, device)

    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        """K and V bytes of one page across all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


@cuda_fused
def kernel_rows(starts: torch.Tensor, slot_mapping: torch.Tensor, trash_slot: int, num_new: int,
                visible: torch.Tensor | None, hide: torch.Tensor | None):
    """The kernel's per-query-row metadata, shared by all layers of a forward: (`kernel_last` of
    `last_visible`, [B, T]; `hidden_slots` [B, T, 2] or None). One function so that on CUDA its handful
    of small integer kernels (arange, add, compare, masked fill, the hide offsets) compile into one or two
    inside a decode step's graph."""
    last = kernel_last(last_visible(starts, num_new, visible), slot_mapping, trash_slot)
    return last, (None if hide is None else hidden_slots(starts, hide))


def kernel_last(last: torch.Tensor, slot_mapping: torch.Tensor, trash_slot: int) -> torch.Tensor:
    """`last` [B, T] for the kernel: −1 (no keys) for padded query tokens (written to the trash slot). A
    padded token's nominal position starts[b] + t can lie past the row's pages — a right-padded prefill
    chunk of a row that starts late (a prefix-cache hit) — where the kernel would read block-table entries
    that are not the row's, past the table's end for the last row (on the H200 an exact-mode benchmark
    died with an illegal memory access in a batch-64 prefill whose requests repeat the prompts of its
    warm-up run, so prefix hits; this is the out-of-range read found in that path). Real tokens are
    unchanged."""
    return last.masked_fill(slot_mapping.reshape(last.shape) == trash_slot, -1)


# host_rows: a row-by-row causal SDPA instead of one masked SDPA over the batch when a row has this many
# query tokens (or the batch is this small): a long prefill chunk then runs SDPA's flash kernel on exactly its
# keys, where the masked call fell back to the math path (a bool mask with grouped-query heads: on the H200 an
# 8k-token prefill of a Qwen3-8B shape ran at 7% of the bf16 peak, docs/engine.md)
ROW_CAUSAL_MIN_TOKENS = 256
ROW_CAUSAL_MAX_ROWS = 2


class PagedAttention:
    """Backend for one forward. slot_mapping [B, T], block_tables [B, M] (page ids, padded with any
    valid page), starts [B], visible [B, T] or None, hide [B, T, 2] (block-index ranges a query does not see:
    `cache_mask`) or None; kernel: use the Triton kernel where supported.
    host_rows: [(start, tokens)] of the real rows, known on the host (prefill): lets plain causal rows
    take `_attend_rows` (per row, exactly its keys, SDPA's causal kernels) — not under CUDA graphs."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 starts: torch.Tensor, visible: torch.Tensor | None = None, kernel: bool = False,
                 exact: bool = False, host_rows: list[tuple[int, int]] | None = None,
                 hide: torch.Tensor | None = None):
        self.cache, self.slot_mapping, self.block_tables, self.hide = cache, slot_mapping, block_tables, hide
        self.starts, self.visible, self.kernel, self.exact = starts, visible, kernel or exact, exact
        self.host_rows = host_rows
        self._key_slots: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._hide: torch.Tensor | None = None

    def _prepare(self, T: int) -> None:
        """Key slots [B, S] (S = M·bs positions 0..S−1 of each row) and the mask, shared by all layers."""
        bs = self.cache.block_size
        pos = torch.arange(self.block_tables.shape[1] * bs, device=self.block_tables.device)
        self._key_slots = self.block_tables[:, pos // bs] * bs + pos % bs
        self._mask = cache_mask(self.starts, T, pos.numel(), self.visible, self.hide)

    def attend(self, layer, q, k, v):  # q [B, Hq, T, D], k/v [B, Hkv, T, D] (views of [B, T, H, D]: free)
        B, Hkv, T, D = k.shape
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        flat = self.slot_mapping.reshape(-1)
        use_kernel = self.kernel and kernel_supported(q, Hkv, self.exact)
        if self.exact and not use_kernel:
            raise RuntimeError("exact mode needs the Triton paged kernel for this query (CUDA, or TRITON_INTERPRET=1 "
                               "on CPU; head dim a power of two >= 16)")
        rows_k, rows_v = k.transpose(1, 2).reshape(B * T, Hkv * D), v.transpose(1, 2).reshape(B * T, Hkv * D)
        if use_kernel and kc.is_contiguous():  # the decode path: both writes in one launch
            store_kv(kc, vc, flat, rows_k, rows_v)
        else:
            kc[flat] = rows_k.view(B * T, Hkv, D).to(kc.dtype)
            vc[flat] = rows_v.view(B * T, Hkv, D).to(vc.dtype)
        if use_kernel:
            if self._last is None:  # shared by all layers
                self._last, self._hide = kernel_rows(self.starts, self.slot_mapping, self.cache.trash_slot, T,
                                                     self.visible, self.hide)
            return paged_attention(q, kc, vc, self.block_tables, self._last, self.cache.block_size, exact=self.exact,
                                   counters=self.cache.split_counters, hide=self._hide)
        rows = self.host_rows
        plain = self.visible is None and self.hide is None
        if rows is not None and plain and (max(n for _, n in rows) >= ROW_CAUSAL_MIN_TOKENS
                                           or len(rows) <= ROW_CAUSAL_MAX_ROWS):
            return self._attend_rows(kc, vc, q)
        if self._mask is None:
            self._prepare(T)
        keys = kc[self._key_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, S, D]
        values = vc[self._key_slots].transpose(1, 2).to(q.dtype)
        return sdpa(q, keys, values, self._mask)

    def _attend_rows(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Causal attention row by row: row b's n query tokens at positions start..start+n−1 see keys
        0..start+n−1 — exactly those keys gathered, and SDPA told it is causal (`causal_sdpa`), so it runs
        its flash kernel instead of materialising scores under a mask. Padded query tokens (t >= n) get
        zeros (nothing reads them). q [B, Hq, T, D] -> [B, Hq, T, D]."""
        B, Hq, T, D = q.shape
        bs = self.cache.block_size
        out = q.new_zeros(B, Hq, T, D)
        for b, (start, n) in enumerate(self.host_rows):
            if n == 0:
                continue
            pos = torch.arange(start + n, device=q.device)
            slots = self.block_tables[b, pos // bs] * bs + pos % bs
            k = kc[slots].transpose(0, 1)[None].to(q.dtype)  # [1, Hkv, start + n, D]
            v = vc[slots].transpose(0, 1)[None].to(q.dtype)
            out[b: b + 1, :, :n] = causal_sdpa(q[b: b + 1, :, :n], k, v, start)
        return out
