"""Host <-> device copies, ordered with events so compute waits only for the data it needs.

Two ways, by what the data is for:
- `copy`: on a dedicated copy stream, for transfers that can run ahead of or behind compute (weight streaming,
  token readback): the compute stream waits for the fence only where it needs the data.
- `copy_in_order`: on the current stream, for a small upload the very next kernel consumes (a step's packed
  inputs). There is nothing to overlap it with, and a second stream costs: a 4 KiB copy there took 1.5x the raw
  copy's time before any wait and 2.0x once ordered after compute, on the H200 machine
  (benchmarks/results/2026-11-30_host_copy_anatomy.md).
`non_blocking` is used only when the host side is pinned (a non-blocking copy from pageable memory is silently
synchronous). Callers that own their buffers say whether they are pinned, since `Tensor.is_pinned()` is a driver
call per copy. Events are reused rather than created and destroyed per copy: a caller that owns a buffer passes
the buffer's own event as the fence to record (a buffer is reused only after that fence completed); recording
and waiting on such an event costs no more than synchronising the device (same file). Without CUDA the copies
are plain and the returned fence is already complete, so the same calling code runs (and is tested) on CPU.

`timed=True` (the serving engine's): each copy's time goes to `timer` (link_time.py: CUDA events read once passed,
the host clock without CUDA) by direction; `timed=False` on one call leaves a measurement's own copies out.
"""

from __future__ import annotations

import logging

import torch

from ferry.comm.link_time import CopyTimer

log = logging.getLogger("ferry.copy")
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("host<->device copy from pageable memory (synchronous, ~7x slower than pinned): %s", reason)


class _Done:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class CopyStream:
    def __init__(self, device: torch.device, timed: bool = False) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Re-recorded before every copy: a stream waits on the record that is current when it is told to wait.
        self._compute_done = torch.cuda.Event() if self.stream is not None else None
        self.timer = CopyTimer(self.stream is not None) if timed else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, host_pinned: bool | None = None,
             fence: torch.cuda.Event | None = None, record: bool = True, timed: bool = True):
        """dst.copy_(src) on the copy stream, after the work already queued on the current stream; returns the
        fence it recorded (`fence` if given, else a new event). `host_pinned`: whether the host side is
        page-locked, if the caller knows. `record=False`: the caller keeps the device tensors alive until the
        fence has passed, so the allocator needs no cross-stream event for them (events it would otherwise create
        when they are freed, even inside a later graph capture or at interpreter exit)."""
        timer = self.timer if timed else None
        if self.stream is None:
            mark = timer.start() if timer else None
            dst.copy_(src)
            if timer:
                timer.stop(mark, _direction(dst, src, "d2h"))
            return _Done()
        pinned = self._pinned(dst, src, host_pinned)
        self._compute_done.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self._compute_done)
        mark = timer.start(self.stream) if timer else None  # after the wait: the copy's own time, not compute's
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=pinned)
        if timer:
            timer.stop(mark, _direction(dst, src, "d2h"), self.stream)
        event = fence if fence is not None else torch.cuda.Event()
        event.record(self.stream)
        for t in (dst, src) if record else ():
            if t.device.type == "cuda":
                t.record_stream(self.stream)  # keep the allocator from reusing it before the copy ran
        return event

    def copy_in_order(self, dst: torch.Tensor, src: torch.Tensor, host_pinned: bool | None = None,
                      fence: torch.cuda.Event | None = None, timed: bool = True):
        """dst.copy_(src) on the current stream (the next kernel there sees the data); returns the fence (`fence`
        if given, else a new event) that says when the host buffer may be reused."""
        timer = self.timer if timed else None
        if self.stream is None:
            mark = timer.start() if timer else None
            dst.copy_(src)
            if timer:
                timer.stop(mark, _direction(dst, src, "h2d"))
            return _Done()
        mark = timer.start() if timer else None  # on the current stream, after the kernels queued before it
        dst.copy_(src, non_blocking=self._pinned(dst, src, host_pinned))
        if timer:
            timer.stop(mark, _direction(dst, src, "h2d"))
        event = fence if fence is not None else torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def _pinned(dst: torch.Tensor, src: torch.Tensor, host_pinned: bool | None) -> bool:
        if host_pinned is None:
            host = src if src.device.type == "cpu" else dst if dst.device.type == "cpu" else None
            host_pinned = host is not None and host.is_pinned()
            if host is not None and not host_pinned:
                _warn_once(f"a {tuple(host.shape)} {host.dtype} buffer was not allocated pinned")
        return host_pinned

    def wait_on_compute(self, fence) -> None:
        """Make the current (compute) stream wait for `fence` before what it launches next."""
        if self.stream is not None and isinstance(fence, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(fence)


def _direction(dst: torch.Tensor, src: torch.Tensor, same_side: str) -> str:
    """"h2d" or "d2h" by where the tensors live; `same_side` where both are host memory (an engine without CUDA:
    its in-order copies are its step uploads and swap-ins, its copy-stream ones readbacks and swap-outs)."""
    if dst.device.type != "cpu" and src.device.type == "cpu":
        return "h2d"
    if src.device.type != "cpu" and dst.device.type == "cpu":
        return "d2h"
    return same_side
