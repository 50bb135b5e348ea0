"""Megatron-style linear layers: column-parallel (outputs split) and row-parallel (inputs split, all-reduced).

With a one-rank group they are plain linears; the model never branches on the parallel layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.model.layers.quant import (
    Int4Weight,
    Int8Weight,
    QMatmulWeight,
    int4_linear,
    int8_linear,
    qmatmul_linear,
    qmatmul_unavailable,
    quantize_rows_int8,
)
from ferry.model.weights.repack import can_pack_int4, can_pack_q8_0, pack_int4, pack_q8_0
from ferry.model.weights.repack_qmatmul import can_pack_qmatmul, pack_qmatmul
from ferry.model.weights.source import WeightSource


class QuantizableMatmul(nn.Module):
    """x W^T with W dense (`weight`), int8 rows with per-row scales after `quantize_int8()`, or a checkpoint's own
    4/8-bit groups (`int4`: Ferry's qmatmul layout, else torch's int4 one) when the model keeps GGUF weights
    quantized (`keep_quantized`)."""

    weight: nn.Parameter
    int8: Int8Weight | None = None
    int4: Int4Weight | QMatmulWeight | None = None
    keep_quantized = False  # set per module before loading (LlamaForCausalLM.keep_quantized)
    # Run every matmul this many times: emulates a device that much slower (a placement's `slowdown`, to test and
    # measure uneven splits on one host). 1 everywhere else.
    slowdown = 1

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.slowdown - 1):
            self._matmul(x)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.int4, QMatmulWeight):
            return qmatmul_linear(x, self.int4)
        if self.int4 is not None:
            return int4_linear(x, self.int4)
        if self.int8 is not None:
            return int8_linear(x, self.int8)
        return F.linear(x, self.weight)

    @property
    def weight_format(self) -> str:
        if isinstance(self.int4, QMatmulWeight):
            return f"{self.int4.bits}-bit qmatmul ({torch.ops.ferry_cpu.isa()})"
        if self.int4 is not None:
            return "int4" if self.int4.input_copies == 1 else "q8_0 as int4 pairs"
        return "int8" if self.int8 is not None else str(self.weight.dtype)

    def quantize_int8(self) -> None:
        if self.int4 is not None:
            return  # already the checkpoint's own 4 bits
        self.int8 = quantize_rows_int8(self.weight.data)
        self.weight = nn.Parameter(self.weight.data.new_empty(0), requires_grad=False)  # free the dense copy

    def load_int4(self, source: WeightSource, slices: list[tuple[str, int, int, int | None]]) -> bool:
        """Keep this matmul's GGUF blocks when every slice (name, dim, start, stop) of it is Q4_0/Q4_1 or Q8_0: for
        Ferry's qmatmul kernel where it is built, else for torch's int4 kernel where that takes them (Q4 in whole
        tiles, or one Q8_0 slice as int4 pairs); False (nothing loaded) otherwise."""
        get_blocks = getattr(source, "get_blocks", None)
        if not self.keep_quantized or get_blocks is None:
            return False
        parts = [get_blocks(name, dim, start, stop) for name, dim, start, stop in slices]
        if any(p is None for p in parts):
            return False
        # On the CPU, the only device --weights quantized takes.
        if can_pack_qmatmul(parts) and qmatmul_unavailable() is None:
            self.int4 = pack_qmatmul(parts)
        elif self.weight.dtype != torch.bfloat16:
            return False  # torch's int4 kernel is ~10x slower with fp32 activations than the dense matmul it replaces
        elif can_pack_int4(parts):
            self.int4 = pack_int4(parts, self.weight.dtype)
        elif len(parts) == 1 and can_pack_q8_0(parts[0]):
            self.int4 = pack_q8_0(parts[0], self.weight.dtype)
        else:
            return False
        self.weight = nn.Parameter(self.weight.data.new_empty(0), requires_grad=False)
        return True


class ColumnParallelLinear(QuantizableMatmul):
    """y = x W^T with W's output rows made of one or more logical blocks, each split over the group.

    `block_sizes` lists the logical outputs fused into one matmul (e.g. gate and up projections), and
    `unit` the granule a block may be cut at (a head's width for attention projections). `block_ranges` gives
    each block's [start, stop) rows explicitly instead, for layouts that are not an even split (replicated KV heads).
    """

    def __init__(
        self,
        in_features: int,
        block_sizes: list[int],
        group: ParallelGroup,
        bias: bool = False,
        units: list[int] | None = None,
        block_ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        if block_ranges is None:
            units = units or [1] * len(block_sizes)
            block_ranges = [group.shard_range(size, unit) for size, unit in zip(block_sizes, units, strict=True)]
        self.block_ranges = list(block_ranges)
        self.out_features = sum(stop - start for start, stop in self.block_ranges)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    @property
    def local_block_sizes(self) -> list[int]:
        return [stop - start for start, stop in self.block_ranges]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out

    def load(self, source: WeightSource, names: list[str]) -> None:
        """Load each logical block's shard from the tensor named for it (names without `.weight`)."""
        as_int4 = self.load_int4(source, [(f"{name}.weight", 0, start, stop)
                                          for name, (start, stop) in zip(names, self.block_ranges, strict=True)])
        offset = 0
        for name, (start, stop) in zip(names, self.block_ranges, strict=True):
            rows = slice(offset, offset + stop - start)
            if not as_int4:
                self.weight.data[rows].copy_(source.get(f"{name}.weight", dim=0, start=start, stop=stop))
            if self.bias is not None:
                self.bias.data[rows].copy_(source.get(f"{name}.bias", dim=0, start=start, stop=stop))
            offset += stop - start


class RowParallelLinear(QuantizableMatmul):
    """y = sum over ranks of x_r W_r^T: each rank holds a slice of the input features; one all-reduce."""

    def __init__(
        self, in_features: int, out_features: int, group: ParallelGroup, unit: int = 1,
        in_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.in_range = in_range if in_range is not None else group.shard_range(in_features, unit)
        self.weight = nn.Parameter(
            torch.empty(out_features, self.in_range[1] - self.in_range[0]), requires_grad=False
        )

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """`reduce=False`: this rank's partial sum, for callers that all-reduce it themselves (overlap)."""
        partial = self.matmul(x)
        return self.group.all_reduce(partial, compressible=True) if reduce else partial

    def load(self, source: WeightSource, name: str) -> None:
        start, stop = self.in_range
        if not self.load_int4(source, [(f"{name}.weight", 1, start, stop)]):
            self.weight.data.copy_(source.get(f"{name}.weight", dim=1, start=start, stop=stop))
