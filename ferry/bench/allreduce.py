"""`ferry bench allreduce`: an nccl-tests-style table for every all-reduce path, eager and inside a CUDA graph.

Per size and path: time per all-reduce (median of trials, max over ranks), algbw = bytes / time and
busbw = algbw * 2 (n - 1) / n (the per-link traffic a ring would need, nccl-tests' convention), plus which path
Ferry's calibrated engine picks and its ratio to NCCL in-graph. On CPU the gloo process group and host shared
memory run (the latter up to its slot size); the table says what could not be measured and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ferry.comm.group import ParallelGroup

SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20, 64 << 20]


def measure_on_ranks(group: ParallelGroup, sizes: list[int], dtype_name: str, device_type: str) -> dict:
    """Spawn target: every rank runs every measurement; rank 0's return value holds the table."""
    from ferry.comm.allreduce_engine import AllReduceEngine, choose, time_in_graph
    from ferry.comm.allreduce_paths import available_paths
    from ferry.parallel.launch import rank_device

    device = rank_device(group.rank, device_type)  # init_group already shared the host's cores among the ranks
    dtype = getattr(torch, dtype_name)
    paths, skipped = available_paths(group.process_group, device, dtype, max(sizes))
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    rows, graph_times = [], {}
    for size in sizes:
        x = torch.ones(size // dtype.itemsize, dtype=dtype, device=device)
        for path in paths:
            if not path.fits(x):  # a message larger than the path's buffer: the engine sends it elsewhere
                continue
            for mode in modes:
                if mode == "graph":
                    us = time_in_graph(path, x, repeats=20, trials=7)
                else:
                    us = _time_eager_synced(path, x, group, device)
                us = round(group.max_over_ranks(us, device), 2)
                if mode == "graph":
                    graph_times.setdefault(size, {})[path.name] = us
                rows.append(_row(size, path.name, mode, us, group.world_size))
        # the sum must be right on every path, not only fast: 1 from each rank
        for path in (p for p in paths if p.fits(x)):
            y = path.reduce(torch.ones(size // dtype.itemsize, dtype=dtype, device=device))
            if not bool((y == group.world_size).all()):
                raise RuntimeError(f"{path.name} summed {size} bytes wrongly on rank {group.rank}")
    plan = choose(graph_times) if graph_times else None
    if plan:
        for row in rows:
            pick = next(p for p in plan if p.max_bytes == row["bytes"])
            row["ferry_pick"] = pick.path
            if row["mode"] == "graph" and row["path"] == pick.path:
                row["vs_nccl_graph"] = round(row["us"] / graph_times[row["bytes"]]["process_group"], 3)
    engine_desc = AllReduceEngine(paths, plan or [], skipped).describe() if plan else ""
    return {"rows": rows, "skipped": skipped, "plan": engine_desc,
            "backend": torch.distributed.get_backend(group.process_group)}


def _time_eager_synced(path, x, group, device) -> float:
    """Eager: one call including its launch, the way a non-graph decode step pays it."""
    if device.type != "cuda":  # nothing to synchronize: back-to-back calls, as the engine's calibration times them
        from ferry.comm.allreduce_engine import time_eager

        return time_eager(path, x, repeats=5, trials=5, process_group=group.process_group)
    import statistics
    import time

    path.reduce(x)
    torch.cuda.synchronize()
    samples = []
    for _ in range(20):
        torch.distributed.barrier(group=group.process_group)
        torch.cuda.synchronize()
        started = time.perf_counter()
        path.reduce(x)
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def _row(size: int, path: str, mode: str, us: float, world: int) -> dict:
    algbw = size / (us * 1e-6) / 1e9
    return {"bytes": size, "path": path, "mode": mode, "us": us, "algbw_GBps": round(algbw, 2),
            "busbw_GBps": round(algbw * 2 * (world - 1) / world, 2)}


def run_allreduce_bench(device_type: str, ranks: int, max_size_mb: int, dtype_name: str, out, log=print) -> str:
    from ferry.bench.report import provenance, write_results
    from ferry.parallel.launch import keep_multicast_off, spawn

    out = Path(out)
    keep_multicast_off()
    sizes = [s for s in SIZES if s <= max_size_mb << 20]
    result = spawn(ranks, device_type, measure_on_ranks, (sizes, dtype_name, device_type))
    notes = []
    if device_type != "cuda":
        notes.append("No CUDA devices: the gloo process group and host shared memory (messages up to its slot "
                     "size; Ferry sends those that way, larger ones over gloo) were measured, eagerly. In-graph "
                     "times, NCCL and symmetric memory need GPUs.")
    notes += [f"{name}: not measured ({why})" for name, why in result["skipped"].items()]
    if result["plan"]:
        notes.append("Ferry's calibrated choice per size:\n\n```\n" + result["plan"] + "\n```")
    for n in notes:
        log(f"ferry: {n.splitlines()[0]}")
    meta = provenance(torch.device(device_type)) | {"ranks": ranks, "dtype": dtype_name, "backend": result["backend"],
                                                    "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"]}
    stem = f"{meta['date']}_allreduce_{device_type}_w{ranks}"
    cols = ["bytes", "path", "mode", "us", "algbw_GBps", "busbw_GBps", "ferry_pick", "vs_nccl_graph"]
    json_path, md_path = write_results(out, stem, meta | {"skipped": result["skipped"]}, result["rows"], cols,
                                       notes="\n\n".join(notes))
    try:
        plot(result["rows"], out / f"{stem}.png", ranks)
    except ImportError:
        log("ferry: matplotlib not installed; no PNG written (pip install 'ferry[bench]')")
    log(f"ferry: wrote {json_path}, {md_path}")
    return md_path.read_text()


def plot(rows: list[dict], path, ranks: int) -> None:
    from ferry.bench.plot import size_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['path']} ({r['mode']})", []).append((r["bytes"], r["us"]))
    size_plot(series, path, "message bytes", "us per all-reduce", f"All-reduce, {ranks} ranks", log_y=True)


if __name__ == "__main__":  # without the CLI's dependencies: python -m ferry.bench.allreduce cuda 2
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    print(run_allreduce_bench(kind, world, 64, "bfloat16" if kind == "cuda" else "float32", "benchmarks/results"))
