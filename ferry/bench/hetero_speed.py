"""Decode throughput of one placement (ranks on devices of different kinds or speeds) or of one GPU streaming the
layers it cannot hold, on spawned ranks, with each pipeline stage's time per micro-batch step.

Every run is the serving engine the CLI runs (the pipeline engine for stages, TP ranks in lockstep, one rank's
Engine with the weight streamer). Aggregate decode tokens/s = batch x the median per-sequence rate, the slowest
rank's figure (bench/decode_timing.py).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from ferry.bench.decode_timing import ferry_decode
from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig
from ferry.parallel.placement import Placement


@dataclass(frozen=True)
class HeteroJob:
    label: str
    config: ModelConfig
    model: str | None  # a checkpoint (real weights), or None: random weights of `config`'s shape
    dtype: str | None  # None: each device's default
    placement: Placement | None = None
    streamed_layers: int = 0  # one GPU rank: this many last layers stream from pinned host memory
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 3
    micro_batches: int | None = None
    kv_memory: str | None = None


def measure_placed(world: ParallelGroup, job: HeteroJob) -> dict:
    """Spawn target (or called directly with a one-rank group): decode rows and stage times of this layout."""
    from ferry.parallel.tp_generate import gather_floats, group_device

    started = time.perf_counter()
    engine, extra = _build(world, job)
    build_s = time.perf_counter() - started
    stage = getattr(engine, "stage", None)
    on = group_device(engine, job.placement)
    rows = []
    for batch in job.batches:
        if stage is not None:
            stage.timing = type(stage.timing)(stage.device)  # this batch's steps only (warm-up included)
        rate = ferry_decode(engine, batch, job.prompt_len, job.new_tokens, job.config.vocab_size, job.repeats)
        rate = world.min_over_ranks(rate, on)
        row = {"layout": job.label, "batch": batch, "tokens_per_s": round(rate, 2),
               "aggregate_tokens_per_s": round(rate * batch, 1)}
        if stage is not None:
            times = stage.timing.per_step_ms()
            gathered = {k: gather_floats(world, v, on, digits=3) for k, v in times.items()}
            row["stage_times"] = [{k: gathered[k][r] for k in times} for r in range(world.world_size)]
        rows.append(row)
    if stage is not None:
        engine.close()
    return {"rows": rows, "decode_path": engine.decode_path, "build_s": round(build_s, 1)} | extra


def _build(world: ParallelGroup, job: HeteroJob):
    from ferry.bench.shapes import random_model
    from ferry.device import resolve_dtype
    from ferry.engine.engine import Engine
    from ferry.model.loader import load_model, stream_layers
    from ferry.parallel.tp_generate import PipelineSpec, load_on_rank, pipeline_on_rank, random_model_on_rank

    options = {"kv_memory": job.kv_memory}
    placement = job.placement
    if placement is not None and placement.pp > 1:
        spec = PipelineSpec(placement.pp, micro_batches=job.micro_batches, timeout_s=900)
        engine, _, _, spans, split = pipeline_on_rank(world, spec, job.model, None if job.model else job.config,
                                                      placement.device_types[0], job.dtype, "auto", options,
                                                      placement=placement)
        return engine, {"stages": [str(s) for s in spans], "speed_split": split.to_json() if split else None}
    if placement is not None:  # one stage of tensor-parallel ranks, weighted or not
        if job.model:
            group, loaded = load_on_rank(world, job.model, placement.device_types[0], job.dtype, "auto",
                                         placement=placement)
            model = loaded.model
        else:
            model, _ = random_model_on_rank(world, job.config, placement.device_types[0], job.dtype, "auto",
                                            placement)
            group = model.group
        return Engine(model, None, **options), {"tp_shares": list(group.shares) if group.shares else None}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(job.dtype, device)
    if job.model:
        loaded = load_model(job.model, device, dtype, weights="native",
                            offload_fraction=job.streamed_layers / job.config.num_layers)
        return Engine(loaded.model, None, **options), {}
    model = random_model(job.config, device, dtype)
    if job.streamed_layers:
        streamer = stream_layers(model, list(range(job.config.num_layers - job.streamed_layers,
                                                   job.config.num_layers)), activate=True)
        gc.collect()
        torch.cuda.empty_cache()
        return Engine(model, None, **options), {"streamed_layer_mb": round(streamer.bytes_per_layer / 1e6, 1)}
    return Engine(model, None, **options), {}


def run_placed(job: HeteroJob) -> dict:
    """One layout on fresh ranks, or in this process for one rank."""
    from ferry.parallel.launch import spawn

    if job.placement is None:
        result = measure_placed(ParallelGroup.single(), job)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the ranks spawned next need this GPU's memory
        return result
    return spawn(job.placement.world, job.placement.device_types[0], measure_placed, (job,), timeout_s=1800,
                 placement=job.placement)
