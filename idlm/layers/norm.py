"""RMSNorm, computed in float32 and cast back exactly as the HF reference does (for bit parity).
On CUDA the same formula runs as one fused kernel (`idlm.layers.fused`), also with the residual add
before it; for R-ISD's fused LoRA also with the gate applied in that add (a [base, delta] input) and
with the [y, gate·y] pair the next fused matmul takes."""

import torch
from torch import nn

from idlm.layers.fused import cuda_fused


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


rms_norm = cuda_fused(_rms_norm)


@cuda_fused
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(residual + x, rms_norm(residual + x)): a pre-norm block's residual add and the next norm, one kernel
    on CUDA instead of two."""
    s = residual + x
    return s, _rms_norm(s, weight, eps)


def _pair(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.cat([y, y * gate[..., None].to(y.dtype)], dim=-1)


def _combine(x2: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """[base, delta] halves -> base + gate·delta (exactly base where gate is 0)."""
    base, delta = x2.chunk(2, dim=-1)
    return base + delta * gate[..., None].to(x2.dtype)


@cuda_fused
def rms_norm_pair(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    """[y, gate·y] with y = rms_norm(x): the input of a fused-LoRA matmul (`Transformer.fuse_lora`)."""
    return _pair(_rms_norm(x, weight, eps), gate)


@cuda_fused
def add_rms_norm_dual(x2: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      gate: torch.Tensor):
    """`add_rms_norm` of x = base + gate·delta given as the halves [base, delta] of a fused-LoRA matmul's
    output: the LoRA's gate applied inside the residual add, one kernel on CUDA."""
    s = residual + _combine(x2, gate)
    return s, _rms_norm(s, weight, eps)


@cuda_fused
def add_rms_norm_dual_pair(x2: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           gate: torch.Tensor):
    """`add_rms_norm_dual` whose normalized output is the pair [y, gate·y] for the next fused-LoRA matmul."""
    s = residual + _combine(x2, gate)
    return s, _pair(_rms_norm(s, weight, eps), gate)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, *,
                pair: bool = False, dual: bool = False, exact: bool = False):
        """x [..., dim] -> rms_norm(x); with a residual: (residual + x, rms_norm(residual + x)).
        With an R-ISD gate [...] (0/1) for a fused LoRA (`Transformer.fuse_lora`): `dual` — x is the
        [base, delta] output of a fused matmul [..., 2·dim] and stands for base + gate·delta (needs a
        residual); `pair` — the normalized output is [y, gate·y] [..., 2·dim] instead of y.
        exact (issue 16): one Triton program per row (`idlm.layers.invariant.invariant_rms_norm`), so a
        row's bits do not depend on the other rows (a reduction's order in PyTorch or inductor may)."""
        if exact:
            from idlm.layers.invariant import invariant_rms_norm

            return invariant_rms_norm(x, self.weight, self.eps, residual, gate, pair, dual)
        if residual is None:
            if dual:
                raise ValueError("a dual input needs the residual stream it is added to")
            return rms_norm_pair(x, self.weight, self.eps, gate) if pair else rms_norm(x, self.weight, self.eps)
        if dual:
            fn = add_rms_norm_dual_pair if pair else add_rms_norm_dual
            return fn(x, residual, self.weight, self.eps, gate)
        if pair:
            s = residual + x
            return s, rms_norm_pair(s, self.weight, self.eps, gate)
        return add_rms_norm(x, residual, self.weight, self.eps)
