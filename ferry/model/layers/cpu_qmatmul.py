"""Ferry's CPU matmul for GGUF 4/8-bit weights: int8 activations x unsigned weights with AVX-512 VNNI
(cpu_qmatmul.cpp), registered as the torch op `ferry_cpu::qmatmul`, so a compiled decode step calls it as one opaque
op (a fake implementation gives inductor its output's shape).

Built from source with the C++ compiler inductor uses ($CXX, else g++) at first use, into Ferry's cache folder
(`kernels/`, keyed by the source, torch's version and the compiler), so only the first process pays (~11 s on 2
cores). It is compiled by hand rather than through torch.utils.cpp_extension, which needs ninja, a package a
fresh `pip install` does not bring. Without a compiler, or when the build fails, `load()` returns None and says why (logged by the caller,
which then keeps torch's int4 kernel): never a silent slow path. The vector path needs AVX-512 VNNI, chosen at run
time from the CPU's flags; elsewhere the same op runs a scalar loop (`isa()` names which runs).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ferry.cache import cache_root, default_root
from ferry.model.layers.quant import QMatmulWeight

log = logging.getLogger("ferry.kernels")

SOURCE = Path(__file__).with_suffix(".cpp")
NAME = "ferry qmatmul (int8 activations, AVX-512 VNNI)"


def compiler() -> str | None:
    wanted = os.environ.get("CXX") or ("clang++" if os.uname().sysname == "Darwin" else "g++")
    return shutil.which(wanted)


def _build(cxx: str, target: Path) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", prefix=".building-", dir=target.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           str(SOURCE), "-o", scratch, *libs, "-lc10", "-ltorch_cpu"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed: {done.stderr.strip()[-2000:]}")
        os.replace(scratch, target)  # a concurrent build of the same source lands the same library
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


@functools.cache
def load() -> str | None:
    """Build (once per machine) and load the op: None when it is ready, else why it is not."""
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
    key = hashlib.sha256(SOURCE.read_bytes() + f"|{torch.__version__}|{os.path.realpath(cxx)}".encode())
    name = f"cpu_qmatmul-{key.hexdigest()[:16]}.so"
    target = cache_root() / "kernels" / name
    # The name is the build's whole input, so a library the default cache folder holds serves a process pointed
    # at another one (FERRY_CACHE set for a fresh packed-weight or compile cache) without a second build.
    built = next((p for p in (target, default_root() / "kernels" / name) if p.is_file()), None)
    try:
        if built is None:
            log.warning("building %s into %s (once per machine)", NAME, target.parent)
            _build(cxx, target)
            built = target
        torch.ops.load_library(str(built))
    except (OSError, RuntimeError) as exc:
        return f"its build failed: {exc}"
    _register_fake()
    return None


def _register_fake() -> None:
    @torch.library.register_fake("ferry_cpu::qmatmul")
    def _(x, packed, scales, mins, bits, offset, out_features, vector=True):
        return x.new_empty(*x.shape[:-1], out_features)


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
