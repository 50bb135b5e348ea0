"""A `ferry serve` process for tests (ferry.serve.process), with plain HTTP calls and a /metrics reader."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from ferry.serve.process import ServerProcess


class ServeProcess(ServerProcess):
    def __init__(self, *args: str, api_key: str | None = None, start_timeout_s: float = 180.0) -> None:
        env = dict(os.environ)
        env.pop("FERRY_API_KEY", None)
        if api_key is not None:
            env["FERRY_API_KEY"] = api_key
        self.api_key = api_key
        super().__init__(list(args), env=env, start_timeout_s=start_timeout_s)

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
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_for(self, predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
