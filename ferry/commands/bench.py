"""`ferry bench ...`: the benchmarks that ship with the command (each prints a table, writes JSON and a PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import DeviceOpt, DtypeOpt, ModelOpt, VerboseOpt, app, err, run_guarded, setup_logging

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table, write JSON (+ PNG) with provenance.")
app.add_typer(bench_app, name="bench")


@bench_app.command("edge")
def bench_edge(
    split: Annotated[int, typer.Option(help="split point K whose hidden states are encoded")] = 15,
    codecs: Annotated[Optional[str], typer.Option(help="comma list [default: all]")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: Annotated[Path, typer.Option(help="folder for JSON, markdown and PNG")] = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """Hidden-state codecs: bytes per token, encode+decode time, quality against fp32."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.edge_codecs import DEFAULT_CODECS, codec_table, plot
        from ferry.bench.report import provenance, write_results
        from ferry.device import resolve_device, resolve_dtype
        from ferry.model.loader import load_model

        dev = resolve_device(device or "cpu")
        loaded = load_model(model, dev, resolve_dtype(dtype, dev), show_progress=True)
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
    out: Annotated[Path, typer.Option(help="folder for JSON, markdown and PNG")] = Path("benchmarks/results"),
    verbose: VerboseOpt = False,
) -> None:
    """Host <-> device copies: bandwidth by size and memory kind, packed vs separate uploads, overlap."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.bench.host_link import SIZES, bandwidth_rows, overlap, small_vs_packed
        from ferry.bench.report import provenance, write_results
        from ferry.device import resolve_device

        dev = resolve_device(device)
        if dev.type != "cuda":
            err("ferry: no CUDA device: there is no host<->device link to measure here. Measuring host memory "
                "copies (the 'device' side is host memory too) and the packing cost instead; pinned memory, "
                "copy-stream overlap and PCIe bandwidth need a GPU.")
        sizes = [s for s in SIZES if s <= max_size_mb << 20]
        rows = bandwidth_rows(dev, sizes) + small_vs_packed(dev) + overlap(dev)
        meta = provenance(dev) | {"link": "PCIe host<->device" if dev.type == "cuda" else "host memory only (no GPU)"}
        stem = f"{meta['date']}_host_link_{dev.type}"
        cols = ["test", "direction", "mode", "bytes", "us", "GBps", "speedup", "overlap"]
        json_path, md_path = write_results(out, stem, meta, rows, cols)
        try:
            _plot_bandwidth(rows, out / f"{stem}.png")
        except ImportError:
            err("ferry: matplotlib not installed; no PNG written (pip install 'ferry[bench]')")
        print(md_path.read_text())
        err(f"ferry: wrote {json_path}, {md_path}")

    run_guarded(run)


def _plot_bandwidth(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["test"] == "bandwidth":
            series.setdefault(f"{r['direction']} {r['mode']}", []).append((r["bytes"], r["GBps"]))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per copy")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=8)
    ax.set_title("Host <-> device copies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
