"""Running one API request on the engine: prompts to streams, streams to one JSON body or to server-sent events.

A request's status is known before its first byte goes out: the handler waits for the first token (or the engine's
refusal) of every choice before answering, so a full queue is a 429 and an oversized request a 400/413, never a
200 whose stream then breaks. Every wait has the request's deadline, and a client that leaves aborts its requests
(its KV blocks are freed at once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ferry.engine.sampling import SamplingParams
from ferry.serve import openai_protocol as api
from ferry.serve.engine_client import AsyncEngine, Delta, EngineFailed, EngineRejected, RequestStream
from ferry.serve.metrics import ServerMetrics
from ferry.serve.openai_protocol import RequestError


@dataclass
class Job:
    """One API request in flight: its engine streams (one per choice) and what the answer is built from."""

    endpoint: str  # "completions" | "chat"
    model: str
    deadline: float
    streams: list[RequestStream] = field(default_factory=list)
    first: list[Delta | None] = field(default_factory=list)  # each stream's first delta, taken before answering
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    finished: bool = False  # aborted what still ran and recorded in the metrics (once)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.streams)

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.streams)


class Runner:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, timeout_s: float) -> None:
        self.engine, self.metrics, self.timeout_s = engine, metrics, timeout_s

    async def start(self, request: Request, job: Job, prompts: list[list[int]], params: SamplingParams) -> None:
        """Submit every prompt and wait for each one's first token; raise RequestError if the engine refused."""
        try:
            for i, ids in enumerate(prompts):
                # One seed for a batch gives each prompt its own reproducible stream (as `ferry generate` does).
                p = params if params.seed is None else replace(params, seed=params.seed + i)
                job.streams.append(self.engine.submit(ids, p))
            job.first = list(await self._until(request, job, asyncio.gather(*(_first(s) for s in job.streams))))
        except BaseException as exc:
            self.finish(job, _outcome(exc))
            if isinstance(exc, (EngineRejected, EngineFailed)):
                raise _as_request_error(exc) from None
            raise

    async def collect(self, request: Request, job: Job) -> list[tuple[str, str | None]]:
        """Each choice's whole text and finish reason."""
        async def rest(stream: RequestStream, first: Delta) -> tuple[str, str | None]:
            parts, last = [first.text], first
            async for delta in stream:  # nothing more when the first delta already finished it
                parts.append(delta.text)
                last = delta
            return "".join(parts), last.finish_reason

        try:
            out = await self._until(request, job, asyncio.gather(*(rest(s, f) for s, f in
                                                                   zip(job.streams, job.first, strict=True))))
        except BaseException as exc:
            self.finish(job, _outcome(exc))
            if isinstance(exc, EngineFailed):
                raise _as_request_error(exc) from None
            raise
        self.finish(job, "ok")
        return out

    def stream(self, job: Job, chunk, include_usage: bool) -> StreamingResponse:
        """Server-sent events: `chunk(job, index, delta)` -> one event's text per token, then usage and [DONE]."""
        return _SSEResponse(self._events(job, chunk, include_usage), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, job: Job, chunk, include_usage: bool) -> AsyncIterator[str]:
        outcome = "aborted"
        loop = asyncio.get_running_loop()
        merged, pumps = _merge(job)
        # One timer per request, not one per token (asyncio.wait_for per token cost more than the JSON): at the
        # deadline it drops a TimeoutError into the stream, which ends the loop below like any engine error.
        timer = loop.call_at(job.deadline, merged.put_nowait, (0, TimeoutError()))
        try:
            open_streams = len(job.streams)
            while open_streams:
                index, item = await merged.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, TimeoutError):
                    outcome = "timeout"
                    yield api.sse_event(api.error_body(f"the request ran past its {self.timeout_s:g} s limit",
                                              "timeout_error", code="timeout"))
                    return
                elif isinstance(item, Exception):
                    outcome = "error"
                    yield api.sse_event(api.error_body(str(item), "server_error", code="engine_unavailable"))
                    return
                else:
                    yield chunk(job, index, item)
            if include_usage:
                obj = "chat.completion.chunk" if job.endpoint == "chat" else "text_completion"
                yield api.sse_event(api.usage_chunk(job.rid, job.model, job.created, obj, job.prompt_tokens,
                                                    job.output_tokens))
            yield "data: [DONE]\n\n"
            outcome = "ok"
        finally:
            timer.cancel()
            for p in pumps:
                p.cancel()
            self.finish(job, outcome)

    def finish(self, job: Job, outcome: str) -> None:
        """Abort what is still running (a no-op for finished streams) and record the request once."""
        if job.finished:
            return
        job.finished = True
        for s in job.streams:
            self.engine.abort(s)
        if job.streams:
            self.metrics.observe(job.endpoint, outcome, job.streams)

    async def _until(self, request: Request, job: Job, work):
        """Await `work` unless the client leaves (CancelledError) or the deadline passes (504)."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" log
        gone = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=max(job.deadline - time.monotonic(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if gone in done:
                raise asyncio.CancelledError("the client disconnected")
            raise RequestError(504, f"the request ran past its {self.timeout_s:g} s limit", kind="timeout_error",
                               code="timeout")
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()


def _as_request_error(exc: EngineRejected | EngineFailed) -> RequestError:
    """The engine's refusal or failure as the API answers it: 429 (retry) or 400, 503."""
    if isinstance(exc, EngineRejected) and exc.kind == "queue_full":
        return RequestError(429, str(exc), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, EngineRejected):
        return RequestError(400, str(exc))
    return RequestError(503, str(exc), kind="server_error", code="engine_unavailable")


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, EngineRejected):
        return "rejected"
    if isinstance(exc, RequestError):
        return "timeout"
    return "error" if isinstance(exc, EngineFailed) else "aborted"


async def _first(stream: RequestStream) -> Delta:
    async for delta in stream:
        return delta
    raise EngineFailed("the engine ended a request without a token")


def _merge(job: Job) -> tuple[asyncio.Queue, list[asyncio.Task]]:
    """Every choice's deltas in one queue as (index, delta), (index, None) when a choice ends, or (index,
    exception). One choice (the usual case) reads its engine stream's own queue directly: no task, no extra hop."""
    if len(job.streams) == 1:
        return _SingleStream(job.streams[0], job.first[0]), []
    merged: asyncio.Queue = asyncio.Queue()
    return merged, [asyncio.create_task(_pump(i, s, f, merged)) for i, (s, f) in
                    enumerate(zip(job.streams, job.first, strict=True))]


class _SingleStream:
    """The queue interface `_events` reads, over one engine stream: its first delta, then the stream's own."""

    def __init__(self, stream: RequestStream, first: Delta) -> None:
        self.stream, self.pending = stream, [first]

    def put_nowait(self, item) -> None:  # the deadline timer
        self.stream.queue.put_nowait(item[1])

    async def get(self):
        return 0, self.pending.pop() if self.pending else await self.stream.next_item()


async def _pump(index: int, stream: RequestStream, first: Delta, queue: asyncio.Queue) -> None:
    """One choice's deltas into the response's queue; None when it ends, the exception if it fails."""
    await queue.put((index, first))
    while (item := await stream.next_item()) is not None:
        await queue.put((index, item))
        if not isinstance(item, Delta):
            break
    await queue.put((index, None))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _SSEResponse(StreamingResponse):
    """Closes its event generator as soon as sending fails (the client left), so the request's `finally`
    aborts it then, not whenever the garbage collector gets to the generator."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
