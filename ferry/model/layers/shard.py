"""How a dimension is cut across the ranks of a group: evenly, or in proportion to each rank's weight (its
measured speed, for ranks on devices of unequal speed)."""

from __future__ import annotations


def shard_sizes(total: int, world_size: int, weights: tuple[float, ...] | None = None) -> list[int]:
    """Split `total` units over ranks: as evenly as possible (the first ranks take the remainder), or in
    proportion to `weights` (largest remainders round up, earlier ranks first on ties), every rank at least one
    unit where there are enough. Equal weights give the even split."""
    if weights is None or len(set(weights)) == 1:
        base, extra = divmod(total, world_size)
        return [base + (1 if r < extra else 0) for r in range(world_size)]
    if len(weights) != world_size or min(weights) <= 0:
        raise ValueError(f"{world_size} ranks need {world_size} positive weights, got {weights}")
    exact = [total * w / sum(weights) for w in weights]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(world_size), key=lambda r: (-(exact[r] - sizes[r]), r))
    for r in by_remainder[: total - sum(sizes)]:
        sizes[r] += 1
    for r in range(world_size):  # a rank of tiny weight still gets a unit, from the largest share
        if sizes[r] == 0 and total >= world_size:
            sizes[max(range(world_size), key=lambda i: sizes[i])] -= 1
            sizes[r] = 1
    return sizes

def shard_range(total: int, world_size: int, rank: int, weights: tuple[float, ...] | None = None) -> tuple[int, int]:
    """[start, stop) of `rank`'s share of `total` units."""
    sizes = shard_sizes(total, world_size, weights)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]
