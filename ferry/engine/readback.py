"""Sampled tokens back to the host without stalling the next step.

Step N's token ids are copied into a pooled pinned buffer on the copy stream; the engine enqueues step N+1
on the GPU first and only then waits for step N's copy, so detokenizing, stop checks and streaming overlap
with the GPU's work instead of sitting between steps.
"""

from __future__ import annotations

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBuffer, PinnedBufferPool


class PendingTokens:
    def __init__(self, pool: PinnedBufferPool, buf: PinnedBuffer, host: torch.Tensor, fence, source: torch.Tensor) -> None:
        self.pool, self.buf, self.host, self.fence = pool, buf, host, fence
        self.source = source  # the device tokens stay alive until the copy has read them

    def result(self) -> list[int]:
        self.fence.synchronize()
        values = self.host.tolist()
        self.pool.release(self.buf)  # the copy is complete: the buffer is free at once
        self.source = None
        return values


class TokenReadback:
    def __init__(self, pool: PinnedBufferPool, copy: CopyStream) -> None:
        self.pool, self.copy = pool, copy

    def start(self, tokens: torch.Tensor) -> PendingTokens:
        """Begin copying `tokens` (int64 [batch], on the device) to the host."""
        buf = self.pool.acquire(tokens.numel() * 8)
        host = buf.view(tokens.numel() * 8, torch.int64)
        source = tokens.reshape(-1)
        fence = self.copy.copy(host, source, host_pinned=buf.pinned, fence=buf.event, record=False)
        return PendingTokens(self.pool, buf, host, fence, source)
