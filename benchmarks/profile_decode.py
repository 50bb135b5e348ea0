"""Where a decode step's GPU time goes: kernels of one Llama-3-8B-shape decode step, grouped and ranked.

    python benchmarks/profile_decode.py [--compile] [--batch 1] [--context 256]

Runs the step eagerly (compiled or not) under torch.profiler and prints CUDA time per kernel family, so the
gap between a step and its memory roofline can be attributed (matmuls vs attention vs elementwise glue).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.shapes import SHAPES, random_model, weight_bytes_per_token  # noqa: E402
from ferry.engine.kv_cache import KVCache  # noqa: E402


def family(name: str) -> str:
    n = name.lower()
    if "gemv" in n or "gemm" in n or "sm90" in n or "cutlass" in n or "nvjet" in n:
        return "matmul"
    if "fmha" in n or "attention" in n or "flash" in n:
        return "attention"
    if "triton_tem" in n or ("triton" in n and "mm" in n):
        return "matmul (triton template)"
    if "triton" in n:
        return "triton (fused elementwise)"
    return "other: " + name[:60]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = random_model(SHAPES[args.model], device, torch.bfloat16)
    cache = KVCache.for_model(model)
    cache.ensure(args.batch, args.context)
    forward = torch.compile(model, dynamic=False, mode=args.compile_mode) if args.compile else model
    ids = torch.randint(0, 1000, (args.batch, 1), device=device)
    pos = torch.full((args.batch, 1), args.context // 2, device=device)
    with torch.inference_mode():
        for _ in range(3):
            forward(ids, pos, cache.layers, args.context)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                forward(ids, pos, cache.layers, args.context)
            torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.self_device_time_total > 0:
            totals[family(evt.key)] += evt.self_device_time_total / 5
            counts[family(evt.key)] += evt.count // 5
    step_us = sum(totals.values())
    floor_us = weight_bytes_per_token(model) / 2.93e12 * 1e6
    # Time the step as a CUDA graph too: what decode really runs.
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        with torch.cuda.graph(graph):
            forward(ids, pos, cache.layers, args.context)
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
    times.sort()
    print(f"graph replay median {times[len(times) // 2]:.0f} us")
    print(f"{args.model} batch {args.batch} compile={args.compile} mode={args.compile_mode}: kernels sum {step_us:.0f} us/step; "
          f"weight-read floor at 2.93 TB/s {floor_us:.0f} us")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {us:8.1f} us  {counts[name]:5d} kernels  {name}")


if __name__ == "__main__":
    main()
