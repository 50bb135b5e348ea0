"""Tensor-parallel speed on one machine: decode tokens/s per batch, prefill with and without micro-batch overlap,
and the TP roofline, measured on every rank of a spawned group (rank 0 reports; times are max over ranks).

TP roofline for a decode step = this rank's weight bytes / measured copy bandwidth
                               + 2 all-reduces per layer x the measured latency of one all-reduce of that step's
                                 hidden states, on the path Ferry's engine picked, in a CUDA graph on GPUs.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from ferry.bench.decode_timing import (
    captured_step,
    communication_share,
    copy_bandwidth,
    ferry_decode,
    graph_step_ms,
    random_prompts,
    step_profile,
    sync,
)
from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig


@dataclass(frozen=True)
class SpeedJob:
    config: ModelConfig
    dtype: str
    batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 128
    new_tokens: int = 128
    repeats: int = 3
    prefill: tuple[int, int] = (8, 1024)  # sequences x tokens; (0, 0) skips it
    allreduce: str = "auto"
    compile: bool = False
    kernels: str = "fused"  # "fused": Ferry's Triton kernels for the elementwise steps on GPUs; "torch": torch ops


def allreduce_latency_us(group: ParallelGroup, nbytes: int, dtype: torch.dtype, device: torch.device) -> float:
    """One all-reduce of `nbytes` on the path the group's engine picks (in a CUDA graph on GPUs)."""
    if group.world_size == 1:
        return 0.0
    from ferry.comm.allreduce_engine import time_eager, time_in_graph

    path = group.allreduce.path_for(nbytes)  # measure_on_ranks gave every multi-rank group its engine
    x = torch.ones(max(1, nbytes // dtype.itemsize), dtype=dtype, device=device)
    us = (time_in_graph(path, x, 20, 5) if device.type == "cuda"
          else time_eager(path, x, 10, 5, group.process_group))
    return group.max_over_ranks(us, device)


def prefill_ms(model, batch: int, tokens: int, overlap: bool, device: torch.device, group) -> float:
    """Median wall time of one prefill forward of `batch` x `tokens` (max over ranks), over a dense cache: the
    micro-batch overlap schedule splits a batch's rows, which the static engine's layout has."""
    from ferry.engine.kv_cache import KVCache

    ids = torch.tensor(random_prompts(batch, tokens, model.config.vocab_size, seed=7), device=device)
    positions = torch.arange(tokens, device=device).expand(batch, tokens)
    cache = KVCache.for_model(model)
    cache.ensure(batch, tokens)
    model.overlap_micro_batches = overlap
    times = []
    with torch.inference_mode():
        for i in range(4):
            if group.world_size > 1:
                torch.distributed.barrier(group=group.process_group)
            sync(device)
            started = time.perf_counter()
            model(ids, positions, cache.layers, tokens)
            sync(device)
            if i:
                times.append((time.perf_counter() - started) * 1000)
    model.overlap_micro_batches = False
    return group.max_over_ranks(statistics.median(times), device)


def measure_on_ranks(group: ParallelGroup, job: SpeedJob) -> dict:
    """Spawn target (or called directly with a one-rank group)."""
    from ferry.bench.shapes import random_model, weight_bytes_per_token
    from ferry.engine.engine import Engine
    from ferry.model.layers import fused
    from ferry.parallel.launch import rank_device

    fused.set_enabled(job.kernels == "fused")

    # Spawned ranks already share the host's cores (init_group); a one-rank run keeps torch's default, all of them.
    device = rank_device(group.rank, "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, job.dtype)
    group = group.with_allreduce(job.allreduce, device, dtype)
    model = random_model(job.config, device, dtype, group=group)
    engine = Engine(model, None, compile=job.compile)
    weight_bytes = weight_bytes_per_token(model)
    bandwidth = group.min_over_ranks(copy_bandwidth(device), device)
    rows = []
    for batch in job.batches:
        tok_s = ferry_decode(engine, batch, job.prompt_len, job.new_tokens, job.config.vocab_size, job.repeats)
        tok_s = group.min_over_ranks(tok_s, device)
        step_ms = graph_step_ms(engine, batch, job.prompt_len + job.new_tokens)
        message = batch * job.config.hidden_size * dtype.itemsize
        ar_us = allreduce_latency_us(group, message, dtype, device)
        weight_ms = group.max_over_ranks(weight_bytes, device) / bandwidth * 1000
        roofline_ms = weight_ms + 2 * job.config.num_layers * ar_us / 1000
        step = captured_step(engine, batch, job.prompt_len + job.new_tokens)
        profile = step_profile(step.graph) if step is not None else None  # one profiled run serves every column
        families = profile["families"] if profile else {}
        comm_share = communication_share(profile) if profile else None
        rows.append({
            "test": "decode", "tp": group.world_size, "kernels": job.kernels, "allreduce": job.allreduce,
            "batch": batch, "tokens_per_s": round(tok_s, 1),
            # The TP weight roofline: this rank's weight bytes over the copy bandwidth, no link term.
            "weight_roofline_tokens_per_s": round(1000 / weight_ms, 1),
            "of_weight_roofline": round(tok_s / (1000 / weight_ms), 3),
            "kernels_per_step": profile["kernels_per_step"] if profile else None,
            "gpu_busy_share": round(profile["busy_us"] / 1000 / step_ms, 3) if profile and step_ms else None,
            **{f"{family.replace(' ', '_')}_us": f["us"] for family, f in families.items()},
            "profile": profile,
            "aggregate_tokens_per_s": round(tok_s * batch, 1),
            "graph_step_ms": round(group.max_over_ranks(step_ms, device), 3) if step_ms else None,
            "allreduce_bytes": message, "allreduce_us": round(ar_us, 2),
            "comm_share_profiled": round(group.max_over_ranks(comm_share, device), 3) if comm_share is not None else None,
            "allreduce_share_of_roofline": round(2 * job.config.num_layers * ar_us / 1000 / roofline_ms, 3),
            "roofline_tokens_per_s": round(1000 / roofline_ms, 1),
            "of_roofline": round(tok_s / (1000 / roofline_ms), 3),
        })
    seqs, tokens = job.prefill
    if seqs and tokens:
        plain = prefill_ms(model, seqs, tokens, False, device, group)
        row = {"test": "prefill", "tp": group.world_size, "batch": seqs, "prefill_tokens": tokens,
               "prefill_ms": round(plain, 2)}
        if group.world_size > 1 and seqs >= 2:
            overlapped = prefill_ms(model, seqs, tokens, True, device, group)
            row |= {"prefill_overlap_ms": round(overlapped, 2), "overlap_speedup": round(plain / overlapped, 3)}
        rows.append(row)
    calls = dict(group.allreduce.calls) if group.allreduce else {}
    return {"rows": rows, "weight_bytes_per_rank": weight_bytes, "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
            "decode_path": engine.decode_path, "allreduce_calls": calls,
            "allreduce_plan": group.allreduce.describe() if group.allreduce else "single rank"}


def run_tp_speed(job: SpeedJob, tp_sizes: list[int], device_type: str) -> list[dict]:
    """Every TP size in turn (fresh ranks each); returns one result per size, rows tagged with scaling vs tp=1."""
    from ferry.parallel.launch import spawn

    results = []
    for tp in tp_sizes:
        if tp == 1:
            result = measure_on_ranks(ParallelGroup.single(), job)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the ranks spawned next need this GPU's memory
        else:
            result = spawn(tp, device_type, measure_on_ranks, (job,), timeout_s=600)
        results.append({"tp": tp} | result)
    add_scaling(results)
    return results


def add_scaling(results: list[dict]) -> None:
    """Each decode row's tokens/s over TP=1's at the same batch with the same kernels (TP=1 has no all-reduce, so
    its row stands for every all-reduce mode)."""
    base = {(r["batch"], r.get("kernels")): r["tokens_per_s"] for res in results if res["tp"] == 1
            for r in res["rows"] if r["test"] == "decode"}
    for res in results:
        for r in res["rows"]:
            key = (r["batch"], r.get("kernels"))
            if r["test"] == "decode" and key in base:
                r["vs_tp1"] = round(r["tokens_per_s"] / base[key], 3)
