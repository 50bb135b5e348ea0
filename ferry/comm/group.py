"""The handle a parallel layer holds to talk to its peers.

Layers get a `ParallelGroup` passed in (never read global rank state), so one model definition serves
world size 1 and any tensor-parallel layout: with one rank every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    process_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group in place and return it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dimension; rank r holds `widths[r]` columns.

        Collectives need equal sizes, so each rank pads to the widest shard and the padding is cut after."""
        if self.world_size == 1:
            return tensor
        widest = max(widths)
        if tensor.shape[-1] < widest:
            tensor = torch.nn.functional.pad(tensor, (0, widest - tensor.shape[-1]))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.process_group)
        return torch.cat([part[..., :w] for part, w in zip(parts, widths, strict=True)], dim=-1)
