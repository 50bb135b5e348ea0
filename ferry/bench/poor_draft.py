"""A deliberately poor draft for speculative rounds: the worst case the gamma controller must cope with."""

from __future__ import annotations

from ferry.edge.speculative import Drafter


class WrongDrafter(Drafter):
    """Proposes the draft model's greedy token plus one (mod the vocabulary): it costs what the real draft costs,
    and since the draft usually agrees with the target, its proposals are almost never accepted."""

    def _feed(self, ids: list[int], start: int) -> int:
        return (super()._feed(ids, start) + 1) % self.loaded.config.vocab_size
