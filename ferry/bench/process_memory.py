"""Peak resident memory of a `ferry` command run as its own process, as the process itself saw it.

The kernel's peak for a child (wait4's ru_maxrss, or getrusage inside it) starts from its parent's resident size
at fork and survives exec, so a child of a large parent (a test session holding models: 1.9 GB) reads as large
as the parent whatever it does. VmHWM in /proc/self/status belongs to the address space exec creates, so the
child reports it at exit and that is the figure used (Linux; elsewhere None). It also names the modules the
process imported, so a test can tell which heavy ones (a compiler, a second checkpoint format) a command pulled in.
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

# Runs `python -m ferry.cli ARGS` in this interpreter; at exit writes /proc/self/status (read first, before anything
# is allocated for the report) to the file named first + ".status", and its imported modules' names to that file.
_WRAPPER = ("import atexit, runpy, sys\n"
            "out = sys.argv.pop(1)\n"
            "def report():\n"
            "    try:\n"
            "        status = open('/proc/self/status').read()\n"
            "    except OSError:\n"
            "        status = ''\n"
            "    open(out + '.status', 'w').write(status)\n"
            "    open(out, 'w').write('\\n'.join(sorted(sys.modules)))\n"
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
    modules: frozenset[str] = frozenset()  # what the process had imported when it exited


def run_ferry(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout_s: float = 600) -> MeasuredRun:
    with tempfile.TemporaryDirectory() as folder:
        modules, status = Path(folder) / "modules", Path(folder) / "modules.status"
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(modules), *args], env=env or os.environ.copy(),
                              cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
        wall = time.perf_counter() - began
        peak = vmhwm_mib(status.read_text()) if status.exists() else None
        names = frozenset(modules.read_text().split()) if modules.exists() else frozenset()
    return MeasuredRun(peak, proc.returncode, proc.stdout, proc.stderr, wall, names)
