"""Weight streaming for models larger than the device: some layers live in pinned host memory and are copied
to one of two device slots just ahead of their use (layer i+1 copies while layer i computes).

Each streamed layer's parameters are packed into one flat pinned buffer, so a layer is one H2D copy at full
PCIe bandwidth; its parameters become views into the slot it runs from. The copy of layer j into a slot is
queued after the compute already enqueued (which includes the layer that used that slot before), so a slot is
never overwritten while read.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ferry.comm.copy_stream import CopyStream

log = logging.getLogger("ferry.stream")


class LayerStreamer:
    def __init__(
        self, layers: list[nn.Module], streamed: list[int], device: torch.device, pin: bool | None = None,
        prefetch: bool = True, activate: bool = True,
    ):
        """`pin=False, prefetch=False` is the naive path (pageable memory, each layer copied when reached), kept
        so benchmarks can measure it beside the streamed one. `activate=False` packs the layers into host
        buffers and leaves their parameters pointing there (so loading writes straight into pinned memory);
        `activate()` then moves them onto the device slots."""
        self.layers, self.streamed, self.device, self.prefetch = layers, sorted(streamed), device, prefetch
        self.copy = CopyStream(device)
        pin = device.type == "cuda" if pin is None else pin
        self.trace: list[tuple[str, int]] = []  # ("copy", j) / ("run", i) in issue order, for tests and --verbose
        self._fences: dict[int, object] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._params: dict[int, list[tuple[nn.Parameter, int, int, torch.Size]]] = {}
        self._resident: dict[int, list[nn.Parameter]] = {}  # a streamed layer's norms: on the device once active
        if not self.streamed:
            return
        shapes = None
        for i in self.streamed:
            # The norms stay resident: a layer's input norm runs at the end of the layer before it (the residual
            # stream carries each add fused with the next norm; ferry/model/llama.py), before this layer's copy
            # is waited for. A few KiB per layer.
            named = list(layers[i].named_parameters())
            params = [p for name, p in named if not name.endswith("layernorm.weight")]
            self._resident[i] = [p for name, p in named if name.endswith("layernorm.weight")]
            sizes = [p.numel() for p in params]
            dtype = params[0].dtype
            if any(p.dtype != dtype for p in params):
                raise ValueError("weight streaming needs one dtype per layer")
            flat = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin)
            at, entries = 0, []
            for p, n in zip(params, sizes, strict=True):
                if activate:  # weights already loaded: keep them
                    flat[at : at + n].copy_(p.data.reshape(-1))
                p.data = flat[at : at + n].view(p.shape)  # host memory of the layer is now the pinned buffer
                entries.append((p, at, n, p.shape))
                at += n
            self._host[i], self._params[i] = flat, entries
            shapes = shapes or (flat.numel(), dtype)
            if flat.numel() != shapes[0]:
                raise ValueError("streamed layers must have the same size (one decoder layer shape)")
        self._shape, self.pin = shapes, pin
        self.bytes_per_layer = shapes[0] * torch.finfo(shapes[1]).bits // 8
        if activate:
            self.activate()

    def activate(self) -> None:
        """Point the streamed layers' parameters at the device slots and start streaming on each forward."""
        if not self.streamed:
            return
        layers, device = self.layers, self.device
        self.slots = [torch.empty(self._shape[0], dtype=self._shape[1], device=device) for _ in range(2)]
        for i in self.streamed:
            slot = self.slots[self._slot_of(i)]
            for p, at, n, shape in self._params[i]:
                p.data = slot[at : at + n].view(shape)  # the device copy of the weights is gone: only the slot holds it
            for p in self._resident[i]:
                p.data = p.data.to(device)
            layers[i].register_forward_pre_hook(self._before_layer(i))
        log.info("streaming %d layers (%.1f MB each) from %s host memory", len(self.streamed),
                 self.bytes_per_layer / 1e6, "pinned" if self.pin else "pageable")

    def _slot_of(self, i: int) -> int:
        return self.streamed.index(i) % 2

    def _issue(self, i: int) -> None:
        slot = self.slots[self._slot_of(i)]
        self._fences[i] = self.copy.copy(slot, self._host[i], host_pinned=self.pin)
        self.trace.append(("copy", i))

    def start(self) -> None:
        """Call before each forward: queue the first streamed layer's copy."""
        if self.streamed and self.prefetch:
            self.trace.clear()
            self._issue(self.streamed[0])

    def _before_layer(self, i: int):
        position = self.streamed.index(i)

        def hook(module, args):
            fence = self._fences.pop(i, None)
            if fence is None:  # not prefetched (the forward did not call start()): copy now
                self._issue(i)
                fence = self._fences.pop(i)
            self.copy.wait_on_compute(fence)
            if self.prefetch and position + 1 < len(self.streamed):
                self._issue(self.streamed[position + 1])  # overlaps this layer's compute
            self.trace.append(("run", i))

        return hook
