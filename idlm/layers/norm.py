"""RMSNorm, computed in float32 and cast back exactly as the HF reference does (for bit parity).

On CUDA the float32 normalisation is torch's fused `rms_norm` (one kernel instead of five: a decode
step is kernel-count bound on small models); on CPU the explicit HF formula keeps bit parity.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        dtype = x.dtype
        x = x.float()
        if x.is_cuda:
            x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
