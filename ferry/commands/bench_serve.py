"""`ferry bench serve`: load an OpenAI-compatible server (open or closed loop) and report latency against load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import DeviceOpt, ModelOpt, VerboseOpt, err, run_guarded, setup_logging
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


@bench_app.command("serve-overhead")
def bench_serve_overhead(
    model: ModelOpt = None,
    shape: Annotated[Optional[str], typer.Option(help="random-weight architecture instead (llama3-8b, tiny)")] = None,
    device: DeviceOpt = None,
    kv_memory: Annotated[str, typer.Option(help="each engine's KV cache (both run side by side)")] = "12GiB",
    concurrency: Annotated[int, typer.Option(help="streams in flight (closed loop)")] = 64,
    requests: Annotated[int, typer.Option(help="requests per level")] = 192,
    prompt_tokens: Annotated[str, typer.Option(help="prompt length LO-HI")] = "128-512",
    output_tokens: Annotated[str, typer.Option(help="output length LO-HI (ignore_eos)")] = "128-512",
    rounds: Annotated[int, typer.Option(help="counted direct/http pairs, new prompts each, order alternated; "
                                             "medians reported")] = 8,
    warmup_rounds: Annotated[int, typer.Option(help="uncounted pairs of the full workload first")] = 1,
    time_budget_s: Annotated[float | None, typer.Option(help="start no round that would likely end past this "
                                                                "many seconds of comparing (rounds run are "
                                                                "reported)")] = None,
    rates: Annotated[Optional[str], typer.Option(help="then an open-loop sweep against the same server, e.g. "
                                                      "2,4,8,16,inf (written as its own `serve_load` result)")] = None,
    sweep_requests: Annotated[int, typer.Option(help="requests per sweep level")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    tag: Annotated[Optional[str], typer.Option(help="appended to the result file names")] = None,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """The HTTP layer's cost: TPOT/TTFT of one workload through the engine directly vs through `ferry serve`."""
    setup_logging(verbose)

    def run() -> None:
        import asyncio

        from ferry.bench.report import provenance, write_results
        from ferry.bench.serve_load import MAX_TOKEN_ID, parse_span
        from ferry.bench.serve_overhead import run as compare
        from ferry.bench.sse_client import check_server
        from ferry.device import resolve_device
        from ferry.model.loader import resolve_model_path
        from ferry.parallel.workers import WorkerSpec
        from ferry.serve.process import ServerProcess

        prompt_span = parse_span(prompt_tokens, "prompt-tokens")
        output_span = parse_span(output_tokens, "output-tokens")
        dev = resolve_device(device)
        path = None if shape else str(resolve_model_path(model))
        # compile None: the engine default, as `ferry serve` builds its engine (the compiled step on a CPU)
        spec = WorkerSpec(path or "", dev.type, None, {"kv_memory": kv_memory, "compile": None}, shape=shape)
        args = ["--device", dev.type, "--kv-memory", kv_memory] + (["--shape", shape] if shape else ["--model", path])
        server = ServerProcess(args)
        try:
            name = shape or Path(path).stem
            info = asyncio.run(check_server(server.url, None, None, timeout_s=30.0))
            result = compare(spec, server.url, info.model, concurrency=concurrency, requests=requests,
                             prompt_tokens=prompt_span, output_tokens=output_span, rounds=rounds, seed=seed,
                             max_token_id=min(info.vocab_size or MAX_TOKEN_ID, MAX_TOKEN_ID), log=err,
                             warmup_rounds=warmup_rounds, time_budget_s=time_budget_s)
            meta = provenance(dev) | {
                "model": name, "concurrency": concurrency, "requests": requests, "prompt_tokens": prompt_tokens,
                "output_tokens": output_tokens, "rounds": rounds, "rounds_counted": result["rounds_counted"],
                "warmup_rounds": warmup_rounds, "kv_memory": kv_memory,
                "method": "every round new prompts, the same for both paths; warm-up rounds not counted; order "
                          "alternated; medians over the counted rounds",
                "summary": result["summary"], "server_link_metrics_under_load": result["server_link_metrics_under_load"]}
            stem = f"{meta['date']}_serve_overhead_{name}_{dev.type}" + (f"_{tag}" if tag else "")
            cols = ["path", "round", "completed", "failed", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99",
                    "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99", "graph_steps", "eager_steps",
                    "pcie_h2d_seconds", "pcie_d2h_seconds"]
            s = result["summary"]
            links = "\n".join(line for line in result["server_link_metrics_under_load"]
                              if not line.startswith("# TYPE"))
            notes = (f"HTTP / direct over {result['rounds_counted']} counted rounds (round < 0: warm-up, not "
                     f"counted), medians of each path: TPOT p50 {s['tpot_ms_p50']['http_over_direct']:.3f}x, "
                     f"p99 {s['tpot_ms_p99']['http_over_direct']:.3f}x; ITL p50 "
                     f"{s['itl_ms_p50']['http_over_direct']:.3f}x; output tokens/s "
                     f"{s['output_tokens_per_s']['http_over_direct']:.3f}x. Median of the rounds' own ratios: TPOT "
                     f"p50 {s['tpot_ms_p50']['paired_median']:.3f}x, p99 {s['tpot_ms_p99']['paired_median']:.3f}x. "
                     "eager_steps: steps that carried a prefill (not a CUDA graph).\n\nThe server's /metrics "
                     f"link lines, read during the last counted HTTP round:\n\n```\n{links}\n```")
            json_path, md_path = write_results(out, stem, meta, result["rows"], cols, notes)
            print(md_path.read_text())
            err(f"ferry: wrote {json_path}, {md_path}")
            if rates:
                from ferry.bench.serve_load_bench import LoadBenchConfig, parse_levels, run_serve_load_bench

                cfg = LoadBenchConfig(url=server.url, requests=sweep_requests, prompt_tokens=prompt_span,
                                      output_tokens=output_span,
                                      rates=parse_levels(rates, "rate", integer=False), seed=seed,
                                      tag=f"{name}_{dev.type}" + (f"_{tag}" if tag else ""),
                                      server_device=provenance(dev)["device"])
                print(run_serve_load_bench(cfg, out, log=err))
        finally:
            code = server.stop()
            err(f"ferry: server exited with {code}")

    run_guarded(run)

