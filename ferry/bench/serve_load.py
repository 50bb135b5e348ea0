"""Load generation against a serving target: the workload, the arrival schedule, running one load level, and
the statistics (TTFT, TPOT, inter-chunk latency, throughput) plus the throughput knee over a sweep.

Nothing here knows about HTTP: a `Target` is anything with `async send(LoadRequest) -> RequestResult`, so the
same workload and statistics measure the server over HTTP (`ferry.bench.sse_client.HttpTarget`) and the engine
driven directly, which is what "the HTTP layer adds <= 5% to TPOT" compares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FIRST_TOKEN_ID = 100  # skip the ids where tokenizers keep special and control tokens
MAX_TOKEN_ID = 30000  # every vocabulary Ferry runs has at least this many ordinary tokens


@dataclass(frozen=True)
class LoadRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the level's start (open loop); unused in closed loop
    prompt_text: str | None = None  # the chat message, for targets that send text


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # time.perf_counter() when sent
    end: float = 0.0  # when the stream finished or failed
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    prompt_tokens: int | None = None  # as the target reports them (the usage chunk over HTTP)
    output_tokens: int | None = None
    lag_s: float = 0.0  # how late the send was against the open-loop schedule (a client falling behind)


class Target(Protocol):
    async def send(self, request: LoadRequest) -> RequestResult: ...


def parse_span(text: str, name: str) -> tuple[int, int]:
    """`128-512` (uniform) or `256` (fixed) -> (lo, hi)."""
    from ferry.errors import FerryError

    try:
        lo, hi = (int(x) for x in text.split("-")) if "-" in text else (int(text),) * 2
    except ValueError:
        raise FerryError(f"--{name} {text!r}: give LO-HI (128-512) or one length (256)") from None
    if not 0 < lo <= hi:
        raise FerryError(f"--{name} {text!r}: need 0 < LO <= HI")
    return lo, hi


def make_workload(n: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int], seed: int = 0,
                  max_token_id: int = MAX_TOKEN_ID, chat_words: Sequence[str] | None = None) -> list[LoadRequest]:
    """`n` requests with lengths uniform in the given spans and random prompt ids in [100, max_token_id); with
    `chat_words`, also a message of that many words cut from the text at a random place."""
    rng = np.random.default_rng(seed)
    p_lens = rng.integers(prompt_tokens[0], prompt_tokens[1] + 1, size=n)
    o_lens = rng.integers(output_tokens[0], output_tokens[1] + 1, size=n)
    requests = []
    for p, o in zip(p_lens.tolist(), o_lens.tolist()):
        ids = tuple(rng.integers(FIRST_TOKEN_ID, max_token_id, size=p).tolist())
        text = None
        if chat_words:
            at = int(rng.integers(len(chat_words)))
            text = " ".join(chat_words[(at + i) % len(chat_words)] for i in range(p))
        requests.append(LoadRequest(ids, o, 0.0, text))
    return requests


def poisson_offsets(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times of a Poisson process of `rate` requests/s: exponential gaps, the first request at 0.
    `rate` = inf sends everything at once."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])[:n]


def schedule(requests: Sequence[LoadRequest], rate: float, seed: int = 0) -> list[LoadRequest]:
    return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, poisson_offsets(len(requests),
                                                                                                  rate, seed))]


async def run_level(target: Target, requests: Sequence[LoadRequest], rate: float | None = None,
                    concurrency: int | None = None, start_at: float | None = None) -> list[RequestResult]:
    """Runs one load level; results in the order of `requests`. Open loop (`rate` given): each request is sent at
    its `arrival_s` after the start (set by `schedule(requests, rate, seed)`), whatever is in flight. Closed loop (`concurrency`): that many requests in
    flight, the next sent as one finishes. `start_at` (a perf_counter time) lines up client processes."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    t0 = time.perf_counter() if start_at is None else start_at
    await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
    results: list[RequestResult | None] = [None] * len(requests)

    async def send(i: int, scheduled: float | None) -> None:
        result = await target.send(requests[i])
        if scheduled is not None:
            result.lag_s = max(0.0, result.start - scheduled)
        results[i] = result

    async with asyncio.TaskGroup() as group:  # a bug in a target stops the level, not just one request
        if concurrency is not None:
            todo = iter(range(len(requests)))

            async def closed_loop_worker() -> None:
                for i in todo:  # one iterator shared by all workers: each index is taken once
                    await send(i, None)

            for _ in range(min(concurrency, len(requests))):
                group.create_task(closed_loop_worker())
        else:
            for i in sorted(range(len(requests)), key=lambda i: requests[i].arrival_s):
                at = t0 + requests[i].arrival_s
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                group.create_task(send(i, at))
    return results  # type: ignore[return-value]


def level_name(rate: float | None, concurrency: int | None) -> str:
    if rate is None:
        return f"concurrency {concurrency}"
    return f"rate {rate:g}/s" if math.isfinite(rate) else "rate inf"


def _pct(values: Sequence[float], q: float, scale: float = 1000.0) -> float | None:
    return float(np.percentile(values, q)) * scale if len(values) else None


def summarize(results: Sequence[RequestResult], rate: float | None = None, concurrency: int | None = None,
              max_errors: int = 5) -> dict[str, Any]:
    """One load level's row: counts, throughput and latency percentiles (ms). TTFT = first output chunk - send;
    TPOT per request = (last chunk - first chunk) / (output tokens - 1); ITL = gaps between chunks, all requests.
    Open loop: `scheduled_rate` is the rate this run's arrivals really had (a short Poisson run strays from the
    nominal rate), `achieved_rate` the rate requests finished at, as scheduled rate / slope of finish time against
    scheduled send time: a least-squares slope over all completed requests, ~1 while the target keeps up, so
    one long request at either end of the run does not sway it as a first-to-last span would."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = [r.output_tokens if r.output_tokens is not None else len(r.chunk_times) for r in ok]
    start = min((r.start for r in results), default=0.0)
    duration = max((r.end for r in results), default=0.0) - start
    timed = [r for r in ok if r.chunk_times]
    ttft = [r.chunk_times[0] - r.start for r in timed]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (n - 1) for r, n in zip(ok, out_tokens)
            if len(r.chunk_times) >= 2 and n > 1]
    itl = np.concatenate([np.diff(r.chunk_times) for r in timed]) if timed else np.array([])
    e2e = [r.end - r.start for r in ok]
    scheduled_rate = achieved_rate = None
    if rate is not None and math.isfinite(rate):
        planned = np.array([r.start - r.lag_s for r in results])
        if np.ptp(planned) > 0:
            scheduled_rate = (len(planned) - 1) / float(np.ptp(planned))
            ok_planned = np.array([r.start - r.lag_s for r in ok])
            if len(ok) >= 3 and np.ptp(ok_planned) > 0:
                slope = np.polyfit(ok_planned, [r.end for r in ok], 1)[0]
                achieved_rate = scheduled_rate / slope if slope > 0 else None
    row: dict[str, Any] = {
        "load": level_name(rate, concurrency),
        "offered_rate": rate if rate is not None and math.isfinite(rate) else None,
        "concurrency": concurrency,
        "requests": len(results), "completed": len(ok), "failed": len(failed),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": sum(out_tokens) / duration if duration > 0 else None,
        "scheduled_rate": scheduled_rate, "achieved_rate": achieved_rate,
        "max_send_lag_ms": max((r.lag_s for r in results), default=0.0) * 1000,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok), "output_tokens": sum(out_tokens),
        "requests_without_usage": sum(r.output_tokens is None for r in ok),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        row |= {f"{name}_ms_p{q}": _pct(values, q) for q in (50, 90, 99)}
    row |= {f"itl_ms_p{q}": _pct(itl, q) for q in (50, 99)}
    row |= {f"e2e_ms_p{q}": _pct(e2e, q) for q in (50, 99)}
    row["errors"] = list(dict.fromkeys(r.error for r in failed))[:max_errors]
    return row


def find_knee(rows: Sequence[dict[str, Any]], min_gain: float = 0.10, latency_factor: float = 2.0,
              min_achieved: float = 0.90) -> dict[str, Any] | None:
    """The load level after which more load stops paying, over a sweep in increasing load: the next level adds
    less than `min_gain` output tokens/s while p99 TPOT or TTFT grows `latency_factor`x ("latency"), or the next
    level finishes requests at less than `min_achieved` of the rate they were sent at ("achieved_rate"; where
    the first level already does, the knee is the first level). None if no level qualifies."""
    def grew(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
        return bool(a.get(key) and b.get(key) and b[key] >= latency_factor * a[key])

    for i, cur in enumerate(rows):
        knee = max(i - 1, 0)
        offered, achieved = cur.get("scheduled_rate") or cur.get("offered_rate"), cur.get("achieved_rate")
        if offered and achieved is not None and achieved < min_achieved * offered:
            return {"index": knee, "load": rows[knee]["load"], "rule": "achieved_rate",
                    "why": f"{cur['load']}: achieved {achieved:.3g} req/s < {min_achieved:.0%} of the "
                           f"{offered:.3g} req/s sent"}
        prev = rows[knee]
        if i == 0 or not prev.get("output_tokens_per_s"):
            continue
        gain = (cur.get("output_tokens_per_s") or 0) / prev["output_tokens_per_s"] - 1
        worse = [k for k in ("tpot_ms_p99", "ttft_ms_p99") if grew(prev, cur, k)]
        if gain < min_gain and worse:
            return {"index": knee, "load": prev["load"], "rule": "latency",
                    "why": f"{cur['load']}: output tokens/s {gain:+.0%}, {' and '.join(worse)} "
                           f"x{max(cur[k] / prev[k] for k in worse):.1f}"}
    return None


def plot_sweep(rows: Sequence[dict[str, Any]], knee: dict[str, Any] | None, path: Path, title: str) -> None:
    """TTFT and TPOT p50/p99 against the load levels (one panel each), output tokens/s on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("ttft", "tpot")):
        for q, style in ((50, "-o"), (99, "--s")):
            ax.plot(x, [r[f"{name}_ms_p{q}"] or np.nan for r in rows], style, label=f"{name.upper()} p{q}")
        ax.set_yscale("log")
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.set_xticks(list(x), [r["load"] for r in rows], rotation=30, fontsize=8)
        tput = ax.twinx()
        tput.plot(x, [r["output_tokens_per_s"] or np.nan for r in rows], ":^", color="gray", label="output tok/s")
        tput.set_ylabel("output tokens/s")
        if knee is not None:
            ax.axvline(knee["index"], color="red", alpha=0.5, label=f"knee ({knee['rule']})")
        lines = ax.get_legend_handles_labels()
        more = tput.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
