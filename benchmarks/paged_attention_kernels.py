"""Which decode attention reads a paged KV cache fastest: the per-call time of each implementation at
Llama-3-8B's attention shape (Hq 32, Hkv 8, D 128, bf16, block 16), against the device's copy bandwidth.

    python benchmarks/paged_attention_kernels.py                       # CUDA: batches 1,16,64 x contexts 512..8192
    python benchmarks/paged_attention_kernels.py --sweep               # plus Triton tile/warp variants
    python benchmarks/paged_attention_kernels.py --device cpu          # Ferry's C++ kernel vs reference vs dense

Paths (every sequence holds `context` tokens in shuffled blocks of one pool):
  triton-split-k  Ferry's Triton kernel through the public op (paged_attention.py), splits chosen from the shapes
  ferry-cpu       Ferry's C++ CPU kernel through the public op (cpu_paged_attention.cpp), where it is built
  gather-sdpa     the reference: k_pool[block_tables] copies each sequence's blocks, then SDPA under a length mask
  dense-sdpa      today's engine: SDPA over a contiguous [batch, max_len, Hkv, D] cache with its boolean mask (the
                  floor a paged kernel is compared with: same bytes, no table)
  flex-paged      FlexAttention over the physical pool with torch's PagedAttention block-mask conversion (compiled)
On CUDA each time is the median over replays of a CUDA graph holding many calls back to back, divided by the
calls; where one call's K/V would fit in L2, the calls cycle over enough copies of the pool that they cannot be
served from L2. GB/s = K+V bytes a call must read / time; `of_copy_bw` divides by the device copy bandwidth
measured in the same run (bytes read + written, as the decode roofline counts it). Every row also reports its
largest difference from the gather-sdpa output. A path that fails records its error instead of a time.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.decode_timing import copy_bandwidth  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.model.layers.paged_attention import (  # noqa: E402
    CPU_KERNEL_PATH,
    decode_attention_path,
    paged_decode_attention,
    reference_decode,
)

LLAMA3_8B = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
TINY = {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}
COLD_BYTES = 256 << 20  # > 5x the H200's 50 MB L2: a graph's calls together read at least this much
MIN_CALLS = 8


def make_inputs(batch: int, context: int, shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """One copy of a case: its own pools and queries (seed), the block tables every copy shares (so one block
    mask serves all copies of the flex path)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bs, hkv, d = shape["block_size"], shape["num_kv_heads"], shape["head_dim"]
    per_seq = math.ceil(context / bs)
    blocks = batch * per_seq
    k_pool = torch.randn(blocks, bs, hkv, d, generator=gen, device=device, dtype=dtype)
    v_pool = torch.randn(blocks, bs, hkv, d, generator=gen, device=device, dtype=dtype)
    order = torch.randperm(blocks, generator=torch.Generator(device=device).manual_seed(0), device=device)
    tables = order.view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, shape["num_q_heads"], d, generator=gen, device=device, dtype=dtype)
    return {"q": q, "k_pool": k_pool, "v_pool": v_pool, "tables": tables, "lens": lens, "scale": d ** -0.5}


def dense_path(x: dict, context: int) -> Callable[[], torch.Tensor]:
    """attention.py's decode: a contiguous cache, K/V as strided [b, Hkv, len, D] views, a boolean mask."""
    batch, hq, d = x["q"].shape
    hkv = x["k_pool"].shape[2]
    k_cache = x["k_pool"][x["tables"].long()].reshape(batch, -1, hkv, d)[:, :context].contiguous()
    v_cache = x["v_pool"][x["tables"].long()].reshape(batch, -1, hkv, d)[:, :context].contiguous()
    keys, values = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    q = x["q"].view(batch, hkv, hq // hkv, d)
    mask = torch.ones(batch, 1, hq // hkv, context, dtype=torch.bool, device=q.device)
    return lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=x["scale"]).view(batch, hq, d)


def flex_block_mask(x: dict):
    """torch's PagedAttention conversion: a logical mask (key < context) mapped through the block tables onto the
    physical pool. Its KV block is the cache block; the query block stays 128 even for one query (flex's decode
    lowering skips every config whose BLOCK_M does not divide the query block)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    batch = x["q"].shape[0]
    blocks, bs = x["k_pool"].shape[:2]
    width = x["tables"].shape[1]
    paged = PagedAttention(blocks, bs, batch, device=str(x["q"].device))
    paged.page_table[:, :width] = x["tables"].long()
    rows = torch.arange(batch, device=x["q"].device)[:, None].expand(batch, width)
    paged.physical_to_logical[rows, x["tables"].long()] = torch.arange(width, device=x["q"].device).expand(batch, width)
    lens = x["lens"]
    logical = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens[b], batch, None, 1, width * bs,
                                device=x["q"].device, BLOCK_SIZE=(128, bs))
    return paged.convert_logical_block_mask(logical, kv_len=lens.long())


def flex_path(x: dict, block_mask) -> Callable[[], torch.Tensor]:
    batch, hq, d = x["q"].shape
    blocks, bs, hkv, _ = x["k_pool"].shape
    # The physical pool as one sequence of batch 1 that every query's block mask indexes into.
    k = x["k_pool"].view(1, blocks * bs, hkv, d).transpose(1, 2)
    v = x["v_pool"].view(1, blocks * bs, hkv, d).transpose(1, 2)
    q = x["q"].view(batch, hq, 1, d)
    compiled = _compiled_flex()
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=x["scale"], enable_gqa=True).view(batch, hq, d)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 64  # one compile per (batch, context) case; the default stops at 8
    return torch.compile(flex_attention, fullgraph=True, dynamic=False)


def paths(x: dict, context: int, device: torch.device, sweep: bool, flex: bool, shared: dict) -> dict[str, Callable]:
    args = (x["q"], x["k_pool"], x["v_pool"], x["tables"], x["lens"], x["scale"])
    out: dict[str, Callable] = {}
    if device.type == "cuda":
        out["triton-split-k"] = lambda: paged_decode_attention(*args)
        if sweep:
            from ferry.model.layers.paged_attention_kernel import paged_decode

            for tile in (32, 64, 128):
                for warps in (4, 8):
                    out[f"triton tile={tile} warps={warps}"] = (
                        lambda t=tile, w=warps: paged_decode(*args, tile=t, num_warps=w))
            for splits in (1, 4, 16, 32):
                out[f"triton splits={splits}"] = lambda n=splits: paged_decode(*args, num_splits=n)
    if device.type == "cpu" and decode_attention_path(device) == CPU_KERNEL_PATH:
        out["ferry-cpu"] = lambda: paged_decode_attention(*args)
    out["gather-sdpa"] = lambda: reference_decode(*args)
    out["dense-sdpa"] = dense_path(x, context)
    if flex and device.type == "cuda":
        def build_flex() -> Callable[[], torch.Tensor]:  # built lazily: its build errors belong to its row
            if "block_mask" not in shared:
                shared["block_mask"] = flex_block_mask(x)
            return flex_path(x, shared["block_mask"])

        out["flex-paged"] = build_flex
    return out


def time_calls(calls: list[Callable], device: torch.device, replays: int) -> float:
    """Microseconds per call. CUDA: one graph of all the calls, median over timed replays; CPU: wall clock."""
    if device.type != "cuda":
        for call in calls:
            call()
        times = []
        for _ in range(replays):
            started = time.perf_counter()
            for call in calls:
                call()
            times.append(time.perf_counter() - started)
        return statistics.median(times) / len(calls) * 1e6
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for call in calls:
            call()  # compiles kernels and warms the allocator outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times) / len(calls)


def measure_case(batch: int, context: int, shape: dict, dtype: torch.dtype, device: torch.device, bandwidth: float,
                 sweep: bool, flex: bool, replays: int) -> list[dict]:
    kv_bytes = 2 * batch * context * shape["num_kv_heads"] * shape["head_dim"] * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(COLD_BYTES / kv_bytes)) if device.type == "cuda" else 1
    inputs = [make_inputs(batch, context, shape, dtype, device, seed=i) for i in range(copies)]
    reference = reference_decode(inputs[0]["q"], inputs[0]["k_pool"], inputs[0]["v_pool"], inputs[0]["tables"],
                                 inputs[0]["lens"], inputs[0]["scale"]).float()
    shared: dict = {}
    per_copy = [paths(x, context, device, sweep, flex, shared) for x in inputs]
    rows = []
    for name in per_copy[0]:
        row = {"path": name, "batch": batch, "context": context, "kv_MiB": round(kv_bytes / 2**20, 1)}
        try:
            fns = [p[name] for p in per_copy]
            if name == "flex-paged":
                fns = [build() for build in fns]
            error = (fns[0]().float() - reference).abs().max().item()
            calls = [fns[i % copies] for i in range(max(MIN_CALLS, copies))] if device.type == "cuda" else fns
            us = time_calls(calls, device, replays)
            gbps = kv_bytes / (us * 1e-6) / 1e9
            row.update(us=round(us, 2), GBps=round(gbps, 3), of_copy_bw=round(gbps * 1e9 / bandwidth, 4),
                       max_abs_err=error)
        except Exception as exc:  # noqa: BLE001 - recorded per row: one path failing must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if device.type == "cuda":
        from ferry.model.layers.paged_attention_kernel import choose_num_splits

        splits = choose_num_splits(batch, shape["num_kv_heads"], inputs[0]["tables"].shape[1] * shape["block_size"],
                                   device)
        for row in rows:
            if row["path"] == "triton-split-k":
                row["splits"] = splits
    del inputs, per_copy
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="default 1,16,64 on CUDA, 1,4 on CPU")
    ap.add_argument("--contexts", default=None, help="default 512,2048,8192 on CUDA, 64,256 on CPU")
    ap.add_argument("--sweep", action="store_true", help="also time Triton tile/warp variants")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles once per shape)")
    ap.add_argument("--replays", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape, dtype = (LLAMA3_8B, torch.bfloat16) if cuda else (TINY, torch.float32)
    batches = [int(b) for b in (args.batches or ("1,16,64" if cuda else "1,4")).split(",")]
    contexts = [int(c) for c in (args.contexts or ("512,2048,8192" if cuda else "64,256")).split(",")]
    bandwidth = copy_bandwidth(device)
    print(f"device {device}: decode path {decode_attention_path(device)}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for batch in batches:
        for context in contexts:
            rows += measure_case(batch, context, shape, dtype, device, bandwidth, args.sweep, not args.no_flex,
                                 args.replays or (20 if cuda else 3))
    meta = {**provenance(device), "shape": shape, "dtype": str(dtype).removeprefix("torch."),
            "decode_path": decode_attention_path(device), "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
            "cold_bytes_per_graph": COLD_BYTES if cuda else None}
    columns = ["path", "batch", "context", "kv_MiB", "us", "GBps", "of_copy_bw", "max_abs_err", "splits", "error"]
    notes = ("GBps: K+V bytes one call must read / its time. of_copy_bw: that over the copy bandwidth measured in "
             f"this run ({bandwidth / 1e9:.0f} GB/s, read + write). max_abs_err: against gather-sdpa's output.")
    stem = f"{meta['date']}_paged_attention_{device.type}" + ("_sweep" if args.sweep else "")
    json_path, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
