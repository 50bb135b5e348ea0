"""This process's resident memory, now and at its peak: how many edges or ranks fit on one machine."""

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


def vmhwm_mib(status_text: str) -> float | None:
    """VmHWM (peak resident size of the address space) from the text of /proc/PID/status, in MiB."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def peak_resident_mib() -> float:
    """The largest resident set size this process's address space has had: VmHWM on Linux (getrusage's peak
    would start from the parent's size at fork, ferry/bench/process_memory.py says why), else getrusage."""
    try:
        with open("/proc/self/status") as f:
            peak = vmhwm_mib(f.read())
        if peak is not None:
            return peak
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
