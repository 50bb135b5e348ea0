"""Tensor-parallel generation: every rank loads only its shard and runs the same engine steps; rank 0 reports."""

from __future__ import annotations

import os
import resource
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from ferry.comm.group import ParallelGroup
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError


@dataclass(frozen=True)
class GenerateJob:
    model: str | None
    device_type: str
    dtype: str | None
    prompts: tuple[str, ...]
    params: SamplingParams
    chat: bool = False
    engine_options: dict = field(default_factory=dict)  # Engine(**engine_options): compile, sync_output, ...
    allreduce: str = "auto"  # all-reduce path: "auto" (calibrated per size) or one path's name


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_floats(group: ParallelGroup, value: float, device: torch.device) -> list[float]:
    """Every rank's `value`, in rank order (on the device: NCCL moves no host tensors)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(group.world_size)]
    torch.distributed.all_gather(gathered, mine, group=group.process_group)
    return [round(float(g), 1) for g in gathered]


def check_ranks_agree(group: ParallelGroup, completions: list, device: torch.device) -> None:
    """Every rank must have produced the same tokens (SPMD): one tiny all-gather per request, so a rank that drew
    a different sample or read different inputs is an error rather than silently mixed hidden states."""
    digest = zlib.crc32(repr([c.token_ids for c in completions]).encode())
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(group.world_size)]
    torch.distributed.all_gather(gathered, mine, group=group.process_group)
    differing = [r for r, g in enumerate(gathered) if int(g) != digest]
    if differing:
        raise FerryError(f"tensor-parallel ranks {differing} produced different tokens than rank {group.rank}")


def run_generate(group: ParallelGroup, job: GenerateJob) -> dict:
    from ferry.device import resolve_dtype
    from ferry.model.loader import load_model
    from ferry.parallel.layout import check_tensor_parallel

    # Ranks share the host's cores: without this, gloo ranks oversubscribe them and decode slows several-fold.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    device = torch.device(f"cuda:{group.rank % torch.cuda.device_count()}") if job.device_type == "cuda" else torch.device(job.device_type)
    dtype = resolve_dtype(job.dtype, device)
    group = group.with_allreduce(job.allreduce, device, dtype)
    started = time.perf_counter()
    loaded = load_model(job.model, device, dtype, group=group, show_progress=group.rank == 0)
    check_tensor_parallel(loaded.config, group.world_size)
    load_s = time.perf_counter() - started
    peak_after_load = peak_host_mb()
    tok = loaded.tokenizer
    ids = [tok.encode_chat(p) if job.chat else tok.encode(p) for p in job.prompts]
    from ferry.parallel.workers import agree_on_seed

    completions = Engine(loaded.model, tok, **job.engine_options).generate(ids, agree_on_seed(group, job.params, device))
    check_ranks_agree(group, completions, device)
    return {
        "model": str(loaded.path),
        "device": str(device.type),
        "dtype": str(dtype).removeprefix("torch."),
        "tp": group.world_size,
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": gather_floats(group, peak_after_load, device),
        "allreduce_calls": dict(group.allreduce.calls) if group.allreduce else {},
        "completions": [asdict(c) for c in completions],
    }
