"""GGUF 4-bit blocks straight into torch's packed int4 form: no float pass over the weights.

Q4_0 and Q4_1 store each row in blocks of 32 values: an fp16 scale d (and for Q4_1 an fp16 minimum m), then 16
bytes of nibbles, elements 0..15 in the low nibbles and 16..31 in the high ones. torch's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`) computes with w = (q - 8) * scale + zero per group of 32, so both formats map
exactly: Q4_0 w = d * (q - 8) -> scale d, zero 0; Q4_1 w = d * q + m -> scale d, zero m + 8d. The scales are held in
the activation dtype (bf16: the kernel takes no other with bf16 inputs), which rounds d to 8 mantissa bits; the
quality this costs is measured by benchmarks/cpu_decode.py, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from ferry.model.layers.quant import Int4Weight

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1)  # the GGUF types that become int4 groups of 32 as they are
INT8_TYPES = (Q.Q8_0,)  # 8-bit groups of 32, held as two int4 halves (pack_q8_0)
GROUP_SIZE = 32
# torch's packer lays rows out in tiles of 16; a matmul whose output rows do not fill whole tiles stays int8.
ROW_TILE = 16


@dataclass(frozen=True)
class QuantBlocks:
    """One tensor (or a row/column slice of it) as stored: [rows, bytes per row] of `qtype` blocks."""

    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes]
    cols: int  # logical values per row


def can_pack_int4(parts: list[QuantBlocks]) -> bool:
    rows = sum(p.data.shape[0] for p in parts)
    return (all(p.qtype in INT4_TYPES for p in parts) and len({p.cols for p in parts}) == 1
            and parts[0].cols % GROUP_SIZE == 0 and rows % ROW_TILE == 0)


def _nibbles_and_scales(part: QuantBlocks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> q int32 [rows, cols] in 0..15, scale_zero [cols / 32, rows, 2] in `dtype`."""
    rows, groups = part.data.shape[0], part.cols // GROUP_SIZE
    blocks = torch.from_numpy(np.array(part.data, copy=True)).view(rows, groups, -1)  # the map is read-only
    header = 4 if part.qtype == Q.Q4_1 else 2
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if part.qtype == Q.Q4_1:
        zero = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8.0 * d
    else:
        zero = torch.zeros_like(d)
    packed = blocks[..., header:].to(torch.int32)
    q = torch.cat((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, part.cols)
    scale_zero = torch.stack((d, zero), dim=-1).transpose(0, 1).to(dtype)
    return q, scale_zero


def pack_int4(parts: list[QuantBlocks], dtype: torch.dtype) -> Int4Weight:
    """Row blocks of one matmul (e.g. q, k and v), stacked, as torch's CPU kernel takes them (scales in `dtype`).
    `can_pack_int4(parts)` must hold."""
    pieces = [_nibbles_and_scales(p, dtype) for p in parts]
    q = torch.cat([p[0] for p in pieces]) if len(pieces) > 1 else pieces[0][0]
    scale_zero = torch.cat([p[1] for p in pieces], dim=1) if len(pieces) > 1 else pieces[0][1]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return Int4Weight(packed, scale_zero.contiguous(), GROUP_SIZE, q.shape[0])


def can_pack_q8_0(part: QuantBlocks) -> bool:
    return part.qtype in INT8_TYPES and part.cols % GROUP_SIZE == 0 and part.data.shape[0] % ROW_TILE == 0


def pack_q8_0(part: QuantBlocks, dtype: torch.dtype) -> Int4Weight:
    """A Q8_0 matrix (blocks of an fp16 scale d and 32 int8 values q; w = d * q) for torch's int4 kernel, exactly:
    q = 16 * hi + lo with hi = q >> 4 in -8..7 and lo = q & 15 in 0..15. The packed matrix holds the hi nibbles
    (stored hi + 8, group scale 16d, zero 0) beside the lo nibbles (scale d, zero 8d), [out, 2 * in], and the
    input meets both halves repeated: x W^T = [x, x] [W_hi, W_lo]^T. One int4 matmul reads the same bytes as
    int8 would, keeps the checkpoint's group scales (int8 rows would requantize them per row), and on the 2-core
    CPU SmolLM2's 49152 x 576 head took 1.73 ms where torch's int8-row kernel took 1.86 (2026-11-30)."""
    rows, groups = part.data.shape[0], part.cols // GROUP_SIZE
    blocks = torch.from_numpy(np.array(part.data, copy=True)).view(rows, groups, 2 + GROUP_SIZE)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # [rows, groups]
    q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32).reshape(rows, part.cols)
    halves = torch.cat(((q >> 4) + 8, q & 0x0F), dim=1)
    zero = torch.zeros_like(d)
    scale_zero = torch.cat((torch.stack((16.0 * d, zero), dim=-1), torch.stack((d, 8.0 * d), dim=-1)), dim=1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(halves, 1)
    return Int4Weight(packed, scale_zero.transpose(0, 1).to(dtype).contiguous(), GROUP_SIZE, rows, input_copies=2)
