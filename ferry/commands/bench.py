"""`ferry bench ...`: the benchmarks that ship with the command (each prints a table, writes JSON and a PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import (
    DeviceOpt,
    DtypeOpt,
    FerryTyper,
    ModelOpt,
    VerboseOpt,
    app,
    err,
    run_guarded,
    setup_logging,
)

OutOpt = Annotated[Path, typer.Option(help="folder for JSON, markdown and PNG")]
bench_app = FerryTyper(no_args_is_help=True, help="Benchmarks: print a table, write JSON (+ PNG) with provenance.")
app.add_typer(bench_app, name="bench")


@bench_app.command("edge")
def bench_edge(
    split: Annotated[int, typer.Option(help="split point K whose hidden states are encoded")] = 15,
    codecs: Annotated[Optional[str], typer.Option(help="comma list \\[default: all]")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """Hidden-state codecs: bytes per token, encode+decode time, quality against fp32."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.edge_codecs import DEFAULT_CODECS, codec_table, plot
        from ferry.bench.report import provenance, write_results
        from ferry.device import resolve_device
        from ferry.model.loader import load_model, resolve_precision

        dev = resolve_device(device or "cpu")
        dt, weights = resolve_precision(dtype, "auto", model, dev)
        loaded = load_model(model, dev, dt, show_progress=True, weights=weights)
        names = [c.strip() for c in codecs.split(",")] if codecs else DEFAULT_CODECS
        rows = codec_table(loaded, split, names)
        meta = provenance(dev) | {"model": loaded.path.name, "split": split, "text": "ferry/data/eval_text.txt"}
        stem = f"{meta['date']}_edge_codecs"
        cols = ["codec", "bytes_per_token", "bytes_vs_fp32", "encode_decode_us", "top1_agreement", "max_logit_error",
                "perplexity", "perplexity_change"]
        json_path, md_path = write_results(out, stem, meta, rows, cols)
        try:
            plot(rows, out / f"{stem}.png")
        except ImportError:
            err("ferry: matplotlib not installed; no PNG written (pip install 'ferry[bench]')")
        print(md_path.read_text())
        err(f"ferry: wrote {json_path}, {md_path}")

    run_guarded(run)


@bench_app.command("host")
def bench_host(
    device: DeviceOpt = None,
    max_size_mb: Annotated[int, typer.Option(help="largest copy, MiB")] = 1024,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """Host <-> device copies: bandwidth by size and memory kind, packed vs separate uploads, overlap."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.host_link import run_host_bench
        from ferry.device import resolve_device

        print(run_host_bench(resolve_device(device), max_size_mb, out, log=err))

    run_guarded(run)


@bench_app.command("allreduce")
def bench_allreduce(
    ranks: Annotated[int, typer.Option(help="ranks (one per GPU; gloo processes on CPU)")] = 2,
    device: DeviceOpt = None,
    max_size_mb: Annotated[int, typer.Option(help="largest message, MiB")] = 64,
    dtype: DtypeOpt = None,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """All-reduce per path (NCCL/gloo, symm-mem one-/two-shot, Ferry's one-shot), eager and in-graph."""
    setup_logging(verbose)

    def run() -> None:
        import torch

        from ferry.bench.allreduce import run_allreduce_bench
        from ferry.device import resolve_device
        from ferry.parallel.layout import check_device_count

        dev = resolve_device(device)
        check_device_count(dev.type, ranks, torch.cuda.device_count() if dev.type == "cuda" else 0)
        dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        print(run_allreduce_bench(dev.type, ranks, max_size_mb, dtype_name, out, log=err))

    run_guarded(run)


@bench_app.command("serve-core")
def bench_serve_core(
    model: ModelOpt = None,
    shape: Annotated[Optional[str], typer.Option(help="random weights of a real architecture's shape instead of "
                                                      "--model: llama3-8b, llama3-70b")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    requests: Annotated[int, typer.Option(help="requests in the offline workload")] = 64,
    concurrency: Annotated[int, typer.Option(help="sequences at once (static: the batch size)")] = 16,
    prompt_lens: Annotated[str, typer.Option(help="prompt lengths LO:HI, uniform")] = "16:128",
    output_lens: Annotated[str, typer.Option(help="output lengths LO:HI, log-uniform")] = "16:512",
    prefix: Annotated[int, typer.Option(help="shared-prefix length for the time-to-first-token test")] = 2000,
    kv_memory: Annotated[Optional[str], typer.Option(help="KV cache: a fraction of free GPU memory or a size "
                                                          "(6GiB); leave room for the static engine's dense cache")] = None,
    parts: Annotated[str, typer.Option(help="comma list of continuous, roofline, batch1, prefix")] =
        "continuous,roofline,batch1,prefix",
    compile: Annotated[bool, typer.Option("--compile", help="compile the serving engine's decode step (one compile "
                                                            "per batch bucket: use with the roofline part)")] = False,
    rounds: Annotated[int, typer.Option(help="continuous part: rounds of both engines, alternated; the table "
                                             "shows each engine's median round")] = 1,
    out: OutOpt = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """The serving core: continuous vs static batching, decode vs roofline, paged vs dense at batch 1, prefix reuse."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.serve_core import run_serve_core_bench
        from ferry.device import resolve_device, resolve_dtype
        from ferry.errors import FerryError

        def span(text: str, name: str) -> tuple[int, int]:
            try:
                lo, hi = (int(x) for x in text.split(":"))
            except ValueError:
                raise FerryError(f"--{name} {text!r}: give LO:HI, e.g. 16:512") from None
            if not 0 < lo <= hi:
                raise FerryError(f"--{name} {text!r}: need 0 < LO <= HI")
            return lo, hi

        if rounds < 1:
            raise FerryError(f"--rounds must be 1 or more, got {rounds}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if shape:
            from ferry.bench.shapes import SHAPES, random_model

            if shape not in SHAPES:
                raise FerryError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
            loaded_model, label = random_model(SHAPES[shape], dev, dt), shape
        else:
            from ferry.model.loader import load_model, resolve_precision

            dt, weights = resolve_precision(dtype, "auto", model, dev)
            loaded = load_model(model, dev, dt, show_progress=True, weights=weights)
            loaded_model, label = loaded.model, loaded.path.stem.split(".")[0]
        print(run_serve_core_bench(loaded_model, None, f"{label}_{dev.type}", requests, concurrency,
                                   span(prompt_lens, "prompt-lens"), span(output_lens, "output-lens"), prefix,
                                   kv_memory, [p.strip() for p in parts.split(",")], out, log=err,
                                   compile=compile, rounds=rounds))

    run_guarded(run)


from ferry.commands import bench_serve as _bench_serve  # noqa: F401  (registers `bench serve`)
