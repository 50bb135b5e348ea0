"""The load generator's HTTP side: one streaming OpenAI request per `send`, timed per server-sent event.

aiohttp rather than httpx: the client has to keep up with 64 streams x ~100 tokens/s without becoming the
thing measured, and reading raw socket chunks and splitting `data:` lines ourselves keeps per-event cost to one
`json.loads`. Each event is stamped with the time its network chunk arrived, not the time it was parsed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

from ferry.bench.serve_load import LoadRequest, RequestResult
from ferry.errors import FerryError

MAX_ERROR_CHARS = 300


@dataclass
class HttpTarget:
    """Streams requests to an OpenAI-compatible server. Picklable until entered (client processes get a copy);
    use as `async with target:` so its connection pool lives in the running event loop."""

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 300.0
    chat: bool = False
    _session: Any = field(default=None, init=False, repr=False)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def __aenter__(self) -> Self:
        import aiohttp

        # No pool limit: the open-loop schedule, not the connector, decides how many requests are in flight.
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, headers=self.headers(),
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, request: LoadRequest) -> tuple[str, dict[str, Any]]:
        common = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                  "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True}
        if self.chat:
            return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": request.prompt_text}]}
        return "/v1/completions", {**common, "prompt": list(request.prompt_ids)}

    async def send(self, request: LoadRequest) -> RequestResult:
        import aiohttp

        if self._session is None:
            raise RuntimeError("HttpTarget.send outside `async with target:`")
        path, body = self.body(request)
        result = RequestResult(start=time.perf_counter())
        try:
            async with self._session.post(self.url.rstrip("/") + path, json=body) as resp:
                if resp.status != 200:
                    result.error = f"HTTP {resp.status}: {error_message(await resp.text())}"
                else:
                    await read_stream(resp.content, result)
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS] if str(exc) else type(exc).__name__
        result.end = time.perf_counter()
        result.ok = result.error is None
        return result


async def read_stream(content, result: RequestResult) -> None:
    """Fills `result` from an SSE body: a time per content chunk, token counts from the usage chunk. A stream
    that ends without `data: [DONE]` is an error."""
    buffer = b""
    async for data in content.iter_any():
        now = time.perf_counter()
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": keep-alive"), event/id fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                event = json.loads(payload)
            except ValueError:
                result.error = f"bad SSE data: {payload[:100]!r}"
                return
            if "error" in event:  # an error reported mid-stream, the OpenAI way
                result.error = f"stream error: {error_message(json.dumps(event))}"
                return
            if carries_content(event):
                result.chunk_times.append(now)
            usage = event.get("usage")
            if usage:
                result.prompt_tokens = usage.get("prompt_tokens")
                result.output_tokens = usage.get("completion_tokens")
    result.error = "stream ended without data: [DONE]"


def carries_content(event: dict[str, Any]) -> bool:
    """A chunk that delivers a token: any completions choice (its text may be empty: a token that ends no
    character yet, or a model served without a tokenizer), a chat delta with content that is not the role-only
    opening (`{"role": "assistant", "content": ""}`), or the chunk that closes a choice. The usage chunk
    (`choices: []`) is not output."""
    for choice in event.get("choices") or ():
        if "text" in choice or choice.get("finish_reason"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or (delta.get("content") is not None and "role" not in delta):
            return True
    return False


def error_message(body: str) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the body itself (shortened)."""
    try:
        doc = json.loads(body)
        err = doc.get("error", doc) if isinstance(doc, dict) else doc
        message = err.get("message") or err.get("detail") if isinstance(err, dict) else None
        if message:
            return str(message)[:MAX_ERROR_CHARS]
    except ValueError:
        pass
    return body.strip()[:MAX_ERROR_CHARS] or "(empty body)"


@dataclass(frozen=True)
class ServerInfo:
    model: str
    vocab_size: int | None  # where the server's model card says so (not part of the OpenAI API)


async def check_server(url: str, model: str | None, api_key: str | None, chat: bool = False,
                       timeout_s: float = 10.0) -> ServerInfo:
    """Before a run: the server answers, takes the key and serves the model; else one FerryError that says which.
    Also sends one 1-token streaming completion, since some servers check keys and models only there."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/")
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            async with s.get(base + "/v1/models") as resp:
                text = await resp.text()
                refuse(resp.status, text, url, model)
                cards = json.loads(text).get("data") or []
            ids = [c.get("id") for c in cards]
            if not ids:
                raise FerryError(f"{url}/v1/models lists no model")
            if model is not None and model not in ids:
                raise FerryError(f"model {model!r} is not served at {url}; it serves: {', '.join(map(str, ids))}")
            card = cards[ids.index(model)] if model is not None else cards[0]
            probe = LoadRequest((100, 101), max_tokens=1, prompt_text="Hi")
            path, body = HttpTarget(url, card["id"], api_key, timeout_s, chat).body(probe)
            async with s.post(base + path, json=body) as resp:
                refuse(resp.status, await resp.text(), url, card["id"])
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise FerryError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    except ValueError as exc:
        raise FerryError(f"{url}/v1/models did not answer JSON: {exc}") from None
    vocab = card.get("vocab_size")
    return ServerInfo(card["id"], int(vocab) if isinstance(vocab, int) else None)


def refuse(status: int, body: str, url: str, model: str | None) -> None:
    if status == 200:
        return
    message = error_message(body)
    if status == 401:
        raise FerryError(f"{url} refused the API key (401: {message}); pass --api-key or set FERRY_API_KEY")
    if status == 404:
        raise FerryError(f"{url}: model {model!r} or endpoint not found (404: {message})")
    raise FerryError(f"{url} answered HTTP {status} before the run: {message}")
