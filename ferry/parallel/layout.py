"""Which tensor-parallel layouts a model supports (the head rule itself lives in ferry.model.layers.heads).

MLP columns and the vocabulary split as evenly as possible, unevenly when they must; attention heads follow
`HeadShard`, replicating KV heads when ranks outnumber them. Refused by name: tp < 1, tp above the
query-head count, and options that do not fit the rank count.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.model.layers.heads import HeadShard
from ferry.model.layers.shard import shard_sizes
from ferry.model.llama import LayerSpan


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    check_rank_count(tp)
    for rank in range(tp):
        HeadShard.for_rank(config.num_heads, config.num_kv_heads, tp, rank)


def check_rank_count(tp: int) -> None:
    if tp < 1:
        raise FerryError(f"--tp must be 1 or more (one rank per device), got {tp}")


def check_parallel_options(tp: int, weights: str = "auto", offload_fraction: float = 0.0,
                           compression: str | None = None, allreduce: str = "auto") -> None:
    """The one check of the rank count and the options that go with it, run before any model loads or rank
    starts (CLI and API alike): an option that only a tensor-parallel run uses is refused on one rank rather
    than dropped, and single-rank options are refused with several."""
    check_rank_count(tp)
    from ferry.comm.allreduce_engine import parse_mode

    parse_mode(allreduce)  # a malformed ",fused" suffix is named before anything starts
    if compression not in (None, "int8"):
        raise FerryError(f"unknown --compressed-allreduce {compression!r} (only 'int8')")
    if tp == 1:
        if compression:
            raise FerryError("--compressed-allreduce compresses tensor-parallel all-reduces; it needs --tp 2 or more")
        if allreduce != "auto":
            raise FerryError(f"--allreduce {allreduce} picks the tensor-parallel all-reduce path; it needs --tp 2 "
                             "or more")
    elif weights not in ("native", "auto") or offload_fraction:
        raise FerryError(f"--weights {weights} and --offload-weights are single-rank options; drop them with --tp")


def check_launch(config: ModelConfig, device_type: str, tp: int, pp: int = 1, layer_split: str | None = None,
                 devices_needed: int | None = None) -> None:
    """The layout fits the model and the devices present (checked in the launching process; under torchrun,
    where each process drives one device, `devices_needed` is 1)."""
    import torch

    check_tensor_parallel(config, tp)
    stage_spans(config.num_layers, pp, layer_split)
    needed = tp * pp if devices_needed is None else devices_needed
    check_device_count(device_type, needed, torch.cuda.device_count() if device_type == "cuda" else 0, tp, pp)


def check_device_count(device_type: str, needed: int, available: int, tp: int | None = None, pp: int = 1) -> None:
    if device_type != "cpu" and needed > available:
        what = f"--tp {tp or needed}" + (f" x --pp {pp}" if pp > 1 else "")
        raise FerryError(f"{what} needs {needed} {device_type} devices, but {available} are present")


def check_pipeline_options(pp: int, layer_split: str | None, micro_batches: int | None, compiled: bool,
                           overlap_prefill: bool, weights: str = "auto", offload_fraction: float = 0.0,
                           sync_output: bool = False) -> None:
    """Options that only a pipeline uses are refused without one, and single-stage options with one."""
    if pp == 1:
        if layer_split:
            raise FerryError("--layer-split cuts the model into pipeline stages; it needs --pp 2 or more")
        if micro_batches is not None:
            raise FerryError("--micro-batches cuts the batch for pipeline stages; it needs --pp 2 or more")
        return
    if micro_batches is not None and micro_batches < 1:
        raise FerryError(f"--micro-batches must be 1 or more, got {micro_batches}")
    for flag, given in (("--compile", compiled), ("--overlap-prefill", overlap_prefill),
                        (f"--weights {weights}", weights not in ("auto", "native")),
                        ("--offload-weights", bool(offload_fraction)),
                        ("--sync-output", sync_output)):  # a stage reads each micro-batch's tokens before its next
        if given:
            raise FerryError(f"{flag} is not offered with --pp yet")


def stage_spans(num_layers: int, pp: int, layer_split: str | None = None) -> list[LayerSpan]:
    """Contiguous decoder layers per pipeline stage: `layer_split` ("10,10,12") as given, else as even as the
    count allows (the earlier stages take one more, since the last also runs the LM head)."""
    if layer_split:
        try:
            counts = [int(part) for part in layer_split.split(",")]
        except ValueError:
            raise FerryError(f"--layer-split {layer_split!r}: give one layer count per stage, e.g. 10,10,12") from None
        if len(counts) != pp:
            raise FerryError(f"--layer-split {layer_split!r} has {len(counts)} stages; --pp is {pp}")
        if min(counts) < 1 or sum(counts) != num_layers:
            raise FerryError(f"--layer-split {layer_split!r}: every stage needs a layer or more, and the counts must "
                             f"add up to the model's {num_layers} layers (they add up to {sum(counts)})")
    else:
        if pp > num_layers:
            raise FerryError(f"--pp {pp} is more stages than the model's {num_layers} layers")
        counts = shard_sizes(num_layers, pp)
    spans, start = [], 0
    for count in counts:
        spans.append(LayerSpan(start, start + count, num_layers))
        start += count
    return spans
