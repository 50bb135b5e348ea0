"""Ferry's cache folder: what one run measures or builds and a later run on the same machine reuses (the default
model, all-reduce plans, compiled kernels). `$FERRY_CACHE`, else `~/.cache/ferry`."""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "ferry"


def cache_root() -> Path:
    root = os.environ.get("FERRY_CACHE")
    return Path(root) if root else default_root()
