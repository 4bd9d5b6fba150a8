"""Rotary position embeddings (RoPE) for arbitrary per-token position ids.

Positions are given per token rather than implied by a token's index, because I-DLM needs that:
in training the x_t and x0 halves of a sequence share position ids (SPEC §3.1), and at inference a
query block sits at positions P..P+2N-2 after a cache of length P (SPEC §4.2).
Supports plain RoPE and the "linear" and "llama3" frequency scalings.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn

from idlm.layers.fused import cuda_fused
from idlm.layers.lora import select_half
from idlm.layers.norm import rms_norm
from idlm.layers.paged_kernel import triton_available


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


def rotary_kernel_on() -> bool:
    """$IDLM_ROTARY_KERNEL: "1" (default) — `rotary_qkv_rows`, the hand-written Triton kernel, on CUDA; "0" —
    inductor's compilation of `rotary_qkv`. On since session 38, when the engine's exactness run with it gave
    64/64 identical requests in float32 and in bf16 on an H100 and its GPU tests passed; it took 4.7% off the
    SmolLM2 shape's AR step and 3% off R-ISD's on the H200 (session 37), and on the H100 the kernel time of
    idlm-tiny-ar's layers from 22.2 to 12.8 µs a step (AR) and 35.6 to 15.3 µs (R-ISD) (docs/risd.md, session 38;
    scripts/bench_risd.py's variant `rotary0` is inductor's)."""
    value = os.environ.get("IDLM_ROTARY_KERNEL", "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"IDLM_ROTARY_KERNEL={value!r} is not valid: '0' or '1'")
    return value == "1"


def rotary_qkv_fast(qkv: torch.Tensor, gate: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    n_heads: int, n_kv: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """`rotary_qkv`, through `rotary_qkv_rows` (one Triton program per token) where it runs: CUDA tensors, a
    head dim that is a power of two, $IDLM_ROTARY_KERNEL on, no gradient asked for (the kernel has no backward)
    and no compilation tracing the call. (On CPU the eager function: the tests run the kernel itself in
    Triton's interpreter, and every other CPU test keeps the eager values.)"""
    d = cos.shape[-1]
    if (qkv.is_cuda and not qkv.requires_grad and not torch.compiler.is_compiling() and rotary_kernel_on()
            and triton_available() and d >= 16 and d & (d - 1) == 0
            and qkv.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return rotary_qkv_rows(qkv, gate, cos, sin, n_heads, n_kv, q_weight, k_weight, eps)
    return rotary_qkv(qkv, gate, cos, sin, n_heads, n_kv, q_weight, k_weight, eps)


@functools.cache
def _rotary_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_qkv_kernel(X, GATE, COS, SIN, QW, KW, OUT, s_x, s_cs, half, eps, HQ: tl.constexpr,
                          HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, GATED: tl.constexpr,
                          NORM: tl.constexpr):
        r = tl.program_id(0)  # one token: all its heads, a [BLOCK_H, D] tile
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, D)[None, :]
        j = (i + D // 2) % D  # the rotate-half partner lane
        H: tl.constexpr = HQ + 2 * HKV
        ok = (h < H) & (i < D)
        src = X + r.to(tl.int64) * s_x + h * D
        if GATED:  # the select layout: the adapted half where the token's gate is on
            src += tl.where(tl.load(GATE + r) != 0, half, 0)
        x = tl.load(src + i, mask=ok, other=0.0)
        xs = tl.load(src + j, mask=ok, other=0.0)
        dt = x.dtype
        if NORM:  # Qwen3's per-head RMSNorm of q and k (v's rows are computed and then not used)
            xf = x.to(tl.float32)
            rs = tl.rsqrt(tl.sum(xf * xf, axis=1)[:, None] / D + eps)  # [BLOCK_H, 1]
            is_q = h < HQ
            w = tl.where(is_q, tl.load(QW + i), tl.load(KW + i)).to(tl.float32)
            ws = tl.where(is_q, tl.load(QW + j), tl.load(KW + j)).to(tl.float32)
            y = (w * (xf * rs).to(dt).to(tl.float32)).to(dt)  # each product rounded as the eager ops round
            ys = (ws * (xs.to(tl.float32) * rs).to(dt).to(tl.float32)).to(dt)
        else:
            y, ys = x, xs
        c = tl.load(COS + r.to(tl.int64) * s_cs + i).to(tl.float32)
        sn = tl.load(SIN + r.to(tl.int64) * s_cs + i).to(tl.float32)
        ysf = ys.to(tl.float32)  # (negated in float32: exact, and the interpreter's bf16 is raw bits)
        rot = tl.where(i < D // 2, -ysf, ysf)
        out = ((y.to(tl.float32) * c).to(dt).to(tl.float32) + (rot * sn).to(dt).to(tl.float32)).to(dt)
        out = tl.where(h >= HQ + HKV, x, out)
        tl.store(OUT + r.to(tl.int64) * (H * D) + h * D + i, out, mask=ok)

    return rotary_qkv_kernel


def rotary_qkv_rows(qkv: torch.Tensor, gate: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    n_heads: int, n_kv: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """`rotary_qkv` as one Triton launch of one program per token (all its heads: a [heads, D] tile), the same
    arguments and result [B, T, Hq + 2·Hkv, D]. Each elementwise product is rounded to the input's dtype where
    the eager function's bf16 / fp16 operations round (only the norm's sum is taken in another order).

    Why: inductor's kernel for `rotary_qkv` took 4.5 µs a layer for a 7-token R-ISD block of idlm-tiny-ar on the
    H200 (session 33's profile: Qwen3's q/k norms as a persistent reduction over all token × head rows in a few
    programs) against 1.4 µs for AR's one token, and its autotuned choice moved AR's SmolLM2-shape kernel between
    1.4 and 2.6 µs from one process to the next (docs/risd.md, session 37)."""
    B, T, W = qkv.shape
    d = cos.shape[-1]
    H = n_heads + 2 * n_kv
    half = W // 2 if gate is not None else 0
    if W != H * d * (2 if gate is not None else 1):
        raise ValueError(f"rotary_qkv_rows: {W} columns is no q/k/v of {H} heads of {d}"
                         + (" in two halves" if gate is not None else ""))
    x = qkv.reshape(B * T, W)
    if x.stride(1) != 1:
        x = x.contiguous()
    cs = cos.expand(B, T, 1, d).reshape(B * T, d)
    sn = sin.expand(B, T, 1, d).reshape(B * T, d)
    if sn.stride() != cs.stride() or cs.stride(1) != 1:
        cs, sn = cs.contiguous(), sn.contiguous()
    out = torch.empty(B, T, H, d, dtype=qkv.dtype, device=qkv.device)
    if B * T == 0:
        return out
    g = gate.reshape(B * T) if gate is not None else x  # bool, read as bytes (unread without a gate)
    norm = q_weight is not None
    qw, kw = (q_weight, k_weight) if norm else (x, x)
    _rotary_kernel()[(B * T,)](x, g, cs, sn, qw, kw, out, x.stride(0), cs.stride(0), half, float(eps),
                               HQ=n_heads, HKV=n_kv, D=d, BLOCK_H=max(1, 1 << (H - 1).bit_length()),
                               GATED=gate is not None, NORM=norm, num_warps=4 if H * d >= 1024 else 2)
    return out


def split_qkv(qkv: torch.Tensor, n_heads: int, n_kv: int):
    """`rotary_qkv`'s output [B, T, Hq + 2·Hkv, D] -> (q [B, T, Hq, D], k, v [B, T, Hkv, D]) as views (no copy:
    the paged cache's store and the attention kernels take strided heads)."""
    return qkv.split([n_heads, n_kv, n_kv], 2)

