"""A request's life in the serving engine: its sequence, sampling, blocks, and how far its K/V is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ferry.engine.block_manager import BlockTable
from ferry.engine.sampling import Sampler, SamplingParams
from ferry.engine.sequence import Sequence


class Status(enum.Enum):
    WAITING = "waiting"  # not started, or preempted by recompute (its blocks were dropped)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted: its K/V waits in pinned host memory
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    id: int
    seq: Sequence
    params: SamplingParams
    sampler: Sampler
    eos_ids: frozenset[int]
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    table: BlockTable = field(default_factory=BlockTable)
    token_ids: list[int] = field(default_factory=list)  # prompt + output tokens read back so far
    computed: int = 0  # leading tokens whose K/V writes have been launched
    # Sampled tokens still on their way back: at most one when a step is scheduled (the previous step's, which is
    # the next input, read on the device), two for a moment after the next step launched.
    pending: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    prefilled_tokens: int = 0  # tokens this request ran through the model as prefill (recomputes included)
    preemptions: int = 0
    swapped: object | None = None  # the host copy of its K/V while SWAPPED

    def __post_init__(self) -> None:
        self.token_ids = list(self.seq.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, counting a sampled token still in flight."""
        return len(self.token_ids) + self.pending

    @property
    def to_compute(self) -> int:
        return self.num_tokens - self.computed

    @property
    def out_of_tokens(self) -> bool:
        """Its last token is sampled (maybe still in flight): nothing more to run for it."""
        return len(self.seq.output_ids) + self.pending >= self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
