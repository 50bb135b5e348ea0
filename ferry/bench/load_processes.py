"""One load level spread over client processes, each with its own event loop, for when a single loop cannot
parse chunks as fast as the server sends them (thousands per second).

The arrival schedule is computed once, before the split: each process sends its share (every P-th request) at the
same absolute offsets from one shared start time, so the open-loop timing is the one a single process would
have followed. time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import queue
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ferry.bench.serve_load import LoadRequest, RequestResult, run_level

READY_TIMEOUT_S = 120.0  # a spawned process imports numpy and aiohttp: seconds on a busy machine
START_MARGIN_S = 0.2  # between telling the processes the start time and that time


async def _run_entered(target: Any, requests: Sequence[LoadRequest], rate: float | None,
                       concurrency: int | None) -> list[RequestResult]:
    async with target:  # the target's connections live in this loop
        return await run_level(target, requests, rate, concurrency)


def run_level_here(target: Any, requests: Sequence[LoadRequest], rate: float | None,
                   concurrency: int | None) -> list[RequestResult]:
    """The level in this process, with `target` an async context manager (HttpTarget)."""
    return asyncio.run(_run_entered(target, requests, rate, concurrency))


async def _client_level(target: Any, requests: list[LoadRequest], rate: float | None, concurrency: int | None,
                        inbox: Any, outbox: Any, index: int) -> list[RequestResult]:
    async with target:  # loop and connection pool made before saying ready, so the first sends are not late
        outbox.put(("ready", index, None))
        start_at = await asyncio.get_running_loop().run_in_executor(None, inbox.get, True, READY_TIMEOUT_S)
        return await run_level(target, requests, rate, concurrency, start_at)


def _client(target: Any, requests: list[LoadRequest], rate: float | None, concurrency: int | None,
            inbox: Any, outbox: Any, index: int) -> None:
    # The parent stops the clients on Ctrl-C; each one catching it too would only print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        outbox.put(("done", index, asyncio.run(_client_level(target, requests, rate, concurrency, inbox, outbox,
                                                             index))))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises it)
        outbox.put(("failed", index, traceback.format_exc()))


def split(requests: Sequence[LoadRequest], concurrency: int | None,
          processes: int) -> list[tuple[list[int], int | None]]:
    """(request indices, concurrency) per process: every P-th request; closed loop splits C as evenly as it can
    (never more processes than C)."""
    p = min(processes, len(requests), concurrency or processes)
    shares = []
    for i in range(p):
        c = None if concurrency is None else concurrency // p + (i < concurrency % p)
        shares.append((list(range(i, len(requests), p)), c))
    return shares


def level_deadline_s(requests: Sequence[LoadRequest], concurrency: int | None, timeout_s: float) -> float:
    """The longest a level can take if every request hits its timeout: a bound for waiting on the processes."""
    if concurrency is None:
        return max((r.arrival_s for r in requests), default=0.0) + timeout_s + 60.0
    return math.ceil(len(requests) / concurrency) * timeout_s + 60.0


def run_level_processes(target: Any, requests: Sequence[LoadRequest], rate: float | None, concurrency: int | None,
                        processes: int, timeout_s: float) -> list[RequestResult]:
    """The level over `processes` spawned clients (each with a pickled copy of `target`); results in request
    order. A client that fails raises here with its traceback; Ctrl-C or a timeout stops every client."""
    if processes <= 1:
        return run_level_here(target, requests, rate, concurrency)
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads and an event loop
    shares = split(requests, concurrency, processes)
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in shares]
    procs = [ctx.Process(target=_client, args=(target, [requests[i] for i in idx], rate, c, inboxes[k], outbox, k),
                         daemon=True, name=f"ferry-load-client-{k}") for k, (idx, c) in enumerate(shares)]
    results: list[RequestResult | None] = [None] * len(requests)
    try:
        for proc in procs:
            proc.start()
        _collect(outbox, "ready", len(procs), READY_TIMEOUT_S, procs)
        start_at = time.perf_counter() + START_MARGIN_S
        for box in inboxes:
            box.put(start_at)
        deadline = level_deadline_s(requests, concurrency, timeout_s)
        for k, share in _collect(outbox, "done", len(procs), deadline, procs).items():
            for i, result in zip(shares[k][0], share):
                results[i] = result
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return results  # type: ignore[return-value]


def _collect(outbox: Any, kind: str, count: int, timeout_s: float, procs: list) -> dict[int, Any]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        try:
            what, index, payload = outbox.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load client process died: {', '.join(dead)}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"load clients: {count - len(got)} not {kind} after {timeout_s:.0f} s") from None
            continue
        if what == "failed":
            raise RuntimeError(f"load client {index} failed:\n{payload}")
        if what == kind:
            got[index] = payload
    return got
