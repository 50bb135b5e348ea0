"""A `ferry serve` process for tests (ferry.serve.process), with plain HTTP calls and a /metrics reader."""

from __future__ import annotations

import json
import os
import threading
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


def check_ranks_stay_in_step(server: ServeProcess, prompts: list[str], expected: dict[int, str]) -> None:
    """What a multi-rank server must survive: requests that join while earlier ones decode, an unseeded sampled
    request (every rank must draw the same sample), and a client that leaves mid-stream. The greedy answers must
    equal `expected` (prompt index -> text of 8 tokens), the aborted request's blocks come back, and a repeated
    request still gives the same answer (the ranks are still in step)."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        time.sleep(0.15 * i)  # arrive while the earlier ones decode
        results[i] = client.completions.create(model="smollm", prompt=prompts[i], max_tokens=8,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in expected]
    for t in threads:
        t.start()
    sampled = client.completions.create(model="smollm", prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                        extra_body={"ignore_eos": True})  # so it always runs all 8 steps
    with client.completions.with_streaming_response.create(model="smollm", prompt=prompts[-1], max_tokens=200,
                                                            stream=True) as resp:
        next(resp.iter_lines())  # one event in, then the client leaves
    for t in threads:
        t.join(120)
    assert results == expected
    assert sampled.usage.completion_tokens == 8
    server.wait_for(lambda: server.metric("ferry_kv_blocks_used") == 0, what="the aborted request's blocks")
    first = min(expected)
    assert client.completions.create(model="smollm", prompt=prompts[first], max_tokens=8,
                                     temperature=0).choices[0].text == expected[first]
