"""How a dimension is cut across the ranks of a group."""

from __future__ import annotations


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Split `total` units over ranks as evenly as possible; the first ranks take the remainder."""
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share of `total` units."""
    sizes = shard_sizes(total, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]
