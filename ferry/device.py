"""Device and dtype choice: cuda when present else cpu; bf16 on accelerators and on CPUs with native bf16 (where
the quantized CPU kernels need it), fp32 on other CPUs and for CPU tensor parallelism."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ferry.errors import DeviceError, FerryError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The CLI's spelling of a dtype (`fp32`, `bf16`, `fp16`), as reports and JSON write it."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (try cpu, cuda, cuda:1)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is None or not module.is_available():
            raise DeviceError(f"device {name!r} is not available on this machine")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls and torch's int4/int8 weight kernels run at full speed (Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | None, device: torch.device, tp: int = 1) -> torch.dtype:
    """`auto`: bf16 on accelerators; on a CPU bf16 where it is native and one rank runs (the fast quantized path,
    loader.py), else fp32. CPU tensor parallelism stays fp32 by default: it is how layouts are checked exactly."""
    if name in (None, "auto"):
        if device.type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if tp == 1 and cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise FerryError(f"unknown dtype {name!r} (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[name]
