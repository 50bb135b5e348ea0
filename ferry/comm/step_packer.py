"""One upload per step: a step's small host tensors packed into one pinned staging buffer, one H2D copy,
device-side views.

64 separate 4 KiB pinned copies took 620 us on the H200 machine; one 256 KiB copy took 13.5 us. The engine's
per-step inputs (token ids, positions, lengths, sampling parameters) are each tiny, so they travel together.
"""

from __future__ import annotations

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBufferPool

ALIGN = 16


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, int]], int]:
    """(name -> (byte offset, byte length)), total bytes; every field starts on a 16-byte boundary."""
    offsets, at = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        offsets[name] = (at, n)
        at += -(-n // ALIGN) * ALIGN
    return offsets, at


class StepPacker:
    def __init__(self, device: torch.device, pool: PinnedBufferPool, copy: CopyStream) -> None:
        self.device, self.pool, self.copy = device, pool, copy
        self._staging = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(2)]
        self._slot = 0
        self.uploads = 0  # copies issued (one per call), for tests and logs

    def upload(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        offsets, total = layout(tensors)
        host = self.pool.acquire(total)
        for name, t in tensors.items():
            at, n = offsets[name]
            host.tensor[at : at + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        # Two device staging slots alternate, so this step's copy never overwrites what the previous step reads.
        self._slot ^= 1
        if self._staging[self._slot].numel() < total:
            self._staging[self._slot] = torch.empty(max(total, 4096), dtype=torch.uint8, device=self.device)
        device_buf = self._staging[self._slot]
        fence = self.copy.copy(device_buf[:total], host.tensor[:total])
        self.copy.wait_on_compute(fence)
        self.pool.release(host, fence)
        self.uploads += 1
        return {
            name: device_buf[at : at + n].view(t.dtype).view(t.shape)
            for (name, t), (at, n) in zip(tensors.items(), offsets.values(), strict=True)
        }
