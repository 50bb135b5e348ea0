"""RMSNorm computed in fp32 and cast back, as the Llama reference does (keeps bf16 outputs comparable)."""

from __future__ import annotations

import torch
from torch import nn

from ferry.model.weights.source import WeightSource


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.data.copy_(source.get(f"{name}.weight"))
