"""`ferry serve` as a child process on a free port (benchmarks, tests): started, its log kept, stopped by SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

from ferry.errors import FerryError

_LISTENING = re.compile(r"serving \S+ on (http://\S+)/v1")


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout_s: float = 900.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.url, self.log = "", []
        self._found = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._found.wait(start_timeout_s) or not self.url:
            self.stop()
            raise FerryError("ferry serve did not start:\n" + "".join(self.log[-20:]))

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if not self.url and (m := _LISTENING.search(line)):
                self.url = m.group(1)
                self._found.set()
        self._found.set()  # exited before listening: the constructor reports the log

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
