"""Tensor-parallel generation: every rank loads only its shard and runs the same engine steps; rank 0 reports."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass

import torch

from ferry.comm.group import ParallelGroup
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateJob:
    model: str | None
    device_type: str
    dtype: str | None
    prompts: tuple[str, ...]
    params: SamplingParams
    chat: bool = False


def _peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_generate(group: ParallelGroup, job: GenerateJob) -> dict:
    from ferry.device import resolve_dtype
    from ferry.model.loader import load_model
    from ferry.parallel.layout import check_tensor_parallel

    # Ranks share the host's cores: without this, gloo ranks oversubscribe them and decode slows several-fold.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    device = torch.device(f"cuda:{group.rank % torch.cuda.device_count()}") if job.device_type == "cuda" else torch.device(job.device_type)
    dtype = resolve_dtype(job.dtype, device)
    started = time.perf_counter()
    loaded = load_model(job.model, device, dtype, group=group, show_progress=group.rank == 0)
    check_tensor_parallel(loaded.config, group.world_size)
    load_s = time.perf_counter() - started
    peak_after_load = _peak_host_mb()
    tok = loaded.tokenizer
    ids = [tok.encode_chat(p) if job.chat else tok.encode(p) for p in job.prompts]
    completions = Engine(loaded.model, tok).generate(ids, job.params)
    peaks = torch.tensor([peak_after_load], dtype=torch.float64)
    gathered = [torch.zeros_like(peaks) for _ in range(group.world_size)]
    torch.distributed.all_gather(gathered, peaks, group=group.process_group)
    return {
        "model": str(loaded.path),
        "device": str(device.type),
        "dtype": str(dtype).removeprefix("torch."),
        "tp": group.world_size,
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": [round(float(g), 1) for g in gathered],
        "completions": [asdict(c) for c in completions],
    }
