"""GGUF block dequantization: torch kernels for the common simple formats, the gguf package for the rest.

The torch versions run multi-threaded and vectorised: on the 2-core CI machine they take SmolLM2's
Q4_1/Q8_0 weights from ~1.0 s (gguf's numpy path) to a fraction of that. Tests pin them to gguf's output.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType


def _blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, tuple[int, ...]]:
    block, size = GGML_QUANT_SIZES[qtype]
    rows_shape = raw.shape[:-1]
    out_shape = (*rows_shape, raw.shape[-1] // size * block)
    data = torch.from_numpy(np.array(raw, copy=True).reshape(-1, size))  # copy: the map is read-only
    return data, out_shape


def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Rows of GGUF blocks (as stored) -> fp32 tensor of the logical shape."""
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        blocks, shape = _blocks(raw, qtype)
        if qtype == Q.Q8_0:
            values = _scale(blocks, 0) * blocks[:, 2:].view(torch.int8).float()
        elif qtype == Q.Q4_0:
            values = _scale(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)
        else:
            values = _scale(blocks, 0) * _nibbles(blocks[:, 4:]) + _scale(blocks, 2)
        return values.reshape(shape)
    if qtype == Q.F32:
        return torch.from_numpy(np.array(raw, dtype=np.float32))
    return torch.from_numpy(np.asarray(gguf_dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32))
