"""Where the time of one host->device copy goes: each step the pooled path adds to a raw pinned copy, timed alone.

    python benchmarks/host_copy_anatomy.py [--sizes 4096,65536,1048576,16777216]

Variants are measured round-robin (one rep of each in turn), so drift on a shared machine hits them equally.
Every variant ends with its data on the device and the host waiting for it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.comm.copy_stream import CopyStream  # noqa: E402
from ferry.comm.pinned_pool import PinnedBufferPool  # noqa: E402


def variants(size: int, device: torch.device) -> dict:
    raw = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    pool, copy = PinnedBufferPool(max_bytes=1 << 30), CopyStream(device)
    kept = pool.acquire(size)
    pooled_view = kept.view(size)
    event, compute_done = torch.cuda.Event(), torch.cuda.Event()
    side = torch.cuda.Stream(device)

    def raw_copy():
        dev.copy_(raw, non_blocking=True)
        torch.cuda.synchronize(device)

    def raw_copy_event():
        dev.copy_(raw, non_blocking=True)
        event.record()
        event.synchronize()

    def pool_buffer_raw_copy():
        dev.copy_(pooled_view, non_blocking=True)
        torch.cuda.synchronize(device)

    def pooled_in_order():
        buf = pool.acquire(size)
        fence = copy.copy_in_order(dev, buf.view(size), buf.pinned, buf.event)
        pool.release(buf, fence)
        fence.synchronize()

    def pooled_in_order_wait_then_release():
        buf = pool.acquire(size)
        copy.copy_in_order(dev, buf.view(size), buf.pinned, buf.event).synchronize()
        pool.release(buf)  # waited for: no fence for the next acquire to query

    def side_stream_no_wait():
        with torch.cuda.stream(side):
            dev.copy_(raw, non_blocking=True)
        event.record(side)
        event.synchronize()

    def side_stream_after_compute():
        compute_done.record()
        side.wait_event(compute_done)
        with torch.cuda.stream(side):
            dev.copy_(raw, non_blocking=True)
        event.record(side)
        event.synchronize()

    def pooled_copy_stream():
        buf = pool.acquire(size)
        fence = copy.copy(dev, buf.view(size), buf.pinned, buf.event)
        pool.release(buf, fence)
        fence.synchronize()

    return {"raw_copy": raw_copy, "raw_copy_event": raw_copy_event, "pool_buffer_raw_copy": pool_buffer_raw_copy,
            "pooled_in_order": pooled_in_order, "pooled_in_order_wait_then_release": pooled_in_order_wait_then_release,
            "side_stream_no_wait": side_stream_no_wait,
            "side_stream_after_compute": side_stream_after_compute, "pooled_copy_stream": pooled_copy_stream}


def measure(size: int, device: torch.device, reps: int) -> list[dict]:
    fns = variants(size, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    base = statistics.median(samples["raw_copy"])
    return [{"bytes": size, "variant": name, "us": round(statistics.median(s) * 1e6, 2),
             "vs_raw": round(statistics.median(s) / base, 3)} for name, s in samples.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,65536,1048576,16777216")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += measure(size, device, reps=200 if size <= 1 << 20 else 40)
    meta = provenance(device)
    json_path, md_path = write_results(args.out, f"{meta['date']}_host_copy_anatomy", meta, rows,
                                       ["bytes", "variant", "us", "vs_raw"])
    print(md_path.read_text())


if __name__ == "__main__":
    main()
