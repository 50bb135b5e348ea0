"""Time per link for `/metrics`: what each link's transfers took, measured where it can be, estimated where not.

- Host <-> device copies (copy_stream.py): on CUDA two timing events bracket each copy on the stream that runs it,
  and their elapsed time is read later, once the end event has passed (`query`, never a wait): a step gains two
  event records per copy and no sync. Without CUDA the copy is a memcpy, timed by the host clock.
- Collectives (`CollectiveTime`): on CPU (gloo, host shared memory) a call returns when its sum is done, so the
  rank's wall time in calls is their time. On CUDA a decode step's all-reduces run inside a CUDA graph replay, which
  has no call to time, and timing events between the layers of eager steps would cost two records per call: so the
  time is an estimate, not a measurement: calls x the time the all-reduce engine's start-up calibration measured
  for the message size on the path it chose (inside a CUDA graph, as decode runs them), linear between calibrated
  sizes. The logits all-gather has no calibration, so on CUDA it gets no time.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

# Resolved copies are read when /metrics asks (every step under `ferry serve`); an engine nobody asks polls itself
# once this many are waiting, so the queue stays short either way.
_POLL_AT = 64


class CopyTimer:
    """Seconds of host -> device ("h2d") and device -> host ("d2h") copies."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._seconds = {"h2d": 0.0, "d2h": 0.0}
        self._pending: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._free: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # event pairs reused, not re-created

    def start(self, stream=None):
        """Mark the start of a copy about to be queued on `stream` (CUDA) or run now (CPU); None: not timed."""
        if not self.cuda:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None  # a copy inside a graph capture is no transfer yet
        pair = self._free.pop() if self._free else (torch.cuda.Event(enable_timing=True),
                                                    torch.cuda.Event(enable_timing=True))
        pair[0].record(stream)
        return pair

    def stop(self, mark, direction: str, stream=None) -> None:
        if mark is None:
            return
        if not self.cuda:
            self._seconds[direction] += time.perf_counter() - mark
            return
        mark[1].record(stream)
        self._pending.append((direction, *mark))
        if len(self._pending) >= _POLL_AT:
            self.poll()

    def poll(self) -> None:
        """Add the copies that have finished, in the order they were queued (a copy still running ends the pass)."""
        while self._pending and self._pending[0][2].query():
            direction, begin, end = self._pending.popleft()
            self._seconds[direction] += begin.elapsed_time(end) / 1e3
            self._free.append((begin, end))

    def seconds(self) -> dict[str, float]:
        """Cumulative seconds per direction, of the copies finished so far."""
        self.poll()
        return dict(self._seconds)


class CollectiveTime:
    """One engine's all-reduce and logits all-gather seconds, advanced once per step (`step`)."""

    def __init__(self, group, device: torch.device, calls_per_step: int, row_bytes: int) -> None:
        """`calls_per_step`: all-reduces per step (two per layer, one for the embedding), each of `row_bytes` x the
        step's token count."""
        self.group, self.calls, self.row_bytes = group, calls_per_step, row_bytes
        self.measured = device.type != "cuda"
        self.table = None if self.measured or group.allreduce is None else _calibration(group)
        self._cache: dict[int, float] = {}
        self._seen = group.clock.snapshot()
        self.allreduce_s = 0.0
        self.allgather_s = 0.0

    def step(self, tokens: int) -> None:
        """Account one step of `tokens` rows (a CUDA graph's padded rows included: they cross the link too)."""
        if self.measured:  # the forward ran synchronously: the group's clock moved by this step's calls
            now = self.group.clock.snapshot()
            self.allreduce_s += now[0] - self._seen[0]
            self.allgather_s += now[1] - self._seen[1]
            self._seen = now
            return
        if self.table is None:
            return
        per_call = self._cache.get(tokens)
        if per_call is None:
            per_call = self._cache[tokens] = estimate_s(self.table, tokens * self.row_bytes)
        self.allreduce_s += self.calls * per_call

    def seconds(self) -> dict[str, float]:
        """The gauges' keys: both measured (CPU), the all-reduce estimate (CUDA, calibrated), or none."""
        if self.measured:
            return {"allreduce_seconds": self.allreduce_s, "allgather_seconds": self.allgather_s}
        return {"allreduce_seconds": self.allreduce_s} if self.table is not None else {}


class CollectiveClock:
    """Wall seconds a rank spent in collective calls that return when done (CPU); ParallelGroup adds to it."""

    def __init__(self) -> None:
        self.allreduce_s = 0.0
        self.allgather_s = 0.0

    def snapshot(self) -> tuple[float, float]:
        return self.allreduce_s, self.allgather_s


def estimate_s(table: list[tuple[int, float]], nbytes: int) -> float:
    """Seconds of one all-reduce of `nbytes` from (calibrated size, seconds) points: the smallest size's time
    below it (a small message costs its launch and handshake), linear between sizes, proportional above the last."""
    if nbytes <= table[0][0]:
        return table[0][1]
    for (s0, t0), (s1, t1) in itertools.pairwise(table):
        if nbytes <= s1:
            return t0 + (t1 - t0) * (nbytes - s0) / (s1 - s0)
    size, seconds = table[-1]
    return seconds * nbytes / size


def _calibration(group) -> list[tuple[int, float]] | None:
    """(size, seconds) of the path the all-reduce engine takes at each calibrated size; None where it was forced to
    one path without timing (nothing to estimate from) or row-parallel sums take the int8 path instead."""
    if group.compression is not None:
        return None
    rows = group.allreduce.table
    points = [(row.max_bytes, row.times_us[row.path] / 1e6) for row in rows if row.path in row.times_us]
    return points if len(points) == len(rows) and points else None
