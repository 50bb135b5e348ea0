"""Weight-only int8: one scale per output row, activations stay bf16.

On the 2-core CPU, decode is memory-bound (fp32 GEMV runs at the ~27 GB/s copy bandwidth); torch's
int8-weight kernel with bf16 activations moves a quarter of the fp32 bytes and measured 2.3-3x faster per
matmul there. With fp32 activations the same kernel is 10x slower, so int8 weights require bf16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ferry.errors import FerryError


class Int8Weight(NamedTuple):
    values: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], activation dtype


def quantize_rows_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    values = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scales.to(weight.dtype))


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.aten._weight_int8pack_mm(rows, weight.values, weight.scales)
    return out.view(*x.shape[:-1], weight.values.shape[0])


def check_int8_supported(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        raise FerryError(f"--weights int8 runs on CPU only for now (asked for {device.type})")
    if dtype != torch.bfloat16:
        raise FerryError("--weights int8 needs --dtype bf16 (torch's int8 kernel is slow with fp32 activations)")
