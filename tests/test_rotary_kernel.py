"""`rotary_qkv_rows`, the Triton kernel of a decode step's q/k norms + RoPE + v (one program per token), against
the eager `rotary_qkv` it replaces on CUDA: in Triton's interpreter on CPU, and on a GPU where there is one.

The oracle is the eager function, itself tested bit for bit against the separate `select_half`, norms and
`apply_rotary` (tests/test_models.py). The interpreter rounds float32 to bf16 by truncation where a GPU rounds
to nearest, so in bf16 the CPU check allows a rounding step of the head's largest value; float32 without the
norms is bit-equal, with them within float32 rounding (the norm's sum is taken in another order)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the rotary kernel's tests need the triton package (dev extra)")

from idlm.layers.rotary import (  # noqa: E402
    RotaryEmbedding,
    rotary_kernel_on,
    rotary_qkv,
    rotary_qkv_fast,
    rotary_qkv_rows,
)

SHAPES = [(6, 2, 64), (9, 3, 64), (4, 2, 16), (8, 1, 128)]  # (Hq, Hkv, D): idlm-tiny-ar, SmolLM2, small, wide


def _case(dtype, norms, gated, hq, hkv, d, B=2, T=5, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    width = (hq + 2 * hkv) * d
    qkv = (3 * torch.randn(B, T, 2 * width if gated else width, generator=g)).to(dtype)
    gate = None
    if gated:  # bool as the decode step passes it; float as a prefill's fused LoRA may
        gate = torch.rand(B, T, generator=g) > 0.5
        gate = gate if seed % 2 else gate.to(dtype)
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(B * T).view(B, T) * 37, dtype)
    qw, kw = ((torch.rand(d, generator=g) + 0.5).to(dtype), (torch.rand(d, generator=g) + 0.5).to(dtype)) \
        if norms else (None, None)
    args = [qkv, gate, cos, sin, hq, hkv, qw, kw, 1e-6]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _check(got, want, dtype, norms):
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32 and not norms:
        assert torch.equal(got, want)
    elif dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-6, atol=2e-6)
    else:  # a few bf16 steps of the head's largest value (three roundings, which the interpreter truncates)
        w = want.float()
        scale = w.abs() + w.abs().amax(-1, keepdim=True)
        assert bool(((got.float() - w).abs() <= scale * 2 ** (-5 if norms else -6)).all())  # (the norms: 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rotary_kernel_equals_the_eager_function(dtype, norms, gated, shape):
    """q and k normed (Qwen3) and rotated, v copied, the "select" layout's half picked per token by a bool or
    a float gate: the eager function's values (see the module docstring for the tolerance)."""
    for seed in (1, 2):
        args = _case(dtype, norms, gated, *shape, seed=seed)
        _check(rotary_qkv_rows(*args), rotary_qkv(*args), dtype, norms)


def test_rotary_kernel_v_heads_and_base_half_are_copied_exactly():
    """v's heads are the input's bits, and a token whose gate is off reads exactly the base half."""
    hq, hkv, d = 6, 2, 64
    qkv, gate, cos, sin, *_ = _case(torch.bfloat16, True, True, hq, hkv, d, seed=3)
    out = rotary_qkv_rows(qkv, gate, cos, sin, hq, hkv, None, None, 1e-6)
    width = (hq + 2 * hkv) * d
    half = torch.where(gate[..., None], qkv[..., width:], qkv[..., :width]).view(*qkv.shape[:2], hq + 2 * hkv, d)
    assert torch.equal(out[:, :, hq + hkv:], half[:, :, hq + hkv:])


def test_rotary_kernel_refuses_a_width_that_is_no_qkv():
    qkv, gate, cos, sin, *_ = _case(torch.float32, False, False, 6, 2, 64)
    with pytest.raises(ValueError, match="no q/k/v of 10 heads"):
        rotary_qkv_rows(qkv[..., :-64], None, cos, sin, 6, 2, None, None, 1e-6)
    with pytest.raises(ValueError, match="in two halves"):
        rotary_qkv_rows(qkv, torch.ones(qkv.shape[:2], dtype=torch.bool), cos, sin, 6, 2, None, None, 1e-6)


def test_the_kernel_runs_only_on_cuda_and_the_switch_is_checked(monkeypatch):
    """On CPU `rotary_qkv_fast` is the eager function (bit for bit) with the switch on; $IDLM_ROTARY_KERNEL is
    on by default (since a GPU run checked the engine's exactness with it), "0" turns it off, nothing else."""
    monkeypatch.delenv("IDLM_ROTARY_KERNEL", raising=False)
    assert rotary_kernel_on()
    monkeypatch.setenv("IDLM_ROTARY_KERNEL", "0")
    assert not rotary_kernel_on()
    monkeypatch.setenv("IDLM_ROTARY_KERNEL", "1")
    assert rotary_kernel_on()
    args = _case(torch.bfloat16, True, True, 6, 2, 64)
    assert torch.equal(rotary_qkv_fast(*args), rotary_qkv(*args))
    monkeypatch.setenv("IDLM_ROTARY_KERNEL", "2")
    with pytest.raises(ValueError, match="IDLM_ROTARY_KERNEL='2'"):
        rotary_kernel_on()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA device and Triton compiled for it (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rotary_kernel_on_the_gpu_equals_the_eager_function(dtype, norms, gated, shape):
    """On CUDA, against the eager function on CPU: float32 within float32 rounding (the GPU may contract RoPE's
    products and sum into fused multiply-adds), bf16 within a rounding step of the head's largest value (the
    first H200 run, session 37, found the bits of the no-norm cases not the eager ones' everywhere: such a
    bound, not bit equality, is what the kernel is held to)."""
    args = _case(dtype, norms, gated, *shape, B=3, T=16)
    want = rotary_qkv(*args)
    got = rotary_qkv_rows(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).cpu()
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-6, atol=2e-6)
    else:
        w = want.float()
        assert bool(((got.float() - w).abs() <= (w.abs() + w.abs().amax(-1, keepdim=True)) * 2 ** -7).all())


# the rotary kernel's Triton IR for an sm_90 CUDA target, after the TTIR passes (`triton_cuda.run_ttir_script`):
# {variant: "ok" or the error}
_TTIR_BODY = r"""
from idlm.layers.rotary import _rotary_kernel

fn = _rotary_kernel()

def build(gated, norm, dt):
    ce = dict(HQ=6, HKV=2, D=64, BLOCK_H=16, GATED=gated, NORM=norm)
    sig = {"X": dt, "GATE": "*i1", "COS": dt, "SIN": dt, "QW": dt, "KW": dt, "OUT": dt, "eps": "fp32"}
    text = ttir(fn, sig, ce, optimize=True)
    # bf16: each product rounded before the sum (a truncf per product and one for the sum, none folded away)
    want = 3 + 2 * norm if dt == "*bf16" else 0
    return "tt.func" in text and text.count("arith.truncf") >= want or text

report((f"gated={gated} norm={norm} dtype={dt[1:]}", lambda gated=gated, norm=norm, dt=dt: build(gated, norm, dt))
       for gated, norm, dt in itertools.product((False, True), (False, True), ("*bf16", "*fp32")))
"""


def test_rotary_kernel_compiles_for_cuda():
    """Every variant (gated or not, q/k norms or not, bf16 / fp32) passes Triton's CUDA front end and its TTIR
    passes, built on the CPU, and the bf16 variants keep their roundings (a truncf per rounded product)."""
    from triton_cuda import run_ttir_script

    result = run_ttir_script(_TTIR_BODY)
    assert len(result) == 8 and all(v == "ok" for v in result.values()), result
