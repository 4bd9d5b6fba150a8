"""RMSNorm, computed in float32 and cast back exactly as the HF reference does (for bit parity).
On CUDA the same formula runs as one fused kernel (`idlm.layers.fused`)."""

import torch
from torch import nn

from idlm.layers.fused import cuda_fused


@cuda_fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        return rms_norm(x, self.weight, self.eps)
