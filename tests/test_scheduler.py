"""The scheduler on its own (no model): how waiting requests join a running batch."""

from __future__ import annotations

from ferry.engine.block_manager import BlockManager
from ferry.engine.request import Request
from ferry.engine.sampling import SamplingParams
from ferry.engine.scheduler import Scheduler, SchedulerLimits
from ferry.engine.sequence import Sequence


class _NoSwap:
    def prefer_swap(self, request) -> bool:
        return False


def _scheduler(**limits) -> Scheduler:
    return Scheduler(BlockManager(256, 16), SchedulerLimits(**limits), _NoSwap())


def _request(i: int) -> Request:
    return Request(i, Sequence([1, 2, 3, 4]), SamplingParams(max_tokens=100, ignore_eos=True), None, frozenset())


def _run(s: Scheduler) -> list[int]:
    """One step: every scheduled sequence gets its token back at once; returns who was admitted (prefilled)."""
    step = s.schedule()
    for chunk in step.decodes + [c for c in step.prefills if c.samples]:
        chunk.request.token_ids.append(7)
        chunk.request.seq.output_ids.append(7)
    return [c.request.id for c in step.prefills]


def test_waiting_requests_join_a_running_batch_in_groups_or_after_a_bounded_wait():
    s = _scheduler(max_batched_tokens=64, max_running=4, min_admission=2, admission_wait_steps=3)
    requests = [_request(i) for i in range(8)]
    for r in requests:
        s.add(r)
    assert _run(s) == [0, 1, 2, 3]  # nothing runs: admitted at once
    s.remove(requests[0])
    assert [_run(s) for _ in range(3)] == [[], [], []]  # one slot free: held for a group of two ...
    assert _run(s) == [4]  # ... at most three steps
    s.remove(requests[1])
    s.remove(requests[2])
    assert _run(s) == [5, 6]  # two slots free: the group joins at once


def test_one_at_a_time_admission_when_grouping_is_off():
    s = _scheduler(max_batched_tokens=64, max_running=2, min_admission=1)
    requests = [_request(i) for i in range(3)]
    for r in requests:
        s.add(r)
    assert _run(s) == [0, 1]
    s.remove(requests[0])
    assert _run(s) == [2]


def test_a_request_removed_while_swapped_out_gives_its_host_copy_back():
    class Recording(_NoSwap):
        def __init__(self) -> None:
            self.discarded: list[int] = []

        def discard(self, request) -> None:
            self.discarded.append(request.id)
            request.swapped = None

    preemption = Recording()
    s = Scheduler(BlockManager(256, 16), SchedulerLimits(max_batched_tokens=64, max_running=4), preemption)
    swapped, plain = _request(0), _request(1)
    for r in (swapped, plain):
        s.add(r)
    _run(s)
    swapped.swapped = object()  # as a swap-out leaves it
    s.remove(swapped)
    s.remove(plain)
    assert preemption.discarded == [0] and swapped.swapped is None
