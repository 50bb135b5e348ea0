"""`ferry bench serve`: a sweep of load levels against an OpenAI-compatible server, one row per level, the
throughput knee marked; prints a markdown table, writes JSON + markdown (+ PNG) with provenance."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.bench.load_processes import run_level_processes
from ferry.bench.serve_load import MAX_TOKEN_ID, find_knee, make_workload, plot_sweep, schedule, summarize
from ferry.bench.sse_client import HttpTarget, check_server
from ferry.errors import FerryError

COLUMNS = ["load", "completed", "failed", "request_throughput", "scheduled_rate", "achieved_rate", "output_tokens_per_s",
           "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "itl_ms_p50",
           "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p99", "max_send_lag_ms"]


@dataclass(frozen=True)
class LoadBenchConfig:
    url: str
    requests: int
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    rates: tuple[float, ...] = ()  # open loop, one level each
    concurrencies: tuple[int, ...] = ()  # closed loop, one level each
    model: str | None = None
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 300.0
    warmup: int = 4
    chat: bool = False
    client_processes: int = 1
    tag: str | None = None
    server_device: str | None = None  # what the server runs on: only the person running the bench knows


def parse_levels(text: str, name: str, integer: bool) -> tuple:
    """`1,2,4` or `inf` (rates only) -> a tuple of positive numbers, in the order given."""
    try:
        values = tuple((int if integer else float)(v.strip()) for v in text.split(","))
    except ValueError:
        raise FerryError(f"--{name} {text!r}: give a comma list of {'integers' if integer else 'numbers or inf'}, "
                         "e.g. 1,2,4") from None
    if not values or any(not v > 0 or (isinstance(v, float) and math.isnan(v)) for v in values):
        raise FerryError(f"--{name} {text!r}: every level must be > 0")
    return values


def chat_words() -> list[str]:
    return (Path(__file__).resolve().parents[1] / "data" / "eval_text.txt").read_text().split()


def run_serve_load_bench(cfg: LoadBenchConfig, out_dir: Path, log: Callable[[str], None]) -> str:
    if bool(cfg.rates) == bool(cfg.concurrencies):
        raise FerryError("give --rate (open loop) or --concurrency (closed loop), not both and not neither")
    if cfg.requests < 1 or cfg.client_processes < 1 or cfg.warmup < 0:
        raise FerryError("--requests and --client-processes must be >= 1, --warmup >= 0")
    info = asyncio.run(check_server(cfg.url, cfg.model, cfg.api_key, cfg.chat, min(cfg.timeout_s, 30.0)))
    max_id = min(info.vocab_size, MAX_TOKEN_ID) if info.vocab_size else MAX_TOKEN_ID
    log(f"ferry: {cfg.url} serves {info.model}; prompt ids from 100 to {max_id} ("
        + (f"its vocabulary: {info.vocab_size}" if info.vocab_size else "the server reports no vocab_size; "
           f"assuming at least {MAX_TOKEN_ID}") + ")")
    words = chat_words() if cfg.chat else None
    target = HttpTarget(cfg.url, info.model, cfg.api_key, cfg.timeout_s, cfg.chat)
    workload = make_workload(cfg.requests, cfg.prompt_tokens, cfg.output_tokens, cfg.seed, max_id, words)
    if cfg.warmup:
        warm = make_workload(cfg.warmup, cfg.prompt_tokens, cfg.output_tokens, cfg.seed + 1, max_id, words)
        failed = [r.error for r in run_level_processes(target, warm, None, cfg.warmup, 1, cfg.timeout_s) if not r.ok]
        log(f"ferry: warm-up: {cfg.warmup} requests, {len(failed)} failed" + (f" ({failed[0]})" if failed else ""))
    levels = [(rate, None) for rate in cfg.rates] + [(None, c) for c in cfg.concurrencies]
    rows = []
    for rate, concurrency in levels:
        requests = schedule(workload, rate, cfg.seed) if rate is not None else workload
        results = run_level_processes(target, requests, rate, concurrency, cfg.client_processes, cfg.timeout_s)
        row = summarize(results, rate, concurrency)
        rows.append(row)
        log(f"ferry: {row['load']}: {row['completed']}/{row['requests']} completed in {row['duration_s']:.1f} s, "
            f"{_fmt(row['output_tokens_per_s'])} output tokens/s, max send lag {row['max_send_lag_ms']:.1f} ms")
        for message in row["errors"]:
            log(f"ferry:   error: {message}")
    knee = find_knee(rows)
    return write_outputs(cfg, info.model, rows, knee, out_dir, log)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def write_outputs(cfg: LoadBenchConfig, model: str, rows: list[dict], knee: dict | None, out_dir: Path,
                  log: Callable[[str], None]) -> str:
    import torch

    from ferry.bench.report import provenance, write_results

    meta = provenance(torch.device("cpu"))
    workload = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "url", "model", "tag", "server_device")}
    workload["rates"] = [f"{r:g}" for r in cfg.rates]  # JSON has no infinity
    meta |= {
        "device": cfg.server_device or "not given (--server-device)", "client": meta["device"],
        "url": cfg.url, "model": model, "mode": "open loop (Poisson)" if cfg.rates else "closed loop",
        "workload": workload,
        "knee": knee,
        "max_send_lag_ms": max(r["max_send_lag_ms"] for r in rows),
    }
    stem = f"{meta['date']}_serve_load" + (f"_{cfg.tag}" if cfg.tag else "")
    knee_line = (f"Knee: **{knee['load']}** ({knee['rule']}: {knee['why']})." if knee else
                 "Knee: none (no level met the rules).")
    notes = (f"{knee_line} TTFT/TPOT/ITL/e2e in ms; achieved_rate = completion rate; "
             "max_send_lag_ms = how late sends were against the schedule (a saturated client shows here).")
    json_path, md_path = write_results(out_dir, stem, meta, rows, COLUMNS, notes)
    written = [json_path, md_path]
    try:
        plot_sweep(rows, knee, out_dir / f"{stem}.png", f"{model} at {cfg.url}: {meta['mode']}")
        written.append(out_dir / f"{stem}.png")
    except ImportError:
        log("ferry: matplotlib not installed; no PNG written (pip install 'ferry[bench]')")
    log("ferry: wrote " + ", ".join(map(str, written)))
    from ferry.bench.report import markdown_table

    return markdown_table(rows, COLUMNS) + "\n\n" + knee_line
