"""Host <-> device copies on their own stream, ordered with events so compute waits only for the data it needs.

On CUDA each direction gets a dedicated stream; `non_blocking` is used only when the host side is pinned (a
non-blocking copy from pageable memory is silently synchronous). Without CUDA the copies are plain and the
returned fence is already complete, so the same calling code runs (and is tested) on CPU.
"""

from __future__ import annotations

import logging

import torch

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
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        """dst.copy_(src) after the work already queued on the current stream; returns a fence for it."""
        if self.stream is None:
            dst.copy_(src)
            return _Done()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        host = src if src.device.type == "cpu" else dst if dst.device.type == "cpu" else None
        pinned = host is not None and host.is_pinned()
        if host is not None and not pinned:
            _warn_once(f"a {tuple(host.shape)} {host.dtype} buffer was not allocated pinned")
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=pinned)
            event = torch.cuda.Event()
            event.record(self.stream)
        for t in (dst, src):
            if t.device.type == "cuda":
                t.record_stream(self.stream)  # keep the allocator from reusing it before the copy ran
        return event

    def wait_on_compute(self, fence) -> None:
        """Make the current (compute) stream wait for `fence` before what it launches next."""
        if self.stream is not None and isinstance(fence, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(fence)
