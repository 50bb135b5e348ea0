"""Which tokens run in the next step: continuous batching with chunked prefill and preemption.

Each step has a token budget. Running sequences go first, oldest first: a decoding one needs one token, a
prefilling one gets the next chunk of its prompt (as much as the budget leaves), so a long prompt is spread over
steps and never stalls the decodes around it. Then sequences swapped out earlier come back, then waiting requests
are admitted first come first served (after a prefix-cache lookup) while budget, blocks and the sequence limit
allow. When a running sequence needs a block and none is free, the newest running sequence is preempted: its K/V
goes to pinned host memory (swap) or is dropped to be recomputed later, whichever the preemption policy says is
cheaper for it; a step that preempted admits nobody new.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ferry.engine.block_manager import BlockManager
from ferry.engine.request import Request, Status
from ferry.errors import FerryError

log = logging.getLogger("ferry.scheduler")


class QueueFullError(FerryError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503/429)."""


@dataclass(frozen=True)
class SchedulerLimits:
    max_batched_tokens: int = 512  # tokens per step: decodes + prefill chunks
    max_running: int = 64  # sequences in one step (the largest CUDA-graph bucket used)
    max_waiting: int = 1024  # bound of the FCFS queue
    # Admission in groups: new requests join a running batch once `min_admission` of them can (or the first has
    # waited `admission_wait_steps` steps, or nothing runs). A step that carries a prefill chunk runs eagerly,
    # outside the decode graphs: on an H200 at the Llama-3-8B shape, batch 64, such a step took 62.6 ms against
    # 8.2 ms for a captured decode step, and admitting one request at a time made 171 of them in a 256-request run
    # (12.8 of its 18.0 s). The engine sets 1 (no grouping) where decode steps are eager too.
    min_admission: int = 1
    admission_wait_steps: int = 16

    def __post_init__(self) -> None:
        if self.min_admission < 1:
            raise FerryError(f"min_admission must be >= 1, got {self.min_admission}")
        if self.max_batched_tokens < self.max_running:
            raise FerryError(f"a step's token budget ({self.max_batched_tokens}) must cover one decode token of each "
                             f"of the {self.max_running} running sequences")


@dataclass(frozen=True)
class Chunk:
    request: Request
    start: int  # first position of the chunk
    length: int
    samples: bool  # it reaches the end of the sequence's tokens: its last logits give the next token


@dataclass
class ScheduledStep:
    decodes: list[Chunk] = field(default_factory=list)  # one token each
    prefills: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies (src, dst) to run first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Preemption(Protocol):
    """How a preempted sequence's K/V is kept (kv_swap.py: it owns the cache copies and the link measurements)."""

    def prefer_swap(self, request: Request) -> bool: ...

    def swap_out(self, request: Request) -> None: ...

    def swap_in(self, request: Request) -> None: ...

    def discard(self, request: Request) -> None: ...


class Scheduler:
    def __init__(self, blocks: BlockManager, limits: SchedulerLimits, preemption: Preemption) -> None:
        self.blocks, self.limits, self.preemption = blocks, limits, preemption
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.swapped: deque[Request] = deque()
        self.steps = 0  # schedule() calls, the clock admission waits are counted in
        self._held_since: int | None = None  # the step since which a waiting request could join but was held
        # Keep a few blocks back when admitting, so running sequences can grow a while before anyone is preempted.
        self.watermark = max(1, blocks.usable_blocks // 100)

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting already (the bound); retry later")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledStep:
        self.steps += 1
        step = ScheduledStep()
        self._budget = self.limits.max_batched_tokens
        for r in self.running:  # what earlier steps computed can now be shared (their writes are queued first)
            self.blocks.register_full_blocks(r.table, r.token_ids, min(r.computed, len(r.token_ids)))
        self._schedule_decodes(step)
        self._schedule_running_prefills(step)
        if step.preempted:
            return step
        self._swap_in(step)
        if not self.swapped:  # older, swapped-out sequences come back before anyone new starts
            self._admit_waiting(step)
        return step

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        """One token for every decoding sequence, oldest first; out of blocks, the newest running sequence (never
        one already in this step: they are older) is preempted until the block is found."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.out_of_tokens or r.to_compute != 1:
                i += 1
                continue
            while not self.blocks.ensure_slots(r.table, r.computed + 1):
                victim = self.running.pop()
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is r:
                    break
            else:
                self._take(step, r, 1)
                i += 1

    def _schedule_running_prefills(self, step: ScheduledStep) -> None:
        """The next chunk of each sequence still prefilling, as far as budget and free blocks go."""
        for r in self.running:
            if r.to_compute > 1 and self._budget > 0:
                length = min(r.to_compute, self._budget, self._room(r, reserve=0))
                if length > 0 and self.blocks.ensure_slots(r.table, r.computed + length):
                    self._take(step, r, length)

    def _swap_in(self, step: ScheduledStep) -> None:
        while self.swapped and self._budget > 0 and len(self.running) < self.limits.max_running:
            r = self.swapped[0]
            reserve = self.watermark if self.running else 0
            if r.pending or self.blocks.blocks_for(r.computed + 1) + reserve > self.blocks.free_blocks:
                break
            self.swapped.popleft()
            self.blocks.ensure_slots(r.table, r.computed)
            self.preemption.swap_in(r)
            r.status = Status.RUNNING
            self.running.append(r)
            if r.out_of_tokens or r.to_compute <= 0:
                continue
            # Swapped while prefilling, it continues with a chunk as long as budget and free blocks allow.
            length = 1 if r.to_compute == 1 else min(r.to_compute, self._budget, self._room(r, reserve=0))
            if length > 0 and self.blocks.ensure_slots(r.table, r.computed + length):
                self._take(step, r, length)

    def _admission_open(self) -> bool:
        """Whether waiting requests may join this step (see SchedulerLimits.min_admission)."""
        could_join = min(self.limits.max_running - len(self.running), len(self.waiting))
        if not self.running or could_join >= self.limits.min_admission:
            self._held_since = None
            return True
        if could_join == 0:
            return False
        # Someone could join but the group is not full yet: hold them at most admission_wait_steps steps.
        if self._held_since is None:
            self._held_since = self.steps
        if self.steps - self._held_since >= self.limits.admission_wait_steps:
            self._held_since = None
            return True
        return False

    def _admit_waiting(self, step: ScheduledStep) -> None:
        if not self.waiting or not self._admission_open():
            return
        while self.waiting and self._budget > 0 and len(self.running) < self.limits.max_running:
            r = self.waiting[0]
            if r.pending:
                break  # preempted with a token in flight: that token is read back before it restarts
            hit = self.blocks.match_prefix(r.token_ids)
            hit_tokens = hit.tokens(self.blocks.block_size)
            reserve = self.watermark if (self.running or step) else 0
            revived = sum(1 for b in hit.blocks if self.blocks.ref_counts[b] == 0)  # counted free until shared
            fits = (len(hit.blocks) + self.blocks.free_blocks - revived - reserve) * self.blocks.block_size \
                - hit_tokens
            length = min(r.num_tokens - hit_tokens, self._budget, fits)
            if length <= 0:
                break
            copy_from = self.blocks.allocate_with_prefix(r.table, hit)
            if copy_from is not None:
                step.copies.append((copy_from, r.table.blocks[-1]))
            r.computed = hit_tokens
            r.prefix_hit_tokens += hit_tokens
            if not self.blocks.ensure_slots(r.table, r.computed + length):
                raise AssertionError("admission sized a chunk the free blocks could not hold")
            self.waiting.popleft()
            r.status = Status.RUNNING
            self.running.append(r)
            self._take(step, r, length)

    def _room(self, r: Request, reserve: int) -> int:
        """Tokens `r` can add with the blocks it holds plus the free ones (less `reserve`)."""
        return (len(r.table) + self.blocks.free_blocks - reserve) * self.blocks.block_size - r.computed

    def _take(self, step: ScheduledStep, r: Request, length: int) -> None:
        self._budget -= length
        chunk = Chunk(r, r.computed, length, samples=r.computed + length == r.num_tokens)
        if length == 1 and chunk.samples:
            step.decodes.append(chunk)
        else:
            step.prefills.append(chunk)
            r.prefilled_tokens += length
        r.computed += length

    def _preempt(self, r: Request) -> None:
        r.preemptions += 1
        if self.preemption.prefer_swap(r):
            self.preemption.swap_out(r)  # copies its blocks to the host before anything can overwrite them
            self.blocks.free(r.table)
            r.status = Status.SWAPPED
            self.swapped.append(r)
        else:
            self.blocks.free(r.table)
            r.computed = 0
            r.status = Status.WAITING
            self.waiting.appendleft(r)

    def remove(self, r: Request) -> None:
        """Drop a finished or aborted request wherever it is and give back its blocks."""
        for queue in (self.running, self.waiting, self.swapped):
            if r in queue:
                queue.remove(r)
                break
        self.blocks.free(r.table)
        if r.swapped is not None:  # aborted while swapped out: its host copy goes back to the pool
            self.preemption.discard(r)
        r.status = Status.FINISHED
