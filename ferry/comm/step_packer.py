"""One upload per step: a step's small host tensors packed into one pinned staging buffer, one H2D copy,
device-side views.

64 separate 4 KiB pinned copies took 620 us on the H200 machine; one 256 KiB copy took 13.5 us. The engine's
per-step inputs (token ids, positions, lengths, sampling parameters) are each tiny, so they travel together.
Packing is one `torch.cat` into the pinned buffer (fields ordered by element size, so every field stays
aligned for its dtype), and device views are made only for the fields a consumer reads.
"""

from __future__ import annotations

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBufferPool


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, int]], int]:
    """(name -> (byte offset, byte length)), total bytes. Wider dtypes first: offsets stay dtype-aligned."""
    offsets, at = {}, 0
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
        n = t.numel() * t.element_size()
        offsets[name] = (at, n)
        at += n
    return offsets, at


class PackedInputs:
    """Device views of one packed upload, made on first access."""

    def __init__(self, buffer: torch.Tensor, offsets: dict[str, tuple[int, int]], specs: dict) -> None:
        self.buffer, self.offsets, self.specs = buffer, offsets, specs
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            at, n = self.offsets[name]
            dtype, shape = self.specs[name]
            view = self._views[name] = self.buffer[at : at + n].view(dtype).view(shape)
        return view

    def keys(self):
        return self.offsets.keys()


class StepPacker:
    def __init__(self, device: torch.device, pool: PinnedBufferPool, copy: CopyStream) -> None:
        self.device, self.pool, self.copy = device, pool, copy
        self._staging = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(2)]
        self._slot = 0
        self.uploads = 0  # copies issued (one per call), for tests and logs

    def upload(self, tensors: dict[str, torch.Tensor]) -> PackedInputs:
        offsets, total = layout(tensors)
        host = self.pool.acquire(total)
        ordered = [tensors[name].reshape(-1).view(torch.uint8) for name in offsets]
        torch.cat(ordered, out=host.tensor[:total])
        # Two device staging slots alternate, so this step's copy never overwrites what the previous step reads.
        self._slot ^= 1
        if self._staging[self._slot].numel() < total:
            self._staging[self._slot] = torch.empty(max(total, 4096), dtype=torch.uint8, device=self.device)
        device_buf = self._staging[self._slot]
        fence = self.copy.copy(device_buf[:total], host.tensor[:total])
        self.copy.wait_on_compute(fence)
        self.pool.release(host, fence)
        self.uploads += 1
        return PackedInputs(device_buf, offsets, {k: (t.dtype, t.shape) for k, t in tensors.items()})
