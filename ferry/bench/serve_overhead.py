"""What the HTTP layer costs: one closed-loop workload driven through the engine directly and through `ferry serve`.

Both paths run the same engine code in their own processes (serve/engine_client.py), built from the same spec:
"direct" submits to an engine started in this process's event loop, "http" streams from a `ferry serve`
subprocess with aiohttp (the load generator's client). Both engines stay up for the whole run; each keeps a fixed
`--kv-memory` so the two fit on one device side by side and neither's batch is limited by the other's cache.

What makes the comparison fair (each measured, not assumed, on the H200: run3's rows):
- Both paths get the same requests in a round, and every round new prompts (its own seed): with one workload for
  every round the prompts stayed in the prefix cache after the first, and how many fell out between rounds, so how
  many steps carried a prefill (each several times a decode step's cost), differed between the paths (0 to 28 such
  steps a round) and set the TPOT gap. With new prompts both paths prefill every prompt every round.
- A warm-up round per path, not counted, of the full workload: the first round of each path ran cold (49 steps
  carrying prefills against 0 to 28 in later rounds, TPOT 1.5x theirs).
- The order alternates (direct first in even rounds, http first in odd ones), so drift over the run hits both alike.
- The summary is the median over the counted rounds of each path's figure, and beside it the median of the
  per-round HTTP/direct ratios; the raw rows stay in the result, with each round's steps and link counts.
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

# Counters read before and after each level (Engine.gauges keys), and their names in the server's /metrics.
COUNTERS = {
    "steps": "ferry_engine_steps_total", "graph_steps": "ferry_engine_graph_steps_total",
    "pcie_h2d_bytes": 'ferry_link_bytes_total{link="pcie_h2d"}',
    "pcie_d2h_bytes": 'ferry_link_bytes_total{link="pcie_d2h"}',
    "pcie_h2d_seconds": 'ferry_link_seconds_total{link="pcie_h2d"}',
    "pcie_d2h_seconds": 'ferry_link_seconds_total{link="pcie_d2h"}',
}
SUMMARY_KEYS = ("tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "ttft_ms_p50", "ttft_ms_p99", "output_tokens_per_s",
                "eager_steps")


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
                  max_token_id: int, log, warmup_rounds: int = 1, time_budget_s: float | None = None) -> dict:
    """`rounds` counted direct/http pairs after `warmup_rounds` uncounted ones; with `time_budget_s`, no round
    starts that would likely end past it (the rounds run are reported)."""
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    engine = AsyncEngine(spec)  # blocks while it loads: before the loop has anything else to do
    try:
        engine.start()
        direct = EngineTarget(engine)

        def workload(r: int) -> list[LoadRequest]:  # round r's requests, the same for both paths
            return make_workload(requests, prompt_tokens, output_tokens, seed + 1000 * (r + 1), max_token_id)

        short = make_workload(min(concurrency, requests), prompt_tokens, (8, 8), seed, max_token_id)
        rows: dict[str, list[dict]] = {"direct": [], "http": []}
        under_load: list[str] = []
        async with HttpTarget(url, model, timeout_s=600.0) as http:
            targets = {"direct": direct, "http": http}
            for target in targets.values():
                await _level(target, short, concurrency)  # every CUDA graph bucket and connection made once first
            last_pair_s = 0.0
            for r in range(-warmup_rounds, rounds):
                if deadline is not None and r >= 0 and time.monotonic() + 1.2 * last_pair_s > deadline:
                    log(f"ferry: stopping after {r} counted rounds: another would pass the time budget")
                    break
                began = time.monotonic()
                order = ("direct", "http") if r % 2 == 0 else ("http", "direct")
                for name in order:
                    counts = _direct_counts(engine) if name == "direct" else await _server_counts(url)
                    scrape = None
                    if name == "http" and r >= 0:  # /metrics mid-round, under load (the last one is kept)
                        scrape = asyncio.create_task(_scrape_later(url, last_pair_s / 4))
                    row = await _level(targets[name], workload(r), concurrency)
                    after = _direct_counts(engine) if name == "direct" else await _server_counts(url)
                    if scrape is not None:
                        under_load = [line for line in await scrape if "ferry_link_" in line]
                    if row["failed"]:
                        raise FerryError(f"{name}: {row['failed']} of {requests} requests failed: "
                                         f"{'; '.join(row['errors'])}")
                    # TPOT depends on how many steps carried a prefill (eager, several times a graph step's time),
                    # which the arrival timing of each path decides: shown per level so it can be told apart from
                    # the HTTP layer's own cost.
                    delta = {k: after.get(k, 0) - counts.get(k, 0) for k in COUNTERS}
                    row |= {"path": name, "round": r, "counted": r >= 0, "graph_steps": delta["graph_steps"],
                            "eager_steps": delta["steps"] - delta["graph_steps"],
                            **{k: delta[k] for k in COUNTERS if k.startswith("pcie")}}
                    rows[name].append(row)
                    log(f"ferry: round {r}{' (warm-up)' if r < 0 else ''} {name}: tpot p50 "
                        f"{row['tpot_ms_p50']:.2f} ms, itl p50 {row['itl_ms_p50']:.2f} ms, "
                        f"{row['eager_steps']} eager steps, {row['output_tokens_per_s']:.0f} output tokens/s")
                last_pair_s = time.monotonic() - began
    finally:
        engine.close()
    counted = {name: [row for row in rows[name] if row["counted"]] for name in rows}
    if not counted["direct"]:
        raise FerryError("no round was counted: raise the time budget or lower --requests")
    return {"rows": rows["direct"] + rows["http"], "summary": summarize_rounds(counted),
            "rounds_counted": len(counted["direct"]), "server_link_metrics_under_load": under_load}


def summarize_rounds(counted: dict[str, list[dict]]) -> dict:
    """Per key: each path's median over the counted rounds, their ratio (http / direct), and the median of the
    rounds' own http / direct ratios (pairs run back to back, so slow drift cancels within a pair)."""
    summary = {}
    for key in SUMMARY_KEYS:
        direct = statistics.median(row[key] for row in counted["direct"])
        http = statistics.median(row[key] for row in counted["http"])
        pairs = [h[key] / d[key] for d, h in zip(counted["direct"], counted["http"], strict=True) if d[key]]
        summary[key] = {"direct": direct, "http": http, "http_over_direct": http / direct if direct else None,
                        "paired_median": statistics.median(pairs) if pairs else None}
    return summary


def _direct_counts(engine: AsyncEngine) -> dict[str, float]:
    return {key: engine.gauges.get(key, 0) for key in COUNTERS}


async def _server_counts(url: str) -> dict[str, float]:
    """The server engine's counters (COUNTERS), from its /metrics."""
    lines = await _scrape(url)
    values = {}
    for line in lines:
        name, _, value = line.rpartition(" ")
        values[name] = value
    return {key: float(values[name]) for key, name in COUNTERS.items() if name in values}


async def _scrape(url: str) -> list[str]:
    def read() -> list[str]:
        import urllib.request

        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            return resp.read().decode().splitlines()

    return await asyncio.get_running_loop().run_in_executor(None, read)


async def _scrape_later(url: str, delay_s: float) -> list[str]:
    await asyncio.sleep(delay_s)
    return await _scrape(url)


def run(spec: WorkerSpec, url: str, model: str, **kwargs) -> dict:
    return asyncio.run(compare(spec, url, model, **kwargs))
