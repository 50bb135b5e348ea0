"""`ferry bench host`: the PCIe link measured the ways Ferry uses it.

H2D and D2H bandwidth by size for pageable memory, pinning per call, and the pooled pinned buffers; 64 small
copies against one packed upload; and whether a copy on the copy stream overlaps a matmul. Without a CUDA
device there is no host<->device link: it says so and measures host memory copies and packing instead.
"""

from __future__ import annotations

import statistics
import time

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBufferPool
from ferry.comm.step_packer import PackedLayout, StepPacker

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30]


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn` (synchronised), after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth_rows(device: torch.device, sizes: list[int]) -> list[dict]:
    rows = []
    pool = PinnedBufferPool(max_bytes=3 << 30)
    # Without a CUDA driver the pool's buffers are ordinary memory: the rows say so rather than "pinned".
    pooled_mode = "pooled pinned" if pool.pin else "pooled (pageable, no GPU to pin for)"
    copy = CopyStream(device)
    for size in sizes:
        reps = 20 if size <= 16 << 20 else 3
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        pageable = torch.empty(size, dtype=torch.uint8)
        buf = pool.acquire(size)
        pooled = buf.tensor[:size]

        def fence_wait(fence) -> None:
            fence.synchronize()

        cases = {
            ("h2d", "pageable"): lambda: dev.copy_(pageable),
            ("h2d", "pin per call"): lambda: dev.copy_(pageable.pin_memory(), non_blocking=True),
            ("h2d", pooled_mode): lambda: fence_wait(copy.copy(dev, pooled)),
            ("d2h", "pageable"): lambda: pageable.copy_(dev),
            ("d2h", pooled_mode): lambda: fence_wait(copy.copy(pooled, dev)),
        }
        if device.type != "cuda":
            del cases[("h2d", "pin per call")]  # nothing can be pinned without a CUDA driver
        for (direction, mode), fn in cases.items():
            reps_here = 2 if mode == "pin per call" and size > 256 << 20 else reps
            seconds = _timed(fn, device, reps_here)
            rows.append({"test": "bandwidth", "direction": direction, "mode": mode, "bytes": size,
                         "us": round(seconds * 1e6, 1), "GBps": round(size / seconds / 1e9, 2)})
        pool.release(buf)
    return rows


def small_vs_packed(device: torch.device, count: int = 64, each: int = 4096) -> list[dict]:
    pool = PinnedBufferPool(max_bytes=64 << 20)
    copy = CopyStream(device)
    packer = StepPacker(device, pool, copy)
    hosts = [torch.empty(each, dtype=torch.uint8, pin_memory=device.type == "cuda") for _ in range(count)]
    devs = [torch.empty(each, dtype=torch.uint8, device=device) for _ in range(count)]

    def separate():
        for d, h in zip(devs, hosts, strict=True):
            d.copy_(h, non_blocking=True)

    fields = {f"t{i}": h for i, h in enumerate(hosts)}
    # The engine's way: fields declared once, written in place into pinned memory, one copy per step. The
    # values are written before timing here, as the separate copies' host tensors are.
    in_place = PackedLayout(device, copy, {name: (torch.uint8, each) for name in fields})
    for _ in range(2):
        for name, view in in_place.next_host().items():
            view.copy_(fields[name])
        in_place.upload()

    def upload_in_place():
        in_place.next_host()  # includes waiting for that slot's previous copy, as a step does
        in_place.upload()

    t_sep = _timed(separate, device, 50)
    t_cat = _timed(lambda: packer.upload(fields), device, 50)
    t_layout = _timed(upload_in_place, device, 50)
    return [
        {"test": "per-step upload", "mode": f"{count} separate copies", "bytes": count * each, "us": round(t_sep * 1e6, 1)},
        {"test": "per-step upload", "mode": "one copy, fields written in place (engine)", "bytes": count * each,
         "us": round(t_layout * 1e6, 1), "speedup": round(t_sep / t_layout, 1)},
        {"test": "per-step upload", "mode": f"one copy after packing {count} tensors (torch.cat)", "bytes": count * each,
         "us": round(t_cat * 1e6, 1), "speedup": round(t_sep / t_cat, 1)},
    ]


def overlap(device: torch.device) -> list[dict]:
    if device.type != "cuda":
        return []
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    host = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    copy = CopyStream(device)
    t_mm = _timed(lambda: a @ a, device, 10)
    t_copy = _timed(lambda: copy.copy(dev, host).synchronize(), device, 5)

    def both():
        fence = copy.copy(dev, host)
        a @ a
        fence.synchronize()

    t_both = _timed(both, device, 5)
    return [{"test": "copy/compute overlap", "mode": "512 MiB H2D on the copy stream under an 8192^3 bf16 matmul",
             "us": round(t_both * 1e6, 1), "matmul_us": round(t_mm * 1e6, 1), "copy_us": round(t_copy * 1e6, 1),
             "overlap": round((t_mm + t_copy - t_both) / min(t_mm, t_copy), 3)}]


def run_host_bench(device: torch.device, max_size_mb: int, out, log=print) -> str:
    """Run every measurement this machine allows; write JSON, markdown and PNG; return the markdown."""
    from pathlib import Path

    from ferry.bench.report import provenance, write_results

    out = Path(out)
    if device.type != "cuda":
        log("ferry: no CUDA device: there is no host<->device link to measure here. Measuring host memory "
            "copies (the 'device' side is host memory too) and the packing cost instead; pinned memory, "
            "copy-stream overlap and PCIe bandwidth need a GPU.")
    sizes = [s for s in SIZES if s <= max_size_mb << 20]
    rows = bandwidth_rows(device, sizes) + small_vs_packed(device) + overlap(device)
    meta = provenance(device) | {"link": "PCIe host<->device" if device.type == "cuda" else "host memory only (no GPU)"}
    stem = f"{meta['date']}_host_link_{device.type}"
    cols = ["test", "direction", "mode", "bytes", "us", "GBps", "speedup", "overlap"]
    json_path, md_path = write_results(out, stem, meta, rows, cols)
    try:
        plot_bandwidth(rows, out / f"{stem}.png")
    except ImportError:
        log("ferry: matplotlib not installed; no PNG written (pip install 'ferry[bench]')")
    log(f"ferry: wrote {json_path}, {md_path}")
    return md_path.read_text()


def plot_bandwidth(rows: list[dict], path) -> None:
    from ferry.bench.plot import size_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["test"] == "bandwidth":
            series.setdefault(f"{r['direction']} {r['mode']}", []).append((r["bytes"], r["GBps"]))
    size_plot(series, path, "bytes per copy", "GB/s", "Host <-> device copies")


if __name__ == "__main__":  # runnable without the CLI's dependencies: python -m ferry.bench.host_link [cuda]
    import sys

    run_host_bench(torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda"), 1024, "benchmarks/results")
