"""The fused elementwise steps of a decoder layer: Triton kernels on GPUs, the torch ops they replace elsewhere.

The model calls these functions and never branches on the device. Where the Triton kernels run (CUDA tensors,
Triton importable, not inside torch.compile, which fuses these ops itself, and not switched off with
FERRY_FUSED_KERNELS=0) each is one launch (ferry/model/layers/fused_kernels.py has the measurement); everywhere
else the reference below runs, which is exactly what the layers computed before the kernels existed. `path()`
names which one runs, for logs and benchmarks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ferry.device import triton_import_error

TRITON_PATH = "fused Triton kernels (add+RMSNorm, SiLU*mul, rotary+KV write)"
TORCH_PATH = "torch ops"
_enabled = os.environ.get("FERRY_FUSED_KERNELS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Benchmarks compare both paths in one process; everyone else leaves the default (on)."""
    global _enabled
    _enabled = enabled


def _kernels_on(device: torch.device) -> bool:
    return device.type == "cuda" and _enabled and triton_import_error() is None


def runs_kernels(t: torch.Tensor) -> bool:
    return _kernels_on(t.device) and not torch.compiler.is_compiling()


def path(device: torch.device) -> str:
    return TRITON_PATH if _kernels_on(device) else TORCH_PATH


def rmsnorm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back, times the weight, as the Llama reference does (keeps bf16 outputs comparable)."""
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype)


def rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if runs_kernels(h) and h.stride(-1) == 1:
        from ferry.model.layers.fused_kernels import launch_add_rmsnorm

        return launch_add_rmsnorm(h, None, weight, eps)
    return rmsnorm_reference(h, weight, eps)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
                ) -> torch.Tensor | None:
    """residual += x (in place); returns weight * rmsnorm(residual), or None without a weight (the last layer's
    add, whose norm is the model's final one)."""
    if weight is not None and runs_kernels(x) and x.stride(-1) == 1 and residual.is_contiguous():
        from ferry.model.layers.fused_kernels import launch_add_rmsnorm

        return launch_add_rmsnorm(x, residual, weight, eps)
    residual.add_(x)
    return rmsnorm_reference(residual, weight, eps) if weight is not None else None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2n], gate first (the fused column-parallel projection) -> silu(gate) * up."""
    if runs_kernels(gate_up) and gate_up.stride(-1) == 1:
        from ferry.model.layers.fused_kernels import launch_silu_mul

        return launch_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
