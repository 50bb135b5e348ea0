"""The handle a parallel layer holds to talk to its peers.

Layers get a `ParallelGroup` passed in (never read global rank state), so one model definition serves
world size 1 and any tensor-parallel layout: with one rank every collective is the identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ferry.comm.allreduce_engine import AllReduceEngine, PendingSum
from ferry.comm.link_time import CollectiveClock
from ferry.model.layers import fused
from ferry.model.layers.shard import shard_range, shard_sizes


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    process_group: dist.ProcessGroup | None = None
    compression: str | None = None  # "int8": lossy all-reduce of row-parallel outputs (see compressed.py)
    allreduce: AllReduceEngine | None = None  # per-size path choice (allreduce_engine.py); None: the process group
    # Each rank's weight in an uneven split of heads, FFN columns and vocabulary (ranks of unequal speed,
    # placement.py); None: even.
    shares: tuple[float, ...] | None = None
    # Wall seconds in collectives on CPU, where a call returns when its sum is done (link_time.py: on CUDA the
    # engine estimates instead). Shared by the copies `replace` makes, so every layer's calls add to one clock.
    clock: CollectiveClock = field(default_factory=CollectiveClock, compare=False, repr=False)

    def shard_range(self, total: int, unit: int = 1) -> tuple[int, int]:
        """[start, stop) of this rank's share of `total` (cut at multiples of `unit`)."""
        start, stop = shard_range(total // unit, self.world_size, self.rank, self.shares)
        return start * unit, stop * unit

    def shard_widths(self, total: int) -> list[int]:
        return shard_sizes(total, self.world_size, self.shares)

    def with_allreduce(self, mode: str, device: torch.device, dtype: torch.dtype) -> ParallelGroup:
        """This group with an all-reduce engine for `mode` ("auto": calibrated; or one path's name)."""
        if self.world_size == 1:
            return self
        return replace(self, allreduce=AllReduceEngine.for_group(mode, self.process_group, device, dtype))

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls()

    def all_reduce(self, tensor: torch.Tensor, compressible: bool = False) -> torch.Tensor:
        """Sum `tensor` over the group and return the sum (in place unless the compressed path runs).

        `compressible`: the caller tolerates the lossy path when the group is configured for one (row-parallel
        layer outputs do; the vocabulary-parallel embedding, where one rank holds each row exactly, does not)."""
        if self.world_size == 1:
            return tensor
        if tensor.device.type == "cpu":
            began = time.perf_counter()
            out = self._all_reduce(tensor, compressible)
            self.clock.allreduce_s += time.perf_counter() - began
            return out
        return self._all_reduce(tensor, compressible)

    def _all_reduce(self, tensor: torch.Tensor, compressible: bool) -> torch.Tensor:
        if compressible and self.compression == "int8":
            from ferry.comm.compressed import int8_all_reduce

            return int8_all_reduce(tensor, self.process_group)
        if self.allreduce is not None:
            return self.allreduce.reduce(tensor)
        dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def reduce_add_norm(self, partial: torch.Tensor, residual: torch.Tensor, norm) -> torch.Tensor | None:
        """residual += the sum of `partial` over the group (a row-parallel layer's output; in place); returns
        norm(residual) for the next matmul, or None where `norm` is None. Where the all-reduce engine picks its
        fused path for this size, the sum, the add and the norm are one kernel; else the sum runs on its own path
        and the add and the norm are one kernel after it (on GPUs; fused.py)."""
        weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        if self.world_size > 1:
            # On CPU there is no fused kernel: the engine's reduce_add_norm is its plain sum, then the add and the
            # norm, which is what the lines below do, with the sum timed as an all-reduce.
            if self.allreduce is not None and self.compression is None and partial.device.type != "cpu":
                return self.allreduce.reduce_add_norm(partial, residual, weight, eps)
            partial = self.all_reduce(partial, compressible=True)
        return fused.add_rmsnorm(partial, residual, weight, eps)

    def all_reduce_async(self, tensor: torch.Tensor) -> PendingSum:
        """Start an exact sum of `tensor` over the group; `.wait()` returns it. Work issued before the wait
        overlaps it; the wait orders the current stream after it. Through the all-reduce engine where the group
        has one, so a forced `--allreduce` path holds here too and every call is counted."""
        if self.world_size == 1:
            return PendingSum(tensor, None)
        if self.allreduce is not None:
            return self.allreduce.reduce_async(tensor)
        return PendingSum(tensor, dist.all_reduce(tensor, group=self.process_group, async_op=True))

    def max_over_ranks(self, value: float, device: torch.device) -> float:
        """The largest of every rank's `value` (for timings: the slowest rank sets the pace)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return float(t)

    def min_over_ranks(self, value: float, device: torch.device) -> float:
        return -self.max_over_ranks(-value, device)

    def all_gather_last_dim(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dimension; rank r holds `widths[r]` columns.

        Collectives need equal sizes, so each rank pads to the widest shard and the padding is cut after."""
        if self.world_size == 1:
            return tensor
        widest = max(widths)
        if tensor.shape[-1] < widest:
            tensor = torch.nn.functional.pad(tensor, (0, widest - tensor.shape[-1]))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        began = time.perf_counter()
        dist.all_gather(parts, tensor.contiguous(), group=self.process_group)
        if tensor.device.type == "cpu":
            self.clock.allgather_s += time.perf_counter() - began
        return torch.cat([part[..., :w] for part, w in zip(parts, widths, strict=True)], dim=-1)

