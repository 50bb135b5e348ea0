"""Ferry's CPU matmul for GGUF 4/8-bit weights: int8 activations x unsigned weights with AVX-512 VNNI
(cpu_qmatmul.cpp), the torch op `ferry_cpu::qmatmul` of Ferry's C++ CPU library (cpu_kernels.py builds and loads
it), so a compiled decode step calls it as one opaque op. The vector path needs AVX-512 VNNI, chosen at run time
from the CPU's flags; elsewhere the same op runs a scalar loop (`isa()` names which runs).
"""

from __future__ import annotations

import torch

from ferry.model.layers import cpu_kernels
from ferry.model.layers.quant import QMatmulWeight

NAME = "ferry qmatmul (int8 activations, AVX-512 VNNI)"


def load() -> str | None:
    """None when the op is ready (Ferry's CPU library built and loaded), else why it is not."""
    return cpu_kernels.load()


def available() -> bool:
    return load() is None


def isa() -> str:
    """"avx512-vnni" or "scalar": the path qmatmul takes on this CPU."""
    return torch.ops.ferry_cpu.isa() if available() else "unavailable"


def qmatmul(x: torch.Tensor, weight: QMatmulWeight, vector: bool = True) -> torch.Tensor:
    # quant.qmatmul_linear is the model's call (no Python between it and the op); this one can pick the path.
    """x [..., in] (bf16 or fp32) W^T -> [..., out] in x's dtype. `vector=False`: the scalar path (tests)."""
    return torch.ops.ferry_cpu.qmatmul(x, weight.packed, weight.scales, weight.mins if weight.mins.numel() else None,
                                       weight.bits, weight.offset, weight.out_features, vector)
