"""GGUF Q4_0 / Q4_1 / Q8_0 blocks into the layout of Ferry's own CPU kernel (layers/cpu_qmatmul.cpp), once, at load.

The kernel multiplies int8 activations by unsigned weights u (w = d * u + m, or d * (u - offset)) with vpdpbusd, 16
output rows at a time: per tile of 16 rows and group of 32 inputs, chunk c (inputs 4c..4c+3) of all 16 rows is 64
bytes, byte r * 4 + e holding row r's input 4c + e. 4-bit weights hold chunks 2p and 2p + 1 in the low and high
nibbles of the same 64 bytes. The checkpoint's fp16 scales and mins are kept as they are (torch's int4 kernel
needs them rounded to bf16), so the weights are exact; only the activations are rounded (to int8, per group).
Rows past a multiple of 16 are padded with zero weights and never written out.
"""

from __future__ import annotations

import numpy as np
import torch

from ferry.model.layers.quant import QMatmulWeight
from ferry.model.weights.repack import GROUP_SIZE, INT4_TYPES, INT8_TYPES, Q, QuantBlocks

TILE = 16


def can_pack_qmatmul(parts: list[QuantBlocks]) -> bool:
    """All slices 4-bit (Q4_0/Q4_1) or all Q8_0, of one width, whole groups."""
    kinds = {p.qtype in INT4_TYPES for p in parts if p.qtype in INT4_TYPES + INT8_TYPES}
    return (len(kinds) == 1 and all(p.qtype in INT4_TYPES + INT8_TYPES for p in parts)
            and len({p.cols for p in parts}) == 1 and parts[0].cols % GROUP_SIZE == 0)


def _unsigned_and_scales(part: QuantBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> u uint8 [rows, cols], d fp16 [rows, groups], m fp16 [rows, groups] (Q4_1) or None."""
    rows, groups = part.data.shape[0], part.cols // GROUP_SIZE
    blocks = torch.from_numpy(np.array(part.data, copy=True)).view(rows, groups, -1)  # the map is read-only
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    if part.qtype in INT8_TYPES:
        u = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return u.reshape(rows, part.cols), d, None
    header = 4 if part.qtype == Q.Q4_1 else 2
    nibbles = blocks[..., header:]
    u = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(rows, part.cols)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if part.qtype == Q.Q4_1 else None
    return u, d, m


def pack_qmatmul(parts: list[QuantBlocks]) -> QMatmulWeight:
    """Row blocks of one matmul (e.g. q, k and v), stacked, in the kernel's layout. `can_pack_qmatmul(parts)`."""
    pieces = [_unsigned_and_scales(p) for p in parts]
    bits = 8 if parts[0].qtype in INT8_TYPES else 4
    u = torch.cat([p[0] for p in pieces])
    d = torch.cat([p[1] for p in pieces])
    mins = None
    if any(p[2] is not None for p in pieces):  # Q4_0 beside Q4_1: w = d * (u - 8) = d * u + (-8d), exact in fp16
        mins = torch.cat([p[2] if p[2] is not None else -8 * p[1] for p in pieces])
    offset = 0 if mins is not None else (128 if bits == 8 else 8)
    return pack_unsigned(u, d, mins, bits, offset)


def pack_unsigned(u: torch.Tensor, d: torch.Tensor, mins: torch.Tensor | None, bits: int,
                  offset: int) -> QMatmulWeight:
    """u uint8 [rows, cols] (< 2**bits), d and mins fp16 [rows, cols / 32] -> the kernel's tiles."""
    rows, cols = u.shape
    groups, tiles = cols // GROUP_SIZE, -(-rows // TILE)
    pad = tiles * TILE - rows
    if pad:
        u = torch.cat((u, u.new_zeros(pad, cols)))
        d = torch.cat((d, d.new_zeros(pad, groups)))
        mins = torch.cat((mins, mins.new_zeros(pad, groups))) if mins is not None else None
    chunks = u.view(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)  # [tile, group, chunk, row, 4]
    if bits == 4:
        chunks = chunks[:, :, 0::2] | (chunks[:, :, 1::2] << 4)
    packed = chunks.contiguous().view(tiles, -1)

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return t.view(tiles, TILE, groups).transpose(1, 2).contiguous()

    empty = torch.empty(0, dtype=torch.float16)
    return QMatmulWeight(packed, tiled(d), tiled(mins) if mins is not None else empty, bits, offset, rows)
