"""`ferry cloud`, `ferry edge`, `ferry linkem`: one model split over a network link."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import (
    ChatOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KvMemoryOpt,
    MaxTokensOpt,
    ModelOpt,
    SeedOpt,
    StopOpt,
    StreamOpt,
    StreamPrinter,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
    app,
    completion_json,
    err,
    print_completions,
    run_guarded,
    setup_logging,
    summary_line,
)

SplitOpt = Annotated[int, typer.Option("--split", help="smallest split K served: an edge runs layers 0..K-1, "
                                                      "the cloud K..L-1 and the head")]
def _read(path: Path | None, what: str) -> bytes | None:
    from ferry.errors import FerryError

    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FerryError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


TokenFileOpt = Annotated[Optional[Path], typer.Option(help="file holding the shared token \\[default: $FERRY_TOKEN]")]


class _StopSignal:
    """Set by SIGINT/SIGTERM; installed before a server starts, so no signal finds it unprotected.

    `wait` polls: a process-directed signal may land on a gRPC or torch thread, and Python runs handlers only in
    the main thread between bytecodes, so a main thread parked in an untimed lock wait could sleep through it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._event.set())

    def wait(self) -> None:
        while not self._event.wait(0.25):
            pass


@app.command()
def cloud(
    split: SplitOpt = 1,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on")] = "127.0.0.1:7070",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    token_file: TokenFileOpt = None,
    max_sessions: Annotated[int, typer.Option(help="concurrent edge sessions at most")] = 64,
    max_tokens_per_session: Annotated[int, typer.Option(help="positions a session may reach")] = 8192,
    max_frame_mb: Annotated[float, typer.Option(help="largest frame accepted, MiB")] = 16.0,
    idle_timeout: Annotated[float, typer.Option(help="seconds before an idle session is closed")] = 120.0,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate: serve TLS (with --tls-key)")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key for --tls-cert")] = None,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="run every session's frames together "
                                           "in one forward over a shared paged KV pool (--no-batching: each "
                                           "session alone on its own cache, for comparison)")] = True,
    kv_memory: KvMemoryOpt = None,
    metrics_port: Annotated[int | None, typer.Option(help="also serve Prometheus text at "
                                                        "http://HOST:PORT/metrics (the --listen host): steps, "
                                                        "edge-link bytes and round trips")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve layers K..L-1 and the LM head to edge sessions (Ctrl-C or SIGTERM to stop)."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.device import resolve_device
        from ferry.edge.auth import load_token
        from ferry.edge.cloud import CloudLimits, CloudServer
        from ferry.edge.cloud_batcher import CloudBatching
        from ferry.model.loader import load_model, resolve_precision

        token = load_token(token_file)
        if (tls_cert is None) != (tls_key is None):
            from ferry.errors import FerryError

            raise FerryError("--tls-cert and --tls-key go together")
        tls = (_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate")) if tls_cert else None
        if kv_memory is not None and not batching:
            from ferry.errors import FerryError

            raise FerryError("--kv-memory sizes the batched path's shared pool; --no-batching gives each session "
                             "its own cache")
        if kv_memory is not None:
            from ferry.engine.paged_cache import KVMemory

            KVMemory.parse(kv_memory)  # a typo fails before the model is read
        stopping = _StopSignal()
        dev = resolve_device(device)
        dt, weights = resolve_precision(dtype, "auto", model, dev)
        loaded = load_model(model, dev, dt, show_progress=True, weights=weights)
        limits = CloudLimits(int(max_frame_mb * 1024 * 1024), max_sessions, max_tokens_per_session, idle_timeout)
        server = CloudServer(loaded, split, token, limits, CloudBatching(kv_memory) if batching else None)
        port = server.start(listen, tls)
        host = listen.rpartition(':')[0]
        err(f"ferry: cloud serving splits {split}..{loaded.config.num_layers - 1} of {loaded.path.name} "
            f"on {host}:{port}: {server.path}")
        metrics = None
        if metrics_port is not None:
            from ferry.edge.cloud_metrics import serve_cloud_metrics

            try:
                metrics = serve_cloud_metrics(server, host.strip("[]"), metrics_port)
            except Exception:
                server.stop()
                raise
            err(f"ferry: cloud metrics on http://{host}:{metrics.port}/metrics")
        stopping.wait()
        if metrics is not None:
            metrics.close()
        server.stop()

    run_guarded(run)


@app.command()
def edge(
    prompts: Annotated[list[str], typer.Argument(help="prompts, answered one after another")],
    cloud: Annotated[str, typer.Option("--cloud", help="HOST:PORT of the cloud (comma list: tried in turn); a host "
                                                     "name is resolved only when connecting")],
    split: Annotated[str, typer.Option(help="K: run layers 0..K-1 here (only their weights are read); 'auto': "
                                            "choose K from measurements")] = "auto",
    min_edge_layers: Annotated[int, typer.Option(help="with --split auto: keep at least this many layers here")] = 1,
    codec: Annotated[str, typer.Option(help="fp32, fp16, bf16, int8, int4, each optionally +zstd or +lz4")] = "fp32",
    draft: Annotated[Optional[str], typer.Option(help="speculative rounds with this draft: 'self' (the whole model "
                                                     "here, on this device's fast path: on a CPU the GGUF's blocks "
                                                     "on Ferry's qmatmul), 'int8' (the model with int8 weights) or "
                                                     "a model path with the same tokenizer")] = None,
    gamma_max: Annotated[int, typer.Option(help="most tokens drafted per round")] = 8,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    chat: ChatOpt = False,
    stream: StreamOpt = False,
    as_json: JsonOpt = False,
    token_file: TokenFileOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for any reply")] = 30.0,
    reconnects: Annotated[int, typer.Option(help="reconnect attempts (replaying the history) before giving up; "
                                                 "a refused connection is retried after 0.1, 0.2, 0.4.. s")] = 2,
    fallback: Annotated[Optional[str], typer.Option(help="'local': finish on the edge's own model if the link is "
                                                         "lost (reads the whole model at start, not layers 0..K-1)")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(help="PEM CA certificate: connect with TLS, verifying the cloud")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="CPU: run the edge's layers and the draft one token at a "
                                                             "time through a torch.compile'd step (compiled once per "
                                                             "machine, then seconds a process: worth it for long "
                                                             "answers and drafts, not for one short one)")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run layers 0..K-1 here and the rest on a `ferry cloud`; hidden states cross the link, tokens come back.

    Arguments, the token, the model, split and codec are checked (with the cloud) before any weights are read."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.device import dtype_name, resolve_device, resolve_dtype
        from ferry.edge.auth import load_token
        from ferry.edge.codecs import Codec
        from ferry.edge.edge import EdgeClient, LinkError
        from ferry.edge.protocol import ProtocolError
        from ferry.edge.speculative import Drafter
        from ferry.edge.split_planner import format_table
        from ferry.engine.sampling import SamplingParams
        from ferry.errors import FerryError
        from ferry.model.loader import load_model, open_partial, resolve_precision

        # Everything that can be checked here is, before the link and the weights: a typo costs milliseconds.
        token = load_token(token_file)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        if split != "auto" and not split.isdigit():
            raise FerryError(f"--split must be a layer count or 'auto', got {split!r}")
        Codec.parse(codec)
        if draft not in (None, "int8", "self") and not Path(draft).exists():
            raise FerryError(f"--draft {draft!r}: no such model path (or 'self', 'int8')")
        ca = _read(tls_ca, "TLS CA certificate")
        dev = resolve_device(device)
        dt, weights = resolve_precision(dtype, "auto", model, dev)
        loaded = open_partial(model, dev, dt, weights)
        client = EdgeClient(loaded, [c.strip() for c in cloud.split(",") if c.strip()],
                            None if split == "auto" else int(split), token, codec=codec, timeout_s=timeout,
                            reconnects=reconnects, fallback=fallback, gamma_max=gamma_max,
                            min_edge_layers=min_edge_layers, tls_ca=ca, compile=compile)
        encoded = [loaded.tokenizer.encode_chat(p) if chat else loaded.tokenizer.encode(p) for p in prompts]
        for ids in encoded:
            client.check_request(ids, params, drafting=draft is not None)
        out = sys.stderr if as_json else sys.stdout
        printer = StreamPrinter(out, len(prompts)) if stream else None
        results = []
        try:
            try:
                client.connect()  # HELLO: the cloud checks the token, model, split and codec; then weights are read
            except (LinkError, ProtocolError) as exc:
                if fallback != "local":
                    raise
                err(f"ferry: no session with the cloud ({exc}); --fallback local answers here")
            if draft == "int8":
                client.use_drafter(Drafter(load_model(model, dev, resolve_dtype("bf16", dev), show_progress=False,
                                                      weights="int8"), compile=compile))
            elif draft:  # 'self' or a path: on this device's default path (on a CPU, GGUF blocks on qmatmul)
                path = model if draft == "self" else Path(draft)
                draft_dtype, draft_weights = resolve_precision(dtype, "auto", path, dev)
                client.use_drafter(Drafter(load_model(path, dev, draft_dtype, show_progress=False,
                                                      weights=draft_weights), compile=compile))
            for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
                on_token = (lambda _tok, text, i=i: printer.write(i, text)) if printer else None
                results.append(client.generate(ids, params, on_token=on_token))
        finally:
            client.close()
        if printer:
            printer.close()
        if verbose and client.split_table:
            err("ferry: --split auto predictions (best first was chosen):\n" + format_table(client.split_table))
        completions = [c for c, _ in results]
        if as_json:
            doc = {
                "model": str(loaded.path), "device": str(dev), "dtype": dtype_name(dt),
                "split": client.split, "codec": client.codec.name, "draft": draft,
                "weights_read": "whole model" if not loaded.partial else f"layers 0..{loaded.layers_read - 1}",
                "completions": [
                    completion_json(p, c, link=stats.as_dict(len(c.token_ids)))
                    for p, (c, stats) in zip(prompts, results, strict=True)
                ],
            }
            print(json.dumps(doc), flush=True)
            return
        if not stream:
            print_completions(completions)
        sent = sum(s.bytes_sent for _, s in results)
        tokens = sum(len(c.token_ids) for c in completions)
        err(f"{summary_line(completions)}; link: {sent / max(tokens, 1):.0f} bytes sent per token, "
            f"{sum(s.round_trips for _, s in results)} round trips")

    run_guarded(run)


@app.command()
def linkem(
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept on")],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT to forward to")],
    rtt: Annotated[str, typer.Option(help="round-trip time added, e.g. 50ms")] = "0ms",
    jitter: Annotated[str, typer.Option(help="+- per-chunk one-way jitter, e.g. 5ms")] = "0ms",
    rate: Annotated[Optional[str], typer.Option(help="bandwidth cap per direction, e.g. 20mbit")] = None,
    reset_prob: Annotated[float, typer.Option(help="probability per chunk of resetting the connection")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Emulate a slow link: a TCP proxy adding delay, jitter, a bandwidth cap and resets."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.edge.linkem import LinkEmulator, LinkProfile, parse_address, parse_duration, parse_rate

        profile = LinkProfile(parse_duration(rtt), parse_duration(jitter), parse_rate(rate) if rate else 0.0,
                              reset_prob, seed)
        emulator = LinkEmulator(parse_address(listen), parse_address(to), profile)
        stopping = _StopSignal()
        port = emulator.start_in_thread()
        err(f"ferry: link emulator {listen.rpartition(':')[0]}:{port} -> {to} "
            f"(rtt {rtt}, jitter {jitter}, rate {rate or 'unlimited'}, reset_prob {reset_prob})")
        stopping.wait()
        emulator.stop()

    run_guarded(run)
