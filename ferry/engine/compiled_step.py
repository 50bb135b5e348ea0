"""How the decode step is compiled, and where the compile work is kept so one machine pays it once.

Measured on an H200, Llama-3-8B shape, batch 1 (benchmarks/results/2026-11-30_decode_paths_llama3-8b.md): CUDA
graphs alone 149 tokens/s (54% of the copy-bandwidth roofline; 1426 kernels per step), torch.compile's default
mode 204 (74%; 484 kernels), mode max-autotune-no-cudagraphs with coordinate-descent tuning 222 (80%; 386
kernels, Triton GEMV kernels tuned per shape). The last is what `--compile` means on CUDA. Its first compile on
that machine took 63 s; with inductor's caches in Ferry's cache folder the next process took 13 s
(..._warm_cache.md). So long-lived processes (chat, the Python API) compile by default; a one-shot
`ferry generate` does not, and says what `--compile` would give.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ferry.cache import cache_root

log = logging.getLogger("ferry.compile")

FAST_MODE = "max-autotune-no-cudagraphs"  # torch >= 2.11 adds coordinate-descent tuning to this mode
# Every (batch bucket, context bucket) is its own static-shape compile; torch's default limit (8) would send
# later buckets to eager kernels without an error, which is a silent slow path.
RECOMPILE_LIMIT = 64


def inductor_cache_dir() -> Path:
    """Inductor's caches (FX graphs, autotuning choices, Triton kernels) in Ferry's cache folder, unless the
    user pointed TORCHINDUCTOR_CACHE_DIR elsewhere. Importing torch._dynamo writes torch's default (a temporary
    folder) into the variable, so that value counts as unset; inductor reads the variable at each compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_decode_step(model: torch.nn.Module, mode: str | None) -> tuple[torch.nn.Module, str]:
    """The compiled forward and its label. `mode`: None for Ferry's choice (FAST_MODE on CUDA), "default" for
    torch's default mode, else any torch.compile mode."""
    import torch._dynamo

    mode = mode or FAST_MODE
    folder = inductor_cache_dir()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    log.info("decode step: torch.compile mode %s, compile cache %s", mode, folder)
    return torch.compile(model, dynamic=False, mode=None if mode == "default" else mode), mode
