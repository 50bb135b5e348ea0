"""This process's resident memory, now and at its peak: how many edges or ranks fit on one machine."""

from __future__ import annotations

import ctypes
import functools
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


def release_freed_heap() -> None:
    """Hand memory that malloc holds freed back to the system (glibc's malloc_trim; elsewhere nothing).

    A load's temporaries (int4 packing, building the tokenizer) are freed but stay resident in malloc's arenas, and
    with other threads running (gRPC's, torch's) the next piece may be allocated in another arena than the one
    holding them, so freed memory piles up piece by piece: on the 2-core CPU `ferry edge --split 4` peaked at
    328-364 MiB over 8 runs (327-334 with MALLOC_ARENA_MAX=1), and at 302-305 trimming after each piece, which
    costs ~1 ms. The peak becomes the largest piece's, not the sum of what each left behind."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter already runs on
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
