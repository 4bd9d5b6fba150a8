"""RMSNorm, computed in float32 and cast back exactly as the HF reference does (for bit parity).
On CUDA the same formula runs as one fused kernel (`idlm.layers.fused`)."""

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., dim] -> rms_norm(x); with a residual: (residual + x, rms_norm(residual + x))."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
