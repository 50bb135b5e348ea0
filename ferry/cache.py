"""Ferry's cache folder: what one run measures or builds and a later run on the same machine reuses (the default
model, all-reduce plans, compiled kernels). `$FERRY_CACHE`, else `~/.cache/ferry`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("FERRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ferry")
    return Path(root)
