"""`ferry bench serve`: load an OpenAI-compatible server (open or closed loop) and report latency against load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import VerboseOpt, err, run_guarded, setup_logging
from ferry.commands.bench import OutOpt, bench_app


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    model: Annotated[Optional[str], typer.Option(help="model id \\[default: the first from GET /v1/models]")] = None,
    rate: Annotated[Optional[str], typer.Option(help="open loop: requests/s, Poisson arrivals; a comma list sweeps "
                                                     "(1,2,4,8,inf); inf sends all at once")] = None,
    concurrency: Annotated[Optional[str], typer.Option(help="closed loop: requests kept in flight; a comma list "
                                                            "sweeps (1,8,32,64)")] = None,
    requests: Annotated[int, typer.Option(help="requests per load level")] = 200,
    prompt_tokens: Annotated[str, typer.Option(help="prompt length LO-HI (uniform) or one length")] = "128-512",
    output_tokens: Annotated[str, typer.Option(help="output length LO-HI (uniform) or one length; sent as "
                                                    "max_tokens with ignore_eos")] = "128-512",
    seed: Annotated[int, typer.Option(help="seeds prompts, lengths and arrival times")] = 0,
    api_key: Annotated[Optional[str], typer.Option(help="Bearer key \\[default: $FERRY_API_KEY]",
                                                   show_default=False)] = None,
    timeout_s: Annotated[float, typer.Option(help="per request, seconds")] = 300.0,
    warmup: Annotated[int, typer.Option(help="requests sent (not measured) before the first level")] = 4,
    chat: Annotated[bool, typer.Option("--chat", help="POST /v1/chat/completions with text messages instead of "
                                                      "/v1/completions with token ids")] = False,
    client_processes: Annotated[int, typer.Option(help="split each level over this many client processes "
                                                       "(when one event loop falls behind: see max_send_lag_ms)")] = 1,
    server_device: Annotated[Optional[str], typer.Option(help="what the server runs on, for the result file "
                                                              "(e.g. '1x H200')")] = None,
    tag: Annotated[Optional[str], typer.Option(help="appended to the result file names")] = None,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """Load a running OpenAI-compatible server: TTFT, TPOT, ITL, throughput per load level, the knee marked."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.serve_load import parse_span
        from ferry.bench.serve_load_bench import LoadBenchConfig, parse_levels, run_serve_load_bench

        cfg = LoadBenchConfig(
            url=url, requests=requests, prompt_tokens=parse_span(prompt_tokens, "prompt-tokens"),
            output_tokens=parse_span(output_tokens, "output-tokens"),
            rates=parse_levels(rate, "rate", integer=False) if rate else (),
            concurrencies=parse_levels(concurrency, "concurrency", integer=True) if concurrency else (),
            model=model, api_key=api_key or os.environ.get("FERRY_API_KEY") or None, seed=seed,
            timeout_s=timeout_s, warmup=warmup, chat=chat, client_processes=client_processes, tag=tag,
            server_device=server_device)
        print(run_serve_load_bench(cfg, out, log=err))

    run_guarded(run)
