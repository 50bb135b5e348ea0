"""The paged KV cache: preallocated pools of fixed-size blocks, a K and a V pool per layer, sized from free memory.

Each pool is [blocks, block_size, kv_heads, head_dim] and its own allocation. One tensor for every layer (views
of it as pools) made a block across the model one indexed copy, but torch.compile sees views of one storage as
aliased inputs and copies a whole pool around each in-place K/V write (a 135M model's CPU decode step went from
15 ms eager to 160 ms compiled); separate pools are written in place. Copy on write and swap, which touch a few
blocks now and then, loop over the layers instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ferry.errors import FerryError

log = logging.getLogger("ferry.kv")

BLOCK_SIZE = 16
# What the KV cache may take on a GPU when nothing is said: a share of the memory free once the weights are
# loaded; the rest holds prefill activations, logits and captured graphs.
DEFAULT_GPU_FRACTION = 0.85
DEFAULT_CPU_GIB = 1.0  # CPU pages are touched only as blocks fill, so an unused reserve costs no resident memory


@dataclass(frozen=True)
class KVMemory:
    """`--kv-memory`: a fraction (0, 1] of free device memory, or an absolute size in GiB."""

    fraction: float | None = None
    gib: float | None = None

    @classmethod
    def parse(cls, text: str | float | None) -> KVMemory:
        if text is None:
            return cls()
        if isinstance(text, (int, float)):
            text = str(text)
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|g|gb)?\s*", text.lower())
        if not m:
            raise FerryError(f"--kv-memory {text!r}: give a fraction of free memory (0.8) or a size (6GiB)")
        value = float(m.group(1))
        if m.group(2):
            if value <= 0:
                raise FerryError(f"--kv-memory {text!r} must be more than 0 GiB")
            return cls(gib=value)
        if not 0 < value <= 1:
            raise FerryError(f"--kv-memory {text!r}: a fraction must be in (0, 1]; write '{value}GiB' for a size")
        return cls(fraction=value)

    def budget_bytes(self, device: torch.device) -> tuple[int, str]:
        """Bytes the cache may take, and how that figure was reached (for the start-up report)."""
        if self.gib is not None:
            return int(self.gib * (1 << 30)), f"{self.gib:g} GiB asked"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            fraction = self.fraction or DEFAULT_GPU_FRACTION
            return int(free * fraction), f"{fraction:g} of {free / (1 << 30):.1f} GiB free"
        if self.fraction is not None:
            raise FerryError(f"--kv-memory as a fraction needs a GPU (free memory is not measured on {device.type}); "
                             "give a size such as 2GiB")
        return int(DEFAULT_CPU_GIB * (1 << 30)), f"{DEFAULT_CPU_GIB:g} GiB default on {device.type}"


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, device
        # Uninitialised: attention reads only the slots a sequence wrote (the reference path zeroes what it masks).
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self.pools = [pool for pair in self.layers for pool in pair]  # K0, V0, K1, V1, ...

    @classmethod
    def bytes_per_block(cls, num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * (torch.finfo(dtype).bits // 8)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = BLOCK_SIZE,
                  num_layers: int | None = None) -> PagedKVCache:
        """A cache of `num_blocks` blocks for `model`'s layers on this rank (the last `num_layers` of them where a
        split deployment runs only those), in its dtype and on its device."""
        weight = model.norm.weight
        return cls(num_layers or model.config.num_layers, num_blocks, block_size, model.kv_heads_per_rank,
                   model.config.head_dim, weight.dtype, weight.device)

    @classmethod
    def blocks_within(cls, model, memory: KVMemory, block_size: int = BLOCK_SIZE,
                      num_layers: int | None = None) -> tuple[int, str]:
        """How many blocks `memory` allows for `model` on this rank (`num_layers` of its layers: all by default),
        and how the budget was reached."""
        weight = model.norm.weight
        per_block = cls.bytes_per_block(num_layers or model.config.num_layers, block_size, model.kv_heads_per_rank,
                                        model.config.head_dim, weight.dtype)
        budget, note = memory.budget_bytes(weight.device)
        blocks = budget // per_block
        if blocks < 2:
            raise FerryError(f"the KV cache budget ({note}, {budget / (1 << 20):.0f} MiB) holds no full block of "
                             f"{block_size} tokens ({per_block / (1 << 20):.1f} MiB); raise --kv-memory")
        return int(blocks), note

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * (torch.finfo(self.dtype).bits // 8)

    @property
    def nbytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self.pools)

    def block_view(self, blocks: torch.Tensor) -> torch.Tensor:
        """The K/V of `blocks` across every layer, packed: [layers, 2, n, block_size, kv_heads, head_dim] (a copy)."""
        packed = torch.empty((self.num_layers, 2, blocks.numel(), self.block_size, self.kv_heads, self.head_dim),
                             dtype=self.dtype, device=self.device)
        for pool, out in zip(self.pools, packed.view(-1, *packed.shape[2:]), strict=True):
            torch.index_select(pool, 0, blocks, out=out)
        return packed

    def write_blocks(self, blocks: torch.Tensor, packed: torch.Tensor) -> None:
        for pool, values in zip(self.pools, packed.reshape(-1, *packed.shape[2:]), strict=True):
            pool.index_copy_(0, blocks, values)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy on write: block `src`'s K/V of every layer into block `dst`."""
        for pool in self.pools:
            pool[dst].copy_(pool[src])
