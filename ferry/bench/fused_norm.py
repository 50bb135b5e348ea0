"""The fused all-reduce + residual add + RMSNorm against the unfused ways of doing the same step, in CUDA graphs.

Per size (rows of `width` bf16 columns, decode's hidden states), microseconds per step, max over ranks:
  - nccl + torch ops: NCCL's all-reduce, then the residual add and RMSNorm as torch ops (what a layer ran before
    Ferry fused anything);
  - nccl + kernel: NCCL's all-reduce, then Ferry's one add+RMSNorm kernel;
  - best + kernel: the all-reduce path Ferry's engine picks for that size, then the add+RMSNorm kernel (what Ferry
    runs when the fusion is off);
  - fused: the one-kernel Lamport all-reduce + add + RMSNorm.
Each size also checks the fused result against the unfused one (the residual bit for bit; the normed output
within one bf16 rounding, bitwise equality reported) and that every rank holds the same bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ferry.comm.group import ParallelGroup

SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20]


def measure_on_ranks(group: ParallelGroup, sizes: list[int], width: int) -> dict:
    import torch.distributed as dist

    from ferry.comm.allreduce_engine import FUSION_MAX_BYTES, AllReduceEngine, time_fn_in_graph
    from ferry.comm.allreduce_paths import fused_norm_path
    from ferry.model.layers import fused as fused_ops
    from ferry.parallel.launch import rank_device

    device = rank_device(group.rank, "cuda")
    dtype = torch.bfloat16
    engine = AllReduceEngine.calibrated(group.process_group, device, dtype, fusion="unfused")
    fused, why = fused_norm_path(group.process_group, device, dtype, FUSION_MAX_BYTES)
    if fused is None:
        raise RuntimeError(f"the fused all-reduce + add + RMSNorm cannot run here: {why}")
    weight = torch.rand(width, device=device, generator=torch.Generator(device=device).manual_seed(5)).to(dtype) + 0.5
    rows_out, wrong = [], []

    def torch_ops(partial, residual):
        dist.all_reduce(partial, group=group.process_group)
        residual.add_(partial)
        return fused_ops.rmsnorm_reference(residual, weight, 1e-5)

    def nccl_kernel(partial, residual):
        dist.all_reduce(partial, group=group.process_group)
        return fused_ops.add_rmsnorm(partial, residual, weight, 1e-5)

    def best_kernel(partial, residual):  # the engine without the fusion: its path, then the add+RMSNorm kernel
        return engine.reduce_add_norm(partial, residual, weight, 1e-5)

    def fused_kernel(partial, residual):
        return fused.reduce_add_norm(partial, residual, weight, 1e-5)

    ways = {"nccl + torch ops": torch_ops, "nccl + kernel": nccl_kernel, "best + kernel": best_kernel,
            "fused": fused_kernel}
    for size in sizes:
        rows = max(1, size // (width * dtype.itemsize))
        gen = torch.Generator(device=device).manual_seed(size * 10 + group.rank)
        partial = (torch.randn(rows, width, device=device, generator=gen) * 0.01).to(dtype)
        residual = torch.zeros(rows, width, device=device, dtype=dtype)
        row = {"bytes": rows * width * dtype.itemsize, "rows": rows, "width": width,
               "best_path": engine.path_for(rows * width * dtype.itemsize).name}
        for name, way in ways.items():
            # A fresh copy per replayed call would add a copy kernel to every way; summing the same partial into
            # itself again and again changes the values, not the time.
            p, r = partial.clone(), residual.clone()
            us = time_fn_in_graph(lambda p=p, r=r, way=way: way(p, r), repeats=20, trials=7)
            row[name] = round(group.max_over_ranks(us, device), 2)
        row["fused_vs_nccl_torch"] = round(row["fused"] / row["nccl + torch ops"], 3)
        row["fused_vs_nccl_kernel"] = round(row["fused"] / row["nccl + kernel"], 3)
        row["fused_vs_best_kernel"] = round(row["fused"] / row["best + kernel"], 3)
        # The same step both ways, on fresh inputs: equal results, equal on every rank.
        r_unfused, r_fused = residual.clone() + 1, residual.clone() + 1
        out_unfused = nccl_kernel(partial.clone(), r_unfused)
        out_fused = fused_kernel(partial.clone(), r_fused)
        torch.cuda.synchronize(device)
        residual_equal = group.min_over_ranks(float(torch.equal(r_unfused, r_fused)), device)
        relative = ((out_fused.float() - out_unfused.float()).abs() / out_unfused.float().abs().clamp_min(1e-3)).max()
        gathered = [torch.empty_like(out_fused) for _ in range(group.world_size)]
        dist.all_gather(gathered, out_fused, group=group.process_group)
        same_everywhere = all(torch.equal(g, gathered[0]) for g in gathered)
        row["residual_equals_unfused"] = bool(residual_equal)
        # The norm's fp32 sum of squares may be ordered differently in the two kernels: one bf16 rounding apart
        row["normed_max_rel_diff"] = round(group.max_over_ranks(float(relative), device), 5)
        row["normed_bitwise_equal"] = bool(group.min_over_ranks(float(torch.equal(out_fused, out_unfused)), device))
        row["same_on_every_rank"] = same_everywhere
        if not (row["residual_equals_unfused"] and same_everywhere and row["normed_max_rel_diff"] <= 2 ** -7):
            wrong.append(size)
        rows_out.append(row)
    return {"rows": rows_out, "wrong": wrong, "error_word": int(fused.error.item()), "plan": engine.describe()}


def run(world: int, width: int, out: Path, sizes: list[int] | None = None) -> tuple[dict, Path, Path]:
    from ferry.bench.report import provenance, write_results
    from ferry.parallel.launch import keep_multicast_off, spawn

    keep_multicast_off()
    result = spawn(world, "cuda", measure_on_ranks, (sizes or SIZES, width), timeout_s=600)
    meta = provenance(torch.device("cuda")) | {"ranks": world, "width": width, "dtype": "bfloat16",
                                               "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"],
                                               "wrong_sizes": result["wrong"], "error_word": result["error_word"]}
    stem = f"{meta['date']}_fused_allreduce_norm_cuda_w{world}_h{width}"
    cols = ["bytes", "rows", "nccl + torch ops", "nccl + kernel", "best + kernel", "best_path", "fused",
            "fused_vs_nccl_torch", "fused_vs_nccl_kernel", "fused_vs_best_kernel", "residual_equals_unfused",
            "normed_bitwise_equal", "normed_max_rel_diff", "same_on_every_rank"]
    notes = ("Microseconds per all-reduce + residual add + RMSNorm of `rows` x `width` bf16, in a CUDA graph (20 "
             "calls per replay, median of 7 replays, max over ranks).\n\nThe engine's plain all-reduce plan:\n\n```\n"
             + result["plan"] + "\n```")
    json_path, md_path = write_results(out, stem, meta, result["rows"], cols, notes=notes)
    return result, json_path, md_path
