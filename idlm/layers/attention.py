"""Attention backends: where the keys and values of a forward pass come from and which ones a query sees.

The transformer's attention layer computes q, k, v for the tokens of the current forward and hands
them to a backend, which stores k/v wherever its cache lives and returns the attention output. So
the same model runs
- a plain forward with a causal or explicit mask (`DenseAttention`: full sequences, training masks),
- a batch of requests over a contiguous per-request KV cache (`KVCache`: reference decoders), and
- the engine's paged KV pool (`idlm.layers.paged_attention.PagedAttention`),
without the model knowing which. All backends use strict causal attention over the cache: the
I-DLM query block at positions P..P+2N-2 sees the committed prefix and the block's earlier tokens.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] of the new tokens -> output [B, Hq, T, D]."""
        ...


# cuDNN's SDPA builds an execution plan per new shape (~1.7 ms of host time on an H200, measured:
# scripts/bench_risd.py churn), and prefill chunks come in a new (T, S) almost every step; the
# memory-efficient kernel (or the math path) has no such cost, so masked CUDA calls avoid cuDNN.
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads; mask is bool, True = may attend."""
    with sdpa_kernel(_NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=q.shape[1] != k.shape[1])


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal attention of n query tokens that follow `past` earlier keys: q [B, Hq, n, D], k/v
    [B, Hkv, past + n, D]; query t sees keys 0..past + t. No mask tensor: SDPA's flash / memory-efficient
    kernels run (causal, grouped-query heads natively when past = 0; past > 0 takes the bottom-right
    aligned `causal_lower_right`, whose kernels want K/V with every query head, so they are repeated)."""
    if past == 0:
        return sdpa(q, k, v, None, is_causal=True)
    from torch.nn.attention.bias import causal_lower_right

    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    with sdpa_kernel(_NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


class DenseAttention:
    """No cache: every query sees the keys of this forward under `mask` ([B|1, 1, T, T] bool) or,
    when mask is None, plain causal attention."""

    def __init__(self, mask: torch.Tensor | None = None):
        self.mask = mask

    def attend(self, layer, q, k, v):
        if self.mask is None:
            return sdpa(q, k, v, None, is_causal=True)
        return sdpa(q, k, v, self.mask)


class FlexAttentionBackend:
    """No cache: FlexAttention with a BlockMask (the CUDA training path; `idlm.training.masks`).
    Compiled once per process; on other devices use DenseAttention with the equivalent dense mask."""

    _compiled = None

    def __init__(self, block_mask):
        self.block_mask = block_mask

    def attend(self, layer, q, k, v):
        if FlexAttentionBackend._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            from idlm.layers.fused import raise_dynamo_limits

            raise_dynamo_limits()  # one compiled kernel per mask (stride curriculum, eval)
            FlexAttentionBackend._compiled = torch.compile(flex_attention, dynamic=False)
        return FlexAttentionBackend._compiled(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1])


class KVCache:
    """A contiguous KV cache for a batch of sequences: row b holds positions 0..max_len-1 of request b.

    `lengths[b]` is how many slots of row b hold kept KV (committed tokens). A forward writes its T
    new tokens of row b at slots starts[b]..starts[b]+T-1 and attends causally over 0..starts[b]+t.
    Shrinking `lengths` afterwards discards KV (ISD drops MASK and rejected slots: SPEC §4.4).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)

    def view(self, rows: torch.Tensor | None = None, starts: torch.Tensor | None = None,
             visible: torch.Tensor | None = None, hide: torch.Tensor | None = None) -> "CacheAttention":
        """A backend for one forward over cache rows `rows` (default: all), writing at `starts`
        (default: each row's current length). `visible` [B, T]: the last new-token index each query
        sees (default causal: t itself; block-bidirectional attention passes its block's end). `hide`
        [B, T, 2]: a range [lo, hi) of new-token indices query t does not see (a tree of drafts: `cache_mask`)."""
        if rows is None:
            rows = torch.arange(self.lengths.numel(), device=self.lengths.device)
        if starts is None:
            starts = self.lengths[rows]
        return CacheAttention(self, rows, starts, visible, hide)


def last_visible(starts: torch.Tensor, num_new: int, visible: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T]: the last key slot query t of row b sees, starts[b] + visible[b, t] (default t: causal)."""
    if visible is None:
        visible = torch.arange(num_new, device=starts.device).expand(starts.numel(), num_new)
    return starts[:, None] + visible


def hidden_slots(starts: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """hide [B, T, 2] new-token index ranges [lo, hi) -> the same as key slots, starts[b] + lo / hi  [B, T, 2]."""
    return starts[:, None, None] + hide


def cache_mask(starts: torch.Tensor, num_new: int, num_keys: int, visible: torch.Tensor | None = None,
               hide: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, S] bool: query t of row b (at slot starts[b]+t) sees the kept prefix and new tokens
    up to index visible[b, t] (default t: causal), i.e. key slots j <= starts[b] + visible[b, t]; with
    `hide` [B, T, 2], except the new tokens of indices hide[b, t, 0] <= i < hide[b, t, 1] (a tree of query
    rows: ISD's rejection branches see the block's rows up to their branch point, then their own rows)."""
    last = last_visible(starts, num_new, visible)  # [B, T]
    keys = torch.arange(num_keys, device=starts.device)
    mask = keys[None, None, :] <= last[:, :, None]  # [B, T, S]
    if hide is not None:
        lo, hi = hidden_slots(starts, hide).unbind(-1)  # [B, T] each
        mask = mask & ((keys[None, None, :] < lo[:, :, None]) | (keys[None, None, :] >= hi[:, :, None]))
    return mask[:, None]


class CacheAttention:
    def __init__(self, cache: KVCache, rows: torch.Tensor, starts: torch.Tensor, visible: torch.Tensor | None = None,
                 hide: torch.Tensor | None = None):
        self.cache, self.rows, self.starts, self.visible, self.hide = cache, rows, starts, visible, hide
        self._mask: torch.Tensor | None = None

    def attend(self, layer, q, k, v):
        cache, rows, T = self.cache, self.rows, q.shape[2]
        end = int((self.starts + T).max())
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: a row needs {end} slots, the cache holds {cache.max_len}")
        slots = self.starts[:, None] + torch.arange(T, device=q.device)  # [B, T]
        # advanced indices around a slice: the indexed view is [B, T, Hkv, D]
        cache.k[layer][rows[:, None], :, slots] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[layer][rows[:, None], :, slots] = v.transpose(1, 2).to(cache.v.dtype)
        keys = cache.k[layer][rows, :, :end].to(q.dtype)  # [B, Hkv, S, D]
        values = cache.v[layer][rows, :, :end].to(q.dtype)
        if self._mask is None:  # the same for every layer of this forward
            self._mask = cache_mask(self.starts, T, end, self.visible, self.hide)
        return sdpa(q, keys, values, self._mask)
