"""Which attention heads a tensor-parallel rank owns, KV heads replicated when ranks outnumber them.

Rule (also in the README):
- tp <= KV heads: KV heads are split as evenly as possible (the first ranks take one more) and each rank takes
  the whole query group of each of its KV heads. Nothing is replicated; SmolLM2's 9 query / 3 KV heads split
  6+3 queries (2+1 KV heads) at tp=2.
- tp > KV heads: query heads are split as evenly as possible and each rank holds a copy of every KV head its
  queries read. SmolLM2 at tp=4 splits queries 3+2+2+2; the third rank's queries 5 and 6 read KV heads 1 and 2,
  so it holds both. Replicated KV heads cost cache memory and K/V projection work on each rank that holds them.
- Refused: tp above the query-head count (a rank would have no attention work).

Attention never crosses ranks, so the only communication stays the one all-reduce after the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import FerryError
from ferry.model.layers.shard import shard_range


@dataclass(frozen=True)
class HeadShard:
    """One rank's heads: query heads [q_start, q_stop) and the KV heads [kv_start, kv_stop) they read."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    group_size: int  # query heads per KV head in the whole model

    @classmethod
    def for_rank(cls, num_heads: int, num_kv_heads: int, world_size: int, rank: int,
                 shares: tuple[float, ...] | None = None) -> HeadShard:
        """`shares`: each rank's weight for an uneven split (ranks of unequal speed); None splits evenly."""
        if num_heads % num_kv_heads:
            raise FerryError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        if world_size > num_heads:
            raise FerryError(f"--tp {world_size} is more ranks than this model's {num_heads} attention heads; "
                             f"use --tp <= {num_heads}")
        group = num_heads // num_kv_heads
        if world_size <= num_kv_heads:
            kv_start, kv_stop = shard_range(num_kv_heads, world_size, rank, shares)
            return cls(kv_start * group, kv_stop * group, kv_start, kv_stop, group)
        q_start, q_stop = shard_range(num_heads, world_size, rank, shares)
        return cls(q_start, q_stop, q_start // group, (q_stop - 1) // group + 1, group)

    @property
    def num_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start

    @property
    def kv_of_query(self) -> list[int]:
        """The local KV head each local query head reads."""
        return [q // self.group_size - self.kv_start for q in range(self.q_start, self.q_stop)]

    @property
    def local_group(self) -> int | None:
        """Query heads per local KV head when every local KV head serves the same number (then attention folds
        each group into the query axis); None when the counts differ and K/V are gathered per query head."""
        counts = [self.kv_of_query.count(k) for k in range(self.num_kv_heads)]
        return counts[0] if len(set(counts)) == 1 else None

    @property
    def replicates_kv(self) -> bool:
        return self.num_heads < self.group_size * self.num_kv_heads
