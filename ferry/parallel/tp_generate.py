"""Tensor-parallel generation: every rank loads only its shard and runs the same engine steps; rank 0 reports."""

from __future__ import annotations

import logging
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
from ferry.parallel.placement import Placement

log = logging.getLogger("ferry.parallel")


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
    placement: Placement | None = None  # each rank's device, threads and share (placement.py); None: alike


def gather_floats(group: ParallelGroup, value: float, device: torch.device, digits: int = 1) -> list[float]:
    """Every rank's `value`, in rank order, rounded to `digits` (on the device: NCCL moves no host tensors)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(group.world_size)]
    torch.distributed.all_gather(gathered, mine, group=group.process_group)
    return [round(float(g), digits) for g in gathered]


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


def gather_speeds(group, placement: Placement, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                  gather_device: torch.device):
    """Every rank's measured speed (device_speed.py), in rank order; None when the placement needs none."""
    from ferry.parallel.device_speed import DeviceSpeed, measure, needs_measuring

    if placement is None or not needs_measuring(placement):
        return None
    # One rank at a time: a layer's time is the difference of two short timings, which another rank's
    # measurement on the same host's cores and memory would skew (2 ranks at once timed a 2x slower one faster).
    rank, mine = torch.distributed.get_rank(), None
    for turn in range(torch.distributed.get_world_size()):
        if turn == rank:
            mine = measure(config, device, dtype, placement.rank(rank).slowdown)
        torch.distributed.barrier(group=group)
    t = torch.tensor([mine.layer_s, mine.fixed_s, mine.matmul_s], dtype=torch.float64, device=gather_device)
    parts = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t, group=group)
    return [DeviceSpeed(placement.rank(r).device, float(p[0]), float(p[1]), mine.rows, float(p[2]))
            for r, p in enumerate(parts)]


def placed_group(group: ParallelGroup, placement: Placement | None, config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, gather_group, gather_device: torch.device):
    """`group` with this stage's TP shares (given, or from every rank's measured speed) and the split report."""
    from dataclasses import replace as with_fields

    from ferry.parallel.device_speed import split_by_speed

    if placement is None:
        return group, None
    split = split_by_speed(placement, config.num_layers,
                           gather_speeds(gather_group, placement, config, device, dtype, gather_device))
    shares = split.shares[torch.distributed.get_rank() // placement.tp]
    return (with_fields(group, shares=shares) if shares else group), split


def load_on_rank(group: ParallelGroup, model: str | None, device_type: str, dtype_name: str | None, allreduce: str,
                 show_progress: bool = False, placement: Placement | None = None) -> tuple[ParallelGroup, LoadedModel]:
    """This rank's shard of the model, on its device (its share of it, with a placement), and the group with its
    all-reduce engine."""
    from ferry.device import resolve_dtype
    from ferry.model.loader import load_model, open_checkpoint, resolve_model_path, resolve_precision

    device = rank_device(group.rank, device_type, placement)
    if placement is None:  # the precision `ferry generate` picks (on one CPU rank: the GGUF's blocks, fp32)
        dtype, weights = resolve_precision(dtype_name, "auto", model, device, group.world_size)
    else:
        dtype, weights = resolve_dtype(placement.stages[0].dtype or dtype_name, device, tp=group.world_size), "auto"
        path = resolve_model_path(model)
        group, _ = placed_group(group, placement, open_checkpoint(path)[1], device, dtype, group.process_group, device)
    group = group.with_allreduce(allreduce, device, dtype)
    loaded = load_model(model, device, dtype, group=group, show_progress=show_progress, weights=weights)
    if placement is not None:
        loaded.model.emulate_slowdown(placement.rank(group.rank).slowdown)
    return group, loaded


def random_model_on_rank(group: ParallelGroup, shape: str | ModelConfig, device_type: str, dtype_name: str | None,
                         allreduce: str, placement: Placement | None = None):
    """This rank's shard of an architecture (named, or a config) with random weights (speed runs of real shapes);
    no tokenizer."""
    from ferry.bench.shapes import SHAPES, random_model
    from ferry.device import resolve_dtype

    config = SHAPES[shape] if isinstance(shape, str) else shape
    device = rank_device(group.rank, device_type, placement)
    dtype = resolve_dtype(placement and placement.stages[0].dtype or dtype_name, device, tp=group.world_size)
    group, _ = placed_group(group, placement, config, device, dtype, group.process_group, device)
    group = group.with_allreduce(allreduce, device, dtype)
    model = random_model(config, device, dtype, group=group)
    if placement is not None:
        model.emulate_slowdown(placement.rank(group.rank).slowdown)
    return model, None


def group_device(engine, placement: Placement | None) -> torch.device:
    """Where the world group's tensors live: the host when ranks are on different kinds of device (the group is
    gloo), else the ranks' device."""
    return torch.device("cpu") if placement is not None and placement.mixed else engine.device


def generate_on_rank(group: ParallelGroup, engine: Engine, prompts: list[list[int]], params: SamplingParams,
                     on_token=None, device: torch.device | None = None) -> list:
    """One request, run in step with the other ranks, checked to have produced the same tokens on all of them.
    `device`: the group's tensors' device (group_device), by default the engine's."""
    device = device or engine.device
    completions = engine.generate(prompts, agree_on_seed(group, params, device), on_token=on_token)
    check_ranks_agree(group, completions, device)
    return completions


def run_generate(group: ParallelGroup, job: GenerateJob) -> dict:
    if job.pipeline is not None:
        return run_pipeline_generate(group, job)
    from ferry.parallel.layout import check_tensor_parallel

    started = time.perf_counter()
    group, loaded = load_on_rank(group, job.model, job.device_type, job.dtype, job.allreduce,
                                 show_progress=group.rank == 0, placement=job.placement)
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
        "tp_shares": list(group.shares) if group.shares else None,
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": gather_floats(group, peak_after_load, engine.device),
        "allreduce_calls": dict(group.allreduce.calls) if group.allreduce else {},
        "completions": [asdict(c) for c in completions],
    }


def pipeline_on_rank(world: ParallelGroup, spec: PipelineSpec, model: str | None, shape: str | ModelConfig | None,
                     device_type: str, dtype_name_: str | None, allreduce: str, engine_options: dict,
                     show_progress: bool = False, placement: Placement | None = None):
    """This rank's stage: its tensor-parallel shard of its layers (from the checkpoint, or random weights of a
    shape, named or given) and the pipeline engine over it. With a placement, each stage on its own device, in its
    own dtype, its layers (and TP shares) as given or sized by every rank's measured speed. Returns (engine,
    tokenizer or None, TP group, stage spans, speed split or None)."""
    from ferry.device import BACKENDS, resolve_dtype
    from ferry.model.loader import load_model, open_checkpoint, resolve_model_path
    from ferry.parallel.layout import check_tensor_parallel, stage_spans
    from ferry.parallel.mesh import Mesh, StagePeers, split_groups
    from ferry.parallel.pipeline_engine import PipelineEngine
    from ferry.parallel.pipeline_stage import PipelineLinks, PipelineStage

    if placement is not None:
        mesh = Mesh(placement.tp, placement.pp)
        # Each stage's device at this rank's TP position, and its dtype: a CPU stage beside GPUs resolves as one
        # rank would (bf16 where native); a CPU-only pipeline stays fp32 like every CPU layout.
        devices = [torch.device(s.ranks[mesh.tp_rank_of(world.rank)].device) for s in placement.stages]
        dtypes = [resolve_dtype(s.dtype or dtype_name_, d, tp=mesh.tp if placement.mixed else mesh.world)
                  for s, d in zip(placement.stages, devices, strict=True)]
        backends = [BACKENDS[s.device_type] for s in placement.stages] if placement.mixed else None
        tp_group = split_groups(mesh, world.rank, world.compression, backends)
        links = PipelineLinks(StagePeers(mesh, world.rank), spec.timeout_s, devices, dtypes)
        device, dtype = devices[links.peers.stage], dtypes[links.peers.stage]
    else:
        mesh = Mesh(world.world_size // spec.pp, spec.pp)
        tp_group = split_groups(mesh, world.rank, world.compression)
        links = PipelineLinks(StagePeers(mesh, world.rank), spec.timeout_s)
        device = rank_device(world.rank, device_type)
        dtype = resolve_dtype(dtype_name_, device, tp=mesh.world)
    if shape is not None:
        from ferry.bench.shapes import SHAPES

        config, path = (SHAPES[shape] if isinstance(shape, str) else shape), None
    else:
        path = resolve_model_path(model)
        config = open_checkpoint(path)[1]
    check_tensor_parallel(config, mesh.tp)
    tp_group, split = placed_group(tp_group, placement, config, device, dtype, links.tokens, torch.device("cpu"))
    layer_split = spec.layer_split or (placement and placement.layer_split)
    if split is not None and split.layer_counts:
        layer_split = ",".join(map(str, split.layer_counts))
        if world.rank == 0:
            log.info("stages sized by measured speed: %s layers (%s)", ",".join(map(str, split.layer_counts)),
                     "; ".join(f"{s['device']} {s['layer_ms']} ms/layer" for s in split.speeds))
    spans = stage_spans(config.num_layers, mesh.pp, layer_split)
    span = spans[links.peers.stage]
    tp_group = tp_group.with_allreduce(allreduce, device, dtype)
    if path is None:
        from ferry.bench.shapes import random_model

        stage_model, tokenizer = random_model(config, device, dtype, group=tp_group, span=span), None
    else:
        loaded = load_model(path, device, dtype, group=tp_group, span=span, show_progress=show_progress)
        stage_model, tokenizer = loaded.model, loaded.tokenizer
    if placement is not None:
        stage_model.emulate_slowdown(placement.rank(world.rank).slowdown)
    engine = PipelineEngine(stage_model, tokenizer, PipelineStage(stage_model, links), spec.micro_batches,
                            **engine_options)
    return engine, tokenizer, tp_group, spans, split


def run_pipeline_generate(world: ParallelGroup, job: GenerateJob) -> dict:
    """`--pp`: this rank loads its stage's layers only (its tensor-parallel shard of them) and runs the pipeline
    engine; every rank ends with the same completions, rank 0 reports them."""
    started = time.perf_counter()
    spec = job.pipeline
    engine, tok, tp_group, spans, split = pipeline_on_rank(world, spec, job.model, None, job.device_type, job.dtype,
                                                           job.allreduce, job.engine_options, world.rank == 0,
                                                           job.placement)
    load_s = time.perf_counter() - started
    peak_after_load = peak_resident_mib()
    ids = [tok.encode_chat(p) if job.chat else tok.encode(p) for p in job.prompts]
    on = group_device(engine, job.placement)
    completions = generate_on_rank(world, engine, ids, job.params, device=on)
    engine.close()  # only after a run that ended well: on an error, waiting for sends would hide it
    sent = gather_floats(world, engine.stage.hidden_bytes_sent, on)
    mine = engine.stage.timing.per_step_ms()
    times = {k: gather_floats(world, v, on) for k, v in mine.items()}
    doc = {
        "model": str(job.model),
        "device": str(engine.device.type),
        "dtype": dtype_name(engine.dtype),
        "tp": world.world_size // spec.pp,
        "pp": spec.pp,
        "stages": [str(s) for s in spans],
        "micro_batches": len(engine.engines),
        "load_s": round(load_s, 3),
        "peak_host_mb_per_rank": gather_floats(world, peak_after_load, on),
        "hidden_bytes_sent_per_rank": [int(b) for b in sent],
        "stage_times_per_rank": [{k: times[k][r] for k in mine} for r in range(world.world_size)],
        "allreduce_calls": dict(tp_group.allreduce.calls) if tp_group.allreduce else {},
        "completions": [asdict(c) for c in completions],
    }
    if job.placement is not None:
        stages = job.placement.stages
        doc["device"] = "+".join(dict.fromkeys(s.device_type for s in stages))
        doc["placement"] = [{"devices": [r.device for r in st.ranks], "layers": str(span)}
                            for st, span in zip(stages, spans, strict=True)]
        doc["stage_dtypes"] = [dtype_name(d) for d in engine.stage.links.stage_dtypes or [engine.dtype]]
        if split is not None:
            doc["speed_split"] = split.to_json()
    return doc
