"""Preemption by swap or by recompute, chosen from the measured link and the measured prefill speed.

Swap: a preempted sequence's blocks are gathered on the device into one packed tensor (every layer at once) and
go to a pooled pinned host buffer in one copy on the copy stream; coming back is one copy up and one indexed
write into its new blocks. Recompute: its blocks are dropped and its tokens prefilled again later (the prefix
cache often still holds most of them). Swapping costs 2 x its K/V bytes over the link; recomputing costs its
tokens at prefill speed. Both rates are measured once, at the first preemption, and logged with the choice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBuffer, PinnedBufferPool
from ferry.engine.paged_cache import PagedKVCache
from ferry.engine.request import Request

log = logging.getLogger("ferry.preempt")

MODES = ("auto", "swap", "recompute")


@dataclass
class SwappedKV:
    buffer: PinnedBuffer
    host: torch.Tensor  # [layers, 2, blocks, block_size, kv_heads, head_dim] view of the buffer
    fence: object  # the D2H copy's completion


@dataclass
class PreemptionStats:
    swapped_out: int = 0
    swapped_in: int = 0
    recomputed: int = 0
    swap_out_bytes: int = 0  # device -> host
    swap_in_bytes: int = 0  # host -> device

    @property
    def swap_bytes(self) -> int:
        return self.swap_out_bytes + self.swap_in_bytes


class KVSwap:
    def __init__(self, cache: PagedKVCache, pool: PinnedBufferPool, copy: CopyStream, mode: str = "auto",
                 measure_prefill=None, agree=None) -> None:
        """`measure_prefill()` -> prefill tokens/s; `agree(values)` -> the values every rank uses (tensor
        parallel ranks must all choose the same way, or their schedules part)."""
        if mode not in MODES:
            raise ValueError(f"preemption mode {mode!r}: choose one of {', '.join(MODES)}")
        self.cache, self.pool, self.copy, self.mode = cache, pool, copy, mode
        self._measure_prefill, self._agree = measure_prefill, agree
        self.link_bytes_per_s: float | None = None
        self.prefill_tokens_per_s: float | None = None
        self.stats = PreemptionStats()

    def prefer_swap(self, request: Request) -> bool:
        if self.mode != "auto":
            choice = self.mode == "swap"
        else:
            self._calibrate()
            tokens = request.computed
            swap_s = 2 * tokens * self.cache.bytes_per_token / self.link_bytes_per_s
            recompute_s = tokens / self.prefill_tokens_per_s
            choice = swap_s <= recompute_s
            log.info("preempting request %d (%d tokens): swap %.2f ms vs recompute %.2f ms -> %s", request.id, tokens,
                     swap_s * 1e3, recompute_s * 1e3, "swap" if choice else "recompute")
        if not choice:
            self.stats.recomputed += 1
        return choice

    def swap_out(self, request: Request) -> None:
        n = self.cache_blocks(request)
        blocks = torch.tensor(request.table.blocks[:n], device=self.cache.device)
        packed = self.cache.block_view(blocks)  # one gather on the compute stream, before any later overwrite
        nbytes = packed.numel() * packed.element_size()
        buf = self.pool.acquire(nbytes)
        host = buf.view(nbytes, packed.dtype, tuple(packed.shape))
        fence = self.copy.copy(host, packed, host_pinned=buf.pinned, fence=buf.event)
        request.swapped = SwappedKV(buf, host, fence)
        self.stats.swapped_out += 1
        self.stats.swap_out_bytes += nbytes
        log.debug("swapped out request %d: %d blocks, %.1f MiB", request.id, n, nbytes / (1 << 20))

    def swap_in(self, request: Request) -> None:
        swapped: SwappedKV = request.swapped
        n = swapped.host.shape[2]
        blocks = torch.tensor(request.table.blocks[:n], device=self.cache.device)
        swapped.fence.synchronize()  # long done in practice: it was queued before the steps since
        staging = torch.empty_like(swapped.host, device=self.cache.device)
        fence = self.copy.copy_in_order(staging, swapped.host, host_pinned=swapped.buffer.pinned)
        self.cache.write_blocks(blocks, staging)
        self.pool.release(swapped.buffer, fence)
        request.swapped = None
        self.stats.swapped_in += 1
        self.stats.swap_in_bytes += swapped.host.numel() * swapped.host.element_size()

    def discard(self, request: Request) -> None:
        """A swapped-out request that will never come back: its pinned buffer is free once the swap-out landed."""
        swapped: SwappedKV = request.swapped
        self.pool.release(swapped.buffer, swapped.fence)
        request.swapped = None

    def cache_blocks(self, request: Request) -> int:
        return -(-request.computed // self.cache.block_size)

    def _calibrate(self) -> None:
        if self.link_bytes_per_s is not None:
            return
        link = measure_link(self.cache.device, self.pool, self.copy)
        prefill = self._measure_prefill()
        if self._agree is not None:
            link, prefill = self._agree([link, prefill])
        self.link_bytes_per_s, self.prefill_tokens_per_s = link, prefill
        log.info("preemption costs measured: host link %.1f GB/s, prefill %.0f tokens/s, %.0f KiB of K/V per token",
                 link / 1e9, prefill, self.cache.bytes_per_token / 1024)


def measure_link(device: torch.device, pool: PinnedBufferPool, copy: CopyStream, nbytes: int = 32 << 20) -> float:
    """Bytes/s of a device -> pinned host copy and back (the swap path), median of three round trips."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = pool.acquire(nbytes)
    host = buf.view(nbytes)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        copy.copy(host, src, host_pinned=buf.pinned, timed=False).synchronize()  # no request's traffic
        copy.copy_in_order(src, host, host_pinned=buf.pinned, timed=False).synchronize()
        times.append(time.perf_counter() - started)
    pool.release(buf)
    return 2 * nbytes / sorted(times)[1]
