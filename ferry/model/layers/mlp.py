"""SwiGLU feed-forward: gate and up fused into one column-parallel matmul, down row-parallel."""

from __future__ import annotations

import torch
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.model.layers import fused
from ferry.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from ferry.model.weights.source import WeightSource


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, group: ParallelGroup) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, group)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return self.down_proj(fused.silu_mul(self.gate_up_proj(x)), reduce=reduce)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate_up_proj.load(source, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(source, f"{prefix}.down_proj")
