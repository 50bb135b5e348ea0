"""RMSNorm computed in fp32 and cast back, as the Llama reference does (keeps bf16 outputs comparable); one Triton
kernel on GPUs (fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from ferry.model.layers import fused
from ferry.model.weights.source import WeightSource


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rmsnorm(x, self.weight, self.eps)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.data.copy_(source.get(f"{name}.weight"))
