"""This process's resident memory, now and at its peak: how many edges fit on one machine."""

from __future__ import annotations

import os
import resource
import sys


def resident_mib() -> float | None:
    """Resident set size now (Linux /proc; None where the system does not expose it)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    """The largest resident set size this process has had (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
