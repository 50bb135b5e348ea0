"""Device and dtype choice: the accelerator torch finds (cuda, xpu, npu, mps) else the cpu; bf16 on accelerators
and on CPUs with native bf16 (where the quantized CPU kernels need it), fp32 on other CPUs and for CPU tensor
parallelism. Each device type's torch.distributed backend comes from one map (BACKENDS), so no module asks
`is it cuda?` to pick a collective library."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ferry.errors import DeviceError, FerryError

# torch.distributed's backend for each device type's tensors; gloo carries host tensors (and every CPU rank).
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "npu": "hccl", "mps": "gloo"}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton (the GPU kernels' compiler) cannot be imported here, or None where it can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """The CLI's spelling of a dtype (`fp32`, `bf16`, `fp16`), as reports and JSON write it."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def accelerator_type() -> str | None:
    """The accelerator's device type torch was built for and finds here (cuda, xpu, npu, mps), or None."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


def present_devices() -> list[str]:
    """Every device this process can use, by name: cpu, then each accelerator index (cuda:0, cuda:1, ...)."""
    kind = accelerator_type()
    return ["cpu"] + ([f"{kind}:{i}" for i in range(torch.accelerator.device_count())] if kind else [])


def backend_for(device_types: set[str] | list[str]) -> str:
    """The torch.distributed backend for ranks on these device types: one type's own (nccl, xccl, hccl, gloo)."""
    types = set(device_types)
    missing = [t for t in types if t not in BACKENDS]
    if missing:
        raise FerryError(f"no torch.distributed backend known for device type {missing[0]!r} "
                         f"(known: {', '.join(BACKENDS)})")
    if len(types) != 1:
        raise FerryError(f"one process group backend cannot serve ranks on {', '.join(sorted(types))} at once")
    return BACKENDS[types.pop()]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device(accelerator_type() or "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (try cpu, cuda, cuda:1)") from exc
    if device.type == "cpu":
        return device
    if accelerator_type() != device.type:
        raise DeviceError(f"device {name!r} asked for, but this machine has no {device.type} device "
                          f"(present: {', '.join(present_devices())})")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.accelerator.device_count()} {device.type} "
                          f"device(s) exist (present: {', '.join(present_devices())})")
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
