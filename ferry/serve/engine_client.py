"""The server's handle on the engine: ranks in their own processes, requests as asyncio streams of tokens.

The engine runs in worker processes (one, or one per tensor-parallel rank; parallel/workers.py), never in the
server's: HTTP parsing, JSON and SSE framing would otherwise hold the interpreter lock the step loop needs between
GPU launches. Commands go out on the ranks' queues (step_loop.py joins them at step boundaries); one reader thread
takes rank 0's per-step events and hands each step's tokens to the event loop in one call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.parallel.step_loop import AbortRequest, AddRequest, LeaveLoop
from ferry.parallel.workers import TensorParallelWorkers, WorkerSpec

log = logging.getLogger("ferry.serve")


class EngineRejected(FerryError):
    """The engine refused a request: `kind` is "invalid" (it cannot run) or "queue_full" (retry later)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class EngineFailed(FerryError):
    """The engine's processes stopped; no request can run any more."""


@dataclass(frozen=True)
class Delta:
    token_id: int
    text: str
    finish_reason: str | None


@dataclass
class RequestStream:
    """One request's tokens as they come (`async for delta in stream`), with the times metrics need."""

    cid: int
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        item = await self.next_item()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def next_item(self) -> Delta | Exception | None:
        """The next delta, or the error that ends the request (returned, not raised), or None once it finished."""
        if self.finish_reason is not None and self.queue.empty():
            return None
        return await self.queue.get()

    def _deliver(self, token_id: int, text: str, finish: str | None, now: float) -> None:
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.output_tokens += 1
        self.finish_reason = finish
        self.queue.put_nowait(Delta(token_id, text, finish))


class AsyncEngine:
    """Start with `start()` inside the running event loop; `submit` a request, iterate its stream, `abort` it."""

    def __init__(self, spec: WorkerSpec, tp: int = 1, compression: str | None = None, timeout_s: float = 300.0,
                 torchrun: bool = False):
        self.tp = tp
        self.workers = TensorParallelWorkers(spec, tp, compression=compression, timeout_s=timeout_s,
                                             torchrun=torchrun)
        self.info = dict(self.workers.info)
        self.workers.send(("serve",))
        self.gauges: dict[str, int] = {}
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []  # called in the event loop when the ranks stop
        self._streams: dict[int, RequestStream] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_events, name="ferry-serve-events", daemon=True)
        self._reader.start()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        if self.failure:
            raise EngineFailed(self.failure)
        if self.tp > 1 and not params.greedy and params.seed is None:
            # Every rank must draw the same sample; a seed chosen here travels with the request to all of them.
            params = replace(params, seed=random.getrandbits(62))
        stream = RequestStream(next(self._ids), len(prompt_ids))
        self._streams[stream.cid] = stream
        self.workers.send(AddRequest(stream.cid, list(prompt_ids), params))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop a request that has not finished (a client left, or its time ran out); its blocks are freed."""
        if self._streams.pop(stream.cid, None) is not None and not self.failure:
            self.workers.send(AbortRequest(stream.cid))

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the requests in flight to finish; abort the rest. Returns how many were."""
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and not self.failure:
            await asyncio.sleep(0.05)
        left = list(self._streams.values())
        for stream in left:
            self.abort(stream)
            stream.queue.put_nowait(EngineFailed(f"the server is shutting down (drain limit {timeout_s:g} s)"))
        return len(left)

    def close(self) -> None:
        self._stopping.set()
        if self._reader is not None:
            self._reader.join(5)  # polls every 0.25 s; the ranks are stopped after it no longer reads their queue
        if not self.failure:
            try:
                self.workers.send(LeaveLoop())
            except FerryError:
                pass
        self.workers.close()

    # -- the reader thread ------------------------------------------------------------------------------------

    def _read_events(self) -> None:
        while not self._stopping.is_set():
            try:
                event = self.workers.poll_event(0.25)
            except FerryError as exc:
                if not self._stopping.is_set():
                    self._loop.call_soon_threadsafe(self._fail, str(exc))
                return
            if event is not None:
                self._loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event) -> None:
        kind = event[0]
        if kind == "step":
            _, tokens, gauges = event
            self.gauges = gauges
            now = time.perf_counter()
            for cid, token_id, text, finish in tokens:
                stream = self._streams.get(cid)
                if stream is None:
                    continue  # aborted here while its token was on the way
                stream._deliver(token_id, text, finish, now)
                if finish is not None:
                    del self._streams[cid]
        elif kind == "rejected":
            _, cid, (reason, message) = event
            stream = self._streams.pop(cid, None)
            if stream is not None:
                stream.finish_reason = "rejected"
                stream.queue.put_nowait(EngineRejected(reason, message))

    def _fail(self, reason: str) -> None:
        self.failure = reason
        log.error("engine stopped: %s", reason)
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineFailed(f"the engine stopped: {reason}"))
        self._streams.clear()
        for call in self.on_failure:
            call(reason)
