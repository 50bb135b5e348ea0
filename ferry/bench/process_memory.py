"""Peak resident memory of a `ferry` command run as its own process, as the process itself saw it.

The kernel's peak for a child (wait4's ru_maxrss, or getrusage inside it) starts from its parent's resident size
at fork and survives exec, so a child of a large parent (a test session holding models: 1.9 GB) reads as large
as the parent whatever it does. VmHWM in /proc/self/status belongs to the address space exec creates, so the
child reports it at exit and that is the figure used (Linux; elsewhere None).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.memory import vmhwm_mib

# Runs `python -m ferry.cli ARGS` in this interpreter and writes /proc/self/status to the file named first at exit.
_WRAPPER = ("import atexit, runpy, sys\n"
            "out = sys.argv.pop(1)\n"
            "def report():\n"
            "    try:\n"
            "        open(out, 'w').write(open('/proc/self/status').read())\n"
            "    except OSError:\n"
            "        pass\n"
            "atexit.register(report)\n"
            "sys.argv[0] = 'ferry'\n"
            "runpy.run_module('ferry.cli', run_name='__main__', alter_sys=True)\n")


@dataclass(frozen=True)
class MeasuredRun:
    peak_rss_mib: float | None
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def run_ferry(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout_s: float = 600) -> MeasuredRun:
    with tempfile.TemporaryDirectory() as folder:
        status = Path(folder) / "status"
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(status), *args], env=env or os.environ.copy(),
                              cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - began
        peak = vmhwm_mib(status.read_text()) if status.exists() else None
    return MeasuredRun(peak, proc.returncode, proc.stdout, proc.stderr, wall)
