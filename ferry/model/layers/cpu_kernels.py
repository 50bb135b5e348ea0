"""Ferry's C++ CPU kernels, the `ferry_cpu` torch library: qmatmul (GGUF 4/8-bit blocks x int8 activations,
cpu_qmatmul.cpp) and paged decode attention (K/V read in place through the block table, cpu_paged_attention.cpp).
Each is a torch op with a fake implementation, so a compiled step calls it as one opaque op.

Built from source with the C++ compiler inductor uses ($CXX, else g++) at first use, into Ferry's cache folder
(`kernels/`, keyed by the sources, torch's version and the compiler), so only the first process on a machine pays
(~20 s on 2 cores). It is compiled by hand rather than through torch.utils.cpp_extension, which needs ninja, a
package a fresh `pip install` does not bring. Without a compiler, or when the build fails, `load()` returns None
and says why (the callers log it and keep torch's kernels): never a silent slow path. Vector paths (AVX-512,
VNNI for qmatmul) are chosen at run time from the CPU's flags; elsewhere the same ops run scalar loops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import torch

from ferry.cache import cache_root, default_root

log = logging.getLogger("ferry.kernels")

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_qmatmul.cpp", HERE / "cpu_paged_attention.cpp")
NAME = "Ferry's C++ CPU kernels (qmatmul, paged decode attention)"
BUILD_TIMEOUT_S = 600
_loaded = False  # read by code that compiled steps trace: module globals, not cached calls
_vector_attention = False  # the CPU has the attention kernel's vector path (AVX-512)


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
           *map(str, SOURCES), "-o", scratch, *libs, "-lc10", "-ltorch_cpu"]
    try:
        # A build takes ~20 s on 2 cores; a compiler that hangs must not hang the load with it, nor outlive it: the
        # compiler and the processes it starts (cc1plus, as) run in a session of their own, killed whole on timeout.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{Path(cxx).name} did not finish within {BUILD_TIMEOUT_S} s") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed: {stderr.strip()[-2000:]}")
        os.replace(scratch, target)  # a concurrent build of the same sources lands the same library
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


@functools.cache
def load() -> str | None:
    """Build (once per machine) and load the library: None when it is ready, else why it is not."""
    global _loaded
    cxx = compiler()
    if cxx is None:
        why = f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
        log.warning("%s are not in use: %s; torch's kernels run instead", NAME, why)
        return why
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES)
                         + f"|{torch.__version__}|{os.path.realpath(cxx)}".encode())
    name = f"ferry_cpu-{key.hexdigest()[:16]}.so"
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
        log.warning("%s are not in use: its build failed (%s); torch's kernels run instead", NAME, exc)
        return f"its build failed: {exc}"
    _register_fakes()
    global _vector_attention
    _vector_attention = torch.ops.ferry_cpu.paged_decode_isa(64, 1) == "avx512"
    _loaded = True
    return None


def loaded() -> bool:
    """Whether `load()` has succeeded in this process (no build, no call: safe inside traced code)."""
    return _loaded


def attention_takes(head_dim: int, group: int, block_size: int) -> bool:
    """Whether the paged decode attention kernel runs its vector path for these shapes on this CPU (elsewhere its
    scalar loop is no faster than gathering + SDPA, so callers keep that). Safe inside traced code."""
    return _loaded and _vector_attention and head_dim % 16 == 0 and head_dim <= 128 and group <= 8 \
        and block_size % 16 == 0


def _register_fakes() -> None:
    @torch.library.register_fake("ferry_cpu::qmatmul")
    def _(x, packed, scales, mins, bits, offset, out_features, vector=True):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("ferry_cpu::paged_decode")
    def _(q, k_pool, v_pool, block_tables, context_lens, scale, vector=True):
        return torch.empty_like(q)
