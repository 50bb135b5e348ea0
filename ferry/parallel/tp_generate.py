"""Tensor-parallel generation: every rank loads only its shard and runs the same engine steps; rank 0 reports."""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field, replace

import torch

from ferry.comm.group import ParallelGroup
from ferry.device import dtype_name
from ferry.engine.engine import Engine, build_engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.memory import peak_resident_mib
from ferry.model.config import ModelConfig
from ferry.model.loader import LoadedModel
from ferry.parallel.launch import rank_device


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline's layout: pp stages of (world size / pp) tensor-parallel ranks."""

    pp: int
    layer_split: str | None = None
    micro_batches: int | None = None
    timeout_s: float = 300.0


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
    pipeline: PipelineSpec | None = None  # the world's ranks as pipeline stages of tensor-parallel ranks


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


def agree_on_seed(group: ParallelGroup, params: SamplingParams, device: torch.device) -> SamplingParams:
    """Unseeded sampling would draw a different stream on each rank and split the ranks apart: rank 0 picks a
    seed and every rank uses it. Greedy and seeded requests are returned unchanged."""
    if params.seed is not None or params.temperature == 0 or group.world_size == 1:
        return params
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    torch.distributed.broadcast(seed, src=0, group=group.process_group)
    return replace(params, seed=int(seed))


def load_on_rank(group: ParallelGroup, model: str | None, device_type: str, dtype_name: str | None, allreduce: str,
                 show_progress: bool = False) -> tuple[ParallelGroup, LoadedModel]:
    """This rank's shard of the model, on its device, and the group with its all-reduce engine."""
    from ferry.device import resolve_dtype
    from ferry.model.loader import load_model

    device = rank_device(group.rank, device_type)
    dtype = resolve_dtype(dtype_name, device, tp=group.world_size)
    group = group.with_allreduce(allreduce, device, dtype)
    return group, load_model(model, device, dtype, group=group, show_progress=show_progress)


def random_model_on_rank(group: ParallelGroup, shape: str, device_type: str, dtype_name: str | None, allreduce: str):
    """This rank's shard of a named architecture with random weights (speed runs of real shapes); no tokenizer."""
    from ferry.bench.shapes import SHAPES, random_model
    from ferry.device import resolve_dtype

    device = rank_device(group.rank, device_type)
    dtype = resolve_dtype(dtype_name, device, tp=group.world_size)
    group = group.with_allreduce(allreduce, device, dtype)
    return random_model(SHAPES[shape], device, dtype, group=group), None


def generate_on_rank(group: ParallelGroup, engine: Engine, prompts: list[list[int]], params: SamplingParams,
                     on_token=None) -> list:
    """One request, run in step with the other ranks, checked to have produced the same tokens on all of them."""
    completions = engine.generate(prompts, agree_on_seed(group, params, engine.device), on_token=on_token)
    check_ranks_agree(group, completions, engine.device)
    return completions


def run_generate(group: ParallelGroup, job: GenerateJob) -> dict:
    if job.pipeline is not None:
        return run_pipeline_generate(group, job)
    from ferry.parallel.layout import check_tensor_parallel

    started = time.perf_counter()
    group, loaded = load_on_rank(group, job.model, job.device_type, job.dtype, job.allreduce,
                                 show_progress=group.rank == 0)
    check_tensor_parallel(loaded.config, group.world_size)
    load_s = time.perf_counter() - started
    peak_after_load = peak_resident_mib()
    tok = loaded.tokenizer
    ids = [tok.encode_chat(p) if job.chat else tok.encode(p) for p in job.prompts]
    engine = build_engine(loaded.model, tok, **job.engine_options)
    completions = generate_on_rank(group, engine, ids, job.params)
    return {
        "model": str(loaded.path),
        "device": str(engine.device.type),
        "dtype": dtype_name(engine.dtype),
        "tp": group.world_size,
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": gather_floats(group, peak_after_load, engine.device),
        "allreduce_calls": dict(group.allreduce.calls) if group.allreduce else {},
        "completions": [asdict(c) for c in completions],
    }


def pipeline_on_rank(world: ParallelGroup, spec: PipelineSpec, model: str | None, shape: str | ModelConfig | None,
                     device_type: str, dtype_name_: str | None, allreduce: str, engine_options: dict,
                     show_progress: bool = False):
    """This rank's stage: its tensor-parallel shard of its layers (from the checkpoint, or random weights of a
    shape, named or given) and the pipeline engine over it. Returns (engine, tokenizer or None, TP group, stage
    spans)."""
    from ferry.device import resolve_dtype
    from ferry.model.loader import load_model, open_checkpoint, resolve_model_path
    from ferry.parallel.layout import check_tensor_parallel, stage_spans
    from ferry.parallel.mesh import Mesh, StagePeers, split_groups
    from ferry.parallel.pipeline_engine import PipelineEngine
    from ferry.parallel.pipeline_stage import PipelineLinks, PipelineStage

    mesh = Mesh(world.world_size // spec.pp, spec.pp)
    tp_group = split_groups(mesh, world.rank, world.compression)
    links = PipelineLinks(StagePeers(mesh, world.rank), spec.timeout_s)
    if shape is not None:
        from ferry.bench.shapes import SHAPES

        config, path = (SHAPES[shape] if isinstance(shape, str) else shape), None
    else:
        path = resolve_model_path(model)
        config = open_checkpoint(path)[1]
    check_tensor_parallel(config, mesh.tp)
    spans = stage_spans(config.num_layers, mesh.pp, spec.layer_split)
    span = spans[links.peers.stage]
    device = rank_device(world.rank, device_type)
    dtype = resolve_dtype(dtype_name_, device, tp=mesh.world)
    tp_group = tp_group.with_allreduce(allreduce, device, dtype)
    if path is None:
        from ferry.bench.shapes import random_model

        stage_model, tokenizer = random_model(config, device, dtype, group=tp_group, span=span), None
    else:
        loaded = load_model(path, device, dtype, group=tp_group, span=span, show_progress=show_progress)
        stage_model, tokenizer = loaded.model, loaded.tokenizer
    engine = PipelineEngine(stage_model, tokenizer, PipelineStage(stage_model, links), spec.micro_batches,
                            **engine_options)
    return engine, tokenizer, tp_group, spans


def run_pipeline_generate(world: ParallelGroup, job: GenerateJob) -> dict:
    """`--pp`: this rank loads its stage's layers only (its tensor-parallel shard of them) and runs the pipeline
    engine; every rank ends with the same completions, rank 0 reports them."""
    started = time.perf_counter()
    spec = job.pipeline
    engine, tok, tp_group, spans = pipeline_on_rank(world, spec, job.model, None, job.device_type, job.dtype,
                                                    job.allreduce, job.engine_options, world.rank == 0)
    load_s = time.perf_counter() - started
    peak_after_load = peak_resident_mib()
    ids = [tok.encode_chat(p) if job.chat else tok.encode(p) for p in job.prompts]
    completions = generate_on_rank(world, engine, ids, job.params)
    engine.close()  # only after a run that ended well: on an error, waiting for sends would hide it
    sent = gather_floats(world, engine.stage.hidden_bytes_sent, engine.device)
    return {
        "model": str(job.model),
        "device": str(engine.device.type),
        "dtype": dtype_name(engine.dtype),
        "tp": world.world_size // spec.pp,
        "pp": spec.pp,
        "stages": [str(s) for s in spans],
        "micro_batches": len(engine.engines),
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": gather_floats(world, peak_after_load, engine.device),
        "hidden_bytes_sent_per_rank": [int(b) for b in sent],
        "allreduce_calls": dict(tp_group.allreduce.calls) if tp_group.allreduce else {},
        "completions": [asdict(c) for c in completions],
    }
