"""A `ferry serve` process for tests: started on a free port, its log kept, always stopped (never orphaned)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

_LISTENING = re.compile(r"serving \S+ on (http://\S+)/v1")


class ServeProcess:
    def __init__(self, *args: str, api_key: str | None = None, start_timeout_s: float = 180.0) -> None:
        env = dict(os.environ)
        env.pop("FERRY_API_KEY", None)
        if api_key is not None:
            env["FERRY_API_KEY"] = api_key
        self.api_key = api_key
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self._found = threading.Event()
        self.url = ""
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._found.wait(start_timeout_s) or not self.url:
            self.stop()
            raise RuntimeError("ferry serve did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if not self.url and (m := _LISTENING.search(line)):
                self.url = m.group(1)
                self._found.set()
        self._found.set()  # exited before listening: the constructor reports the log

    def request(self, method: str, path: str, body: bytes | dict | None = None, key: str | None = "default",
                timeout: float = 60.0) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one plain HTTP call."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"}
        key = self.api_key if key == "default" else key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
        text = raw.decode()
        return status, hdrs, json.loads(text) if text.startswith(("{", "[")) else {"text": text}

    def metric(self, name: str) -> float:
        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        for line in body["text"].splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_for(self, predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
