"""Decode throughput of one layout (TP x PP) on spawned ranks, with random weights of a real shape.

Every layout runs the serving engine the CLI runs: one rank's Engine, TP ranks in lockstep, or the pipeline
engine with its micro-batches. Aggregate decode tokens/s = batch x the median per-sequence rate (tokens after
the first over the time after the first), the slowest rank's figure.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch

from ferry.bench.decode_timing import ferry_decode
from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig

# The environment that keeps NCCL off NVLink and shared memory: bytes go over sockets, like a link between nodes.
SOCKET_LINK = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


@dataclass(frozen=True)
class LayoutJob:
    config: ModelConfig
    dtype: str
    tp: int = 1
    pp: int = 1
    batches: tuple[int, ...] = (1, 16, 64)
    prompt_len: int = 128
    new_tokens: int = 128
    repeats: int = 3
    micro_batches: int | None = None
    kv_memory: str | None = None


def measure_layout(world: ParallelGroup, job: LayoutJob) -> dict:
    """Spawn target (or called directly with a one-rank group): decode rows of this layout."""
    from ferry.bench.shapes import random_model
    from ferry.engine.engine import Engine
    from ferry.parallel.launch import rank_device

    device = rank_device(world.rank, "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, job.dtype)
    link = "socket" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "default"
    # Over sockets the all-reduce is NCCL's: torch's symmetric-memory paths would still read peers over NVLink.
    allreduce = "process_group" if link == "socket" else "auto"
    started = time.perf_counter()
    if job.pp == 1:
        group = world.with_allreduce(allreduce, device, dtype)
        engine = Engine(random_model(job.config, device, dtype, group=group), None, kv_memory=job.kv_memory)
    else:
        engine = _pipeline_engine(world, job, device, allreduce)
    build_s = time.perf_counter() - started
    rows = []
    for batch in job.batches:
        rate = ferry_decode(engine, batch, job.prompt_len, job.new_tokens, job.config.vocab_size, job.repeats)
        rate = world.min_over_ranks(rate, device)
        rows.append({"tp": job.tp, "pp": job.pp, "batch": batch, "tokens_per_s": round(rate, 1),
                     "aggregate_tokens_per_s": round(rate * batch, 1)})
    return {"rows": [r | {"link": link} for r in rows], "decode_path": engine.decode_path,
            "build_s": round(build_s, 1)}


def _pipeline_engine(world: ParallelGroup, job: LayoutJob, device, allreduce: str):
    from ferry.parallel.tp_generate import PipelineSpec, pipeline_on_rank

    spec = PipelineSpec(job.pp, micro_batches=job.micro_batches, timeout_s=600)
    engine, _, _, _, _ = pipeline_on_rank(world, spec, None, job.config, device.type, job.dtype, allreduce,
                                       {"kv_memory": job.kv_memory})
    return engine


def run_layout(job: LayoutJob, device_type: str, env: dict[str, str] | None = None) -> dict:
    """One layout on fresh ranks (spawned with `env` added to the environment), or in this process for one rank."""
    from ferry.parallel.launch import spawn

    world = job.tp * job.pp
    if world == 1:
        result = measure_layout(ParallelGroup.single(), job)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the ranks spawned next need this GPU's memory
        return result
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return spawn(world, device_type, measure_layout, (job,), timeout_s=900)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
