"""Which tensor-parallel layouts a model supports (the head rule itself lives in ferry.model.layers.heads).

MLP columns and the vocabulary split as evenly as possible, unevenly when they must; attention heads follow
`HeadShard`, replicating KV heads when ranks outnumber them. Refused by name: tp < 1, tp above the
query-head count, and options that do not fit the rank count.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.model.layers.heads import HeadShard


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    _check_rank_count(tp)
    for rank in range(tp):
        HeadShard.for_rank(config.num_heads, config.num_kv_heads, tp, rank)


def _check_rank_count(tp: int) -> None:
    if tp < 1:
        raise FerryError(f"--tp must be 1 or more (one rank per device), got {tp}")


def check_parallel_options(tp: int, weights: str = "auto", offload_fraction: float = 0.0,
                           compression: str | None = None, allreduce: str = "auto") -> None:
    """The one check of the rank count and the options that go with it, run before any model loads or rank
    starts (CLI and API alike): an option that only a tensor-parallel run uses is refused on one rank rather
    than dropped, and single-rank options are refused with several."""
    _check_rank_count(tp)
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


def check_launch(config: ModelConfig, device_type: str, tp: int) -> None:
    """The layout fits the model and the devices present (checked in the launching process)."""
    import torch

    check_tensor_parallel(config, tp)
    check_device_count(device_type, tp, torch.cuda.device_count() if device_type == "cuda" else 0)


def check_device_count(device_type: str, tp: int, available: int) -> None:
    if device_type != "cpu" and tp > available:
        raise FerryError(f"--tp {tp} needs {tp} {device_type} devices, but {available} are present")
