"""Weight-only quantized matmuls on the CPU: int8 rows and torch's int4 groups of 32 (bf16 activations), and Ferry's
qmatmul over a GGUF's own 4/8-bit blocks (fp32 or bf16 activations).

On the 2-core CPU, decode is memory-bound (fp32 GEMV runs at the ~27 GB/s copy bandwidth); torch's
int8-weight kernel with bf16 activations moves a quarter of the fp32 bytes and measured 2.3-3x faster per
matmul there. With fp32 activations the same kernel is 10x slower, so int8 weights require bf16.

int4 (`_weight_int4pack_mm_for_cpu`) is where a GGUF Q4_0/Q4_1 weight goes as it is (weights/repack.py) where
Ferry's own kernel is not built: all 30 layers' matmuls of SmolLM2-135M, streamed from memory, took 4.4 ms per token
as int4 vs 8.6 ms as int8 rows and 18.6 ms as dense bf16 on the 2-core machine (2026-11-30); with fp32 activations
the int4 kernel is ~10x slower again, so it too runs with bf16 only.

qmatmul (cpu_qmatmul.cpp; the default wherever a C++ compiler builds it, with fp32 activations around it:
loader.resolve_precision) keeps GGUF Q4_0/Q4_1/Q8_0 blocks with their fp16 scales and quantizes the activations to
int8 per group of 32 on the fly, as llama.cpp does: the products are AVX-512 VNNI integer dot products instead of
torch's bf16 FMAs on expanded weights. One thread, batch 1, SmolLM2's
shapes: 8-26 us per layer matmul where torch's int4 kernel took 22-101, the Q8_0 head 1.2 ms vs 3.3 (2026-11-30).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from ferry.errors import FerryError

log = logging.getLogger("ferry.load")


class Int8Weight(NamedTuple):
    values: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], activation dtype


class Int4Weight(NamedTuple):
    packed: torch.Tensor  # uint8, torch's CPU int4 tile layout of [out, in * input_copies]
    scale_zero: torch.Tensor  # [in * input_copies / group, out, 2], activation dtype: w = (q - 8) * scale + zero
    group_size: int
    out_features: int
    # 2 for an 8-bit weight held as two 4-bit halves side by side (repack.pack_q8_0): the input, repeated, meets
    # both in one matmul.
    input_copies: int = 1


class QMatmulWeight(NamedTuple):
    """A GGUF 4- or 8-bit matrix in the layout of Ferry's CPU kernel (cpu_qmatmul.cpp, weights/repack_qmatmul.py)."""

    packed: torch.Tensor  # uint8 [tiles of 16 rows, groups * bytes per group]
    scales: torch.Tensor  # fp16 [tiles, groups, 16]: w = scale * u + min
    mins: torch.Tensor  # fp16 [tiles, groups, 16], or empty: w = scale * (u - offset)
    bits: int
    offset: int
    out_features: int


def qmatmul_linear(x: torch.Tensor, weight: QMatmulWeight) -> torch.Tensor:
    return torch.ops.ferry_cpu.qmatmul(x, weight.packed, weight.scales, weight.mins if weight.mins.numel() else None,
                                       weight.bits, weight.offset, weight.out_features)


_told: set[str] = set()


def qmatmul_unavailable() -> str | None:
    """Why GGUF blocks go to torch's int4 kernel instead of Ferry's qmatmul, or None: the kernel is built and loaded
    and the CPU has AVX-512 VNNI (the default; FERRY_QMATMUL=0 turns it off, =1 takes it even without VNNI). Said
    once per reason in the log, as a warning where the kernel was wanted but could not be built (torch's kernel is
    the slower path)."""
    from ferry.model.layers import cpu_qmatmul

    wanted = os.environ.get("FERRY_QMATMUL", "auto")
    refused = wanted == "0"
    reason = "FERRY_QMATMUL=0" if refused else cpu_qmatmul.load()
    if reason is None and wanted != "1" and cpu_qmatmul.isa() == "scalar":
        # without VNNI its scalar loop is slower than torch's vectorised int4 kernel; FERRY_QMATMUL=1 forces it
        reason, refused = "this CPU has no AVX-512 VNNI, and qmatmul's scalar loop is slower than torch's kernel", True
    if reason is not None and reason not in _told:
        _told.add(reason)
        (log.info if refused else log.warning)(
            "GGUF weight blocks: torch's int4 kernel, not %s (%s)", cpu_qmatmul.NAME, reason)
    return reason


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if weight.input_copies > 1:
        rows = rows.repeat(1, weight.input_copies)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group_size, weight.scale_zero)
    return out.view(*x.shape[:-1], weight.out_features)


def quantize_rows_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    values = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scales.to(weight.dtype))


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.aten._weight_int8pack_mm(rows, weight.values, weight.scales)
    return out.view(*x.shape[:-1], weight.values.shape[0])


def check_quantized_supported(device: torch.device, dtype: torch.dtype, weights: str) -> None:
    if device.type != "cpu":
        raise FerryError(f"--weights {weights} runs on CPU only for now (asked for {device.type})")
    if dtype == torch.bfloat16:
        return
    if weights == "quantized" and dtype == torch.float32 and qmatmul_unavailable() is None:
        return  # qmatmul quantizes fp32 activations as they come; nothing is made int8 rows (loader.py)
    raise FerryError(f"--weights {weights} needs --dtype bf16 (torch's int8/int4 kernels are slow with fp32 "
                     "activations" + (", and Ferry's qmatmul, which takes fp32, is not in use here)"
                                     if weights == "quantized" else ")"))
