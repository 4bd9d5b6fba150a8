"""Rotary position embeddings (RoPE) for arbitrary per-token position ids.

Positions are given per token rather than implied by a token's index, because I-DLM needs that:
in training the x_t and x0 halves of a sequence share position ids (SPEC §3.1), and at inference a
query block sits at positions P..P+2N-2 after a cache of length P (SPEC §4.2).
Supports plain RoPE and the "linear" and "llama3" frequency scalings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from idlm.layers.fused import cuda_fused
from idlm.layers.lora import select_half
from idlm.layers.norm import rms_norm


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The inverse frequencies [head_dim/2] in float32, after the configured scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    rtype = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if rtype == "linear":
        return inv_freq / factor
    if rtype == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rtype!r}")


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions. inv_freq is kept in float32 outside the module's
    buffers on purpose: a `model.to(torch.bfloat16)` must not round the frequencies."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self._inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [head_dim/2] float32, CPU
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._per_device:
            self._per_device[device] = self._inv_freq.to(device)
        return self._per_device[device]

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int -> (cos, sin), each [B, T, 1, head_dim] in `dtype` (broadcast over heads)."""
        return rope_cos_sin(positions, self.inv_freq(positions.device), dtype)


@cuda_fused
def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """`RotaryEmbedding.forward`'s math: one kernel on CUDA where eager ATen launches six (the float cast
    and product, the concatenation, cos, sin and two casts) in every decode step."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2], float32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


@cuda_fused
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by (cos, sin) [B, T, 1, D], the rotate-half convention of HF."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@cuda_fused
def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(`apply_rotary`(q), `apply_rotary`(k)) as one compiled function: a decode step of an L-layer model
    launches L kernels fewer (at batch 1 each small kernel costs ~2 µs of a step that reads the weights
    once: docs/engine.md)."""
    rotate = apply_rotary.__wrapped__  # the eager body: this function is the compiled unit
    return rotate(q, cos, sin), rotate(k, cos, sin)


@cuda_fused
def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor):
    """Qwen3's per-head RMSNorm of q and k, then RoPE, as one compiled function (four kernels per layer before):
    (rotary(rms_norm(q)), rotary(rms_norm(k))), q [B, T, Hq, D], k [B, T, Hkv, D]."""
    rotate, norm = apply_rotary.__wrapped__, rms_norm.__wrapped__
    return rotate(norm(q, q_weight, eps), cos, sin), rotate(norm(k, k_weight, eps), cos, sin)


@cuda_fused
def rotary_qkv(qkv: torch.Tensor, gate: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
               n_kv: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """A fused q/k/v matmul's output qkv [B, T, (Hq + 2·Hkv)·D] -> [B, T, Hq + 2·Hkv, D]: q and k through Qwen3's
    per-head RMSNorm when its weights are given, then RoPE, and v as it is, written as one tensor (`split_qkv`
    takes the three views). With gate [B, T] (R-ISD's fused LoRA in the "select" layout, `Transformer.fuse_lora`),
    qkv is the halves [Wx, (W + D)x] [B, T, 2·(Hq + 2·Hkv)·D] and each row's half is picked first (`select_half`).

    Written over all heads at once, with no concatenation: every head is normed and rotated (the rotate-half
    partner read with a roll of the head's lanes, the norm's scale computed once per head) and v's heads take
    their input back by a head-index `where`. Concatenating q, k and v instead left the choice to inductor's
    lowering of `cat`, which on the H200 (torch 2.11) wrote the select layout's q, k and v in three kernels
    per layer (AR's in one; docs/risd.md, session 27). Here nothing is left to choose: one kernel without q/k
    norms, and (counted in the Triton code inductor generates on a CPU machine) two with them. Values are the
    separate functions' (`rotary_qk`, `qk_norm_rotary`, v copied): the same elementwise operations, tested
    bit-equal on the CPU."""
    if gate is not None:
        qkv = select_half(qkv, gate)
    B, T = qkv.shape[:2]
    d = cos.shape[-1]
    H = n_heads + 2 * n_kv
    x = qkv.view(B, T, H, d)
    head = torch.arange(H, device=x.device)[:, None]  # [H, 1]
    xs = x.roll(d // 2, -1)  # each head's halves swapped: [x2, x1]
    if q_weight is not None:  # `_rms_norm` of q (k) heads with q's (k's) weight, and of the swapped lanes alike
        w = torch.where(head < n_heads, q_weight, k_weight)  # [H, D]
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y, ys = w * (xf * r).to(x.dtype), w.roll(d // 2, -1) * (xs.float() * r).to(x.dtype)
    else:
        y, ys = x, xs
    rot = torch.where(torch.arange(d, device=x.device) < d // 2, -ys, ys)  # `apply_rotary`'s cat((−x2, x1))
    return torch.where(head >= n_heads + n_kv, x, y * cos + rot * sin)


def split_qkv(qkv: torch.Tensor, n_heads: int, n_kv: int):
    """`rotary_qkv`'s output [B, T, Hq + 2·Hkv, D] -> (q [B, T, Hq, D], k, v [B, T, Hkv, D]) as views (no copy:
    the paged cache's store and the attention kernels take strided heads)."""
    return qkv.split([n_heads, n_kv, n_kv], 2)

