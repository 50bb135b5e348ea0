"""What the HTTP layer costs: one closed-loop workload driven through the engine directly and through `ferry serve`.

Both paths run the same engine code in their own processes (serve/engine_client.py), built from the same spec:
"direct" submits to an engine started in this process's event loop, "http" streams from a `ferry serve`
subprocess with aiohttp (the load generator's client). Both engines stay up for the whole run, so the levels
alternate (direct, http, direct, http, ...) without restarts and drift hits both alike; each keeps a fixed
`--kv-memory` so the two fit on one device side by side and neither's batch is limited by the other's cache.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from ferry.bench.serve_load import LoadRequest, RequestResult, make_workload, run_level, summarize
from ferry.bench.sse_client import HttpTarget
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.parallel.workers import WorkerSpec
from ferry.serve.engine_client import AsyncEngine


@dataclass
class EngineTarget:
    """The load generator's Target over an AsyncEngine: token times taken as each step's tokens arrive."""

    engine: AsyncEngine

    async def send(self, request: LoadRequest) -> RequestResult:
        result = RequestResult(start=time.perf_counter(), prompt_tokens=len(request.prompt_ids))
        try:
            stream = self.engine.submit(list(request.prompt_ids),
                                        SamplingParams(max_tokens=request.max_tokens, ignore_eos=True))
            async for _ in stream:
                result.chunk_times.append(time.perf_counter())
            result.output_tokens = len(result.chunk_times)
        except Exception as exc:  # noqa: BLE001  (counted as the request's error, as the HTTP target does)
            result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.perf_counter()
        result.ok = result.error is None
        return result


async def _level(target, requests: list[LoadRequest], concurrency: int) -> dict:
    results = await run_level(target, requests, concurrency=concurrency)
    return summarize(results, None, concurrency)


async def compare(spec: WorkerSpec, url: str, model: str, concurrency: int, requests: int,
                  prompt_tokens: tuple[int, int], output_tokens: tuple[int, int], rounds: int, seed: int,
                  max_token_id: int, log) -> dict:
    engine = AsyncEngine(spec)  # blocks while it loads: before the loop has anything else to do
    try:
        engine.start()
        direct = EngineTarget(engine)
        workload = make_workload(requests, prompt_tokens, output_tokens, seed, max_token_id)
        warm = make_workload(min(concurrency, requests), prompt_tokens, (8, 8), seed + 1, max_token_id)
        rows: dict[str, list[dict]] = {"direct": [], "http": []}
        async with HttpTarget(url, model, timeout_s=600.0) as http:
            for name, target in (("direct", direct), ("http", http)):
                await _level(target, warm, concurrency)  # every CUDA graph bucket and connection made once first
            for r in range(rounds):
                for name, target in (("direct", direct), ("http", http)):
                    steps = _direct_steps(engine) if name == "direct" else await _server_steps(url)
                    row = await _level(target, workload, concurrency)
                    after = _direct_steps(engine) if name == "direct" else await _server_steps(url)
                    # TPOT depends on how many steps carried a prefill (eager, several times a graph step's
                    # time), which the arrival timing of each path decides: shown per level so it can be told apart
                    # from the HTTP layer's own cost.
                    row |= {"path": name, "round": r, "graph_steps": after[1] - steps[1],
                            "eager_steps": (after[0] - after[1]) - (steps[0] - steps[1])}
                    rows[name].append(row)
                    if row["failed"]:
                        raise FerryError(f"{name}: {row['failed']} of {len(workload)} requests failed: "
                                         f"{'; '.join(row['errors'])}")
                    log(f"ferry: round {r} {name}: tpot p50 {row['tpot_ms_p50']:.2f} ms, "
                        f"{row['output_tokens_per_s']:.0f} output tokens/s")
    finally:
        engine.close()

    def med(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    summary = {key: {"direct": med("direct", key), "http": med("http", key),
                     "http_over_direct": med("http", key) / med("direct", key)}
               for key in ("tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "ttft_ms_p50", "ttft_ms_p99",
                           "output_tokens_per_s", "eager_steps")}
    return {"rows": rows["direct"] + rows["http"], "summary": summary}


def _direct_steps(engine: AsyncEngine) -> tuple[int, int]:
    return engine.gauges.get("steps", 0), engine.gauges.get("graph_steps", 0)


async def _server_steps(url: str) -> tuple[int, int]:
    """(steps, graph steps) of the server's engine, from its /metrics."""
    def read() -> tuple[int, int]:
        import urllib.request

        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            values = {}
            for line in resp.read().decode().splitlines():
                name, _, value = line.partition(" ")
                values[name] = value
        return int(float(values["ferry_engine_steps_total"])), int(float(values["ferry_engine_graph_steps_total"]))

    return await asyncio.get_running_loop().run_in_executor(None, read)


def run(spec: WorkerSpec, url: str, model: str, **kwargs) -> dict:
    return asyncio.run(compare(spec, url, model, **kwargs))

