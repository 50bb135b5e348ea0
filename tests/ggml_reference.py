"""A second, deliberately plain reading of GGML's block formats, for testing dequantizers Ferry takes from `gguf`.

Written from ggml's block definitions (ggml-common.h) and scalar `dequantize_row_*` loops (ggml-quants.c), one block
at a time and one value at a time, in the loops' own order and fp32 arithmetic. It shares no code with the `gguf`
package: where the two agree on random blocks, both read the format as ggml does.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per K-quant super-block
F32 = np.float32


def _half(block: np.ndarray, at: int) -> F32:
    return F32(block[at : at + 2].view(np.float16)[0])


def q5_0(block: np.ndarray) -> list[F32]:
    """block_q5_0 {half d; u8 qh[4]; u8 qs[16]}: 32 values; bit j of qh is the fifth bit of value j."""
    d, qh, qs = _half(block, 0), int(block[2:6].view("<u4")[0]), block[6:22]
    y = [F32(0)] * 32
    for j in range(16):
        y[j] = d * F32(((int(qs[j]) & 0x0F) | (((qh >> j) & 1) << 4)) - 16)
        y[j + 16] = d * F32(((int(qs[j]) >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)
    return y


def q5_1(block: np.ndarray) -> list[F32]:
    """block_q5_1 {half d; half m; u8 qh[4]; u8 qs[16]}: y = d * q + m, q unsigned."""
    d, m, qh, qs = _half(block, 0), _half(block, 2), int(block[4:8].view("<u4")[0]), block[8:24]
    y = [F32(0)] * 32
    for j in range(16):
        y[j] = d * F32((int(qs[j]) & 0x0F) | (((qh >> j) & 1) << 4)) + m
        y[j + 16] = d * F32((int(qs[j]) >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m
    return y


def q2_k(block: np.ndarray) -> list[F32]:
    """block_q2_K {u8 scales[16]; u8 qs[64]; half d; half dmin}: 2-bit values, 4-bit scale and min per 16."""
    scales, qs, d, dmin = block[0:16], block[16:80], _half(block, 80), _half(block, 82)
    y, i = [], 0
    for n in range(0, QK_K, 128):
        q = qs[n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                sc = int(scales[i])
                i += 1
                dl, ml = d * F32(sc & 0xF), dmin * F32(sc >> 4)
                y += [dl * F32((int(q[half + l]) >> shift) & 3) - ml for l in range(16)]
    return y


def q3_k(block: np.ndarray) -> list[F32]:
    """block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d}: 3-bit values (the high bit inverted, in
    hmask), sixteen 6-bit signed scales packed into 12 bytes."""
    hmask, qs, packed, d = block[0:32], block[32:96], block[96:108], _half(block, 108)
    aux = [int(a) for a in packed.view("<u4")] + [0]
    kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
    tmp = aux[2]
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4)
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4)
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4)
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4)
    scales = np.array(aux, dtype="<u4").view(np.int8)
    y, i, m = [], 0, 1
    for n in range(0, QK_K, 128):
        q = qs[n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                dl = d * F32(int(scales[i]) - 32)
                i += 1
                y += [dl * F32(((int(q[half + l]) >> shift) & 3) - (0 if int(hmask[half + l]) & m else 4))
                      for l in range(16)]
            m <<= 1
    return y


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """get_scale_min_k4: eight 6-bit scales and eight 6-bit mins packed into 12 bytes."""
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    return ((int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4),
            (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4))


def q4_k(block: np.ndarray) -> list[F32]:
    """block_q4_K {half d; half dmin; u8 scales[12]; u8 qs[128]}: 4-bit values, 6-bit scale and min per 32."""
    d, dmin, scales, qs = _half(block, 0), _half(block, 2), block[4:16], block[16:144]
    y = []
    for i, j in enumerate(range(0, QK_K, 64)):
        q = qs[i * 32 : i * 32 + 32]
        (s1, m1), (s2, m2) = _scale_min_k4(2 * i, scales), _scale_min_k4(2 * i + 1, scales)
        d1, min1, d2, min2 = d * F32(s1), dmin * F32(m1), d * F32(s2), dmin * F32(m2)
        y += [d1 * F32(int(q[l]) & 0xF) - min1 for l in range(32)]
        y += [d2 * F32(int(q[l]) >> 4) - min2 for l in range(32)]
    return y


def q5_k(block: np.ndarray) -> list[F32]:
    """block_q5_K {half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: Q4_K plus a fifth bit in qh."""
    d, dmin, scales, qh, qs = _half(block, 0), _half(block, 2), block[4:16], block[16:48], block[48:176]
    y, u1, u2 = [], 1, 2
    for i, j in enumerate(range(0, QK_K, 64)):
        ql = qs[i * 32 : i * 32 + 32]
        (s1, m1), (s2, m2) = _scale_min_k4(2 * i, scales), _scale_min_k4(2 * i + 1, scales)
        d1, min1, d2, min2 = d * F32(s1), dmin * F32(m1), d * F32(s2), dmin * F32(m2)
        y += [d1 * F32((int(ql[l]) & 0xF) + (16 if int(qh[l]) & u1 else 0)) - min1 for l in range(32)]
        y += [d2 * F32((int(ql[l]) >> 4) + (16 if int(qh[l]) & u2 else 0)) - min2 for l in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return y


def q6_k(block: np.ndarray) -> list[F32]:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d}: 6-bit values, an 8-bit scale per 16."""
    ql_all, qh_all, sc_all, d = block[0:128], block[128:192], block[192:208].view(np.int8), _half(block, 208)
    y = [F32(0)] * QK_K
    for half in range(2):
        ql, qh, sc, base = ql_all[64 * half :], qh_all[32 * half :], sc_all[8 * half :], 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((int(ql[l]) & 0xF) | (((int(qh[l]) >> 0) & 3) << 4)) - 32
            q2 = ((int(ql[l + 32]) & 0xF) | (((int(qh[l]) >> 2) & 3) << 4)) - 32
            q3 = ((int(ql[l]) >> 4) | (((int(qh[l]) >> 4) & 3) << 4)) - 32
            q4 = ((int(ql[l + 32]) >> 4) | (((int(qh[l]) >> 6) & 3) << 4)) - 32
            y[base + l] = d * F32(int(sc[i])) * F32(q1)
            y[base + l + 32] = d * F32(int(sc[i + 2])) * F32(q2)
            y[base + l + 64] = d * F32(int(sc[i + 4])) * F32(q3)
            y[base + l + 96] = d * F32(int(sc[i + 6])) * F32(q4)
    return y


def f16(block: np.ndarray) -> list[F32]:
    return [F32(block.view(np.float16)[0])]


def bf16(block: np.ndarray) -> list[F32]:
    """bf16 is the top half of an fp32: the 16 stored bits shifted up, the low 16 bits zero."""
    return [np.array([int(block.view("<u2")[0]) << 16], dtype="<u4").view(F32)[0]]


# name -> (values per block, bytes per block, block decoder); sizes from ggml-common.h's static asserts.
FORMATS = {
    "F16": (1, 2, f16), "BF16": (1, 2, bf16), "Q5_0": (32, 22, q5_0), "Q5_1": (32, 24, q5_1),
    "Q2_K": (256, 84, q2_k), "Q3_K": (256, 110, q3_k), "Q4_K": (256, 144, q4_k), "Q5_K": (256, 176, q5_k),
    "Q6_K": (256, 210, q6_k),
}


def dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    """Rows of stored blocks (uint8) -> fp32 values [rows, cols]."""
    block, size, decode = FORMATS[name]
    rows = raw.reshape(raw.shape[0], -1).view(np.uint8)
    assert rows.shape[1] % size == 0
    out = [[v for b in range(rows.shape[1] // size) for v in decode(rows[r, b * size : (b + 1) * size])]
           for r in range(rows.shape[0])]
    return np.array(out, dtype=F32)
