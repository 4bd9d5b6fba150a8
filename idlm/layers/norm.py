"""RMSNorm, computed in float32 and cast back exactly as the HF reference does (for bit parity).
On CUDA the same formula runs as one fused kernel (`idlm.layers.fused`), also with the residual add
before it, and with the [y, gate·y] pair a fused-LoRA matmul takes after it (R-ISD)."""

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


@cuda_fused
def rms_norm_pair(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    """[y, gate·y] with y = rms_norm(x): the input of a fused-LoRA matmul (`Transformer.fuse_lora`)."""
    return _pair(_rms_norm(x, weight, eps), gate)


@cuda_fused
def add_rms_norm_pair(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      gate: torch.Tensor):
    """`add_rms_norm` whose normalized output is the pair [y, gate·y], in one kernel on CUDA."""
    s = residual + x
    return s, _pair(_rms_norm(s, weight, eps), gate)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, pair: torch.Tensor | None = None):
        """x [..., dim] -> rms_norm(x); with a residual: (residual + x, rms_norm(residual + x)).
        pair = a gate [...] (0/1): the normalized output is [y, gate·y] [..., 2·dim] instead of y."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps) if pair is None else rms_norm_pair(x, self.weight, self.eps, pair)
        if pair is None:
            return add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_pair(x, residual, self.weight, self.eps, pair)
