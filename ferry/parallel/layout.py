"""Which tensor-parallel layouts a model supports (the head rule itself lives in ferry.model.layers.heads).

MLP columns and the vocabulary split as evenly as possible, unevenly when they must; attention heads follow
`HeadShard`, replicating KV heads when ranks outnumber them. Refused by name: tp < 1 and tp above the
query-head count.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.model.layers.heads import HeadShard


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise FerryError(f"--tp must be >= 1, got {tp}")
    for rank in range(tp):
        HeadShard.for_rank(config.num_heads, config.num_kv_heads, tp, rank)


def check_parallel_options(weights: str, offload_fraction: float, compression: str | None) -> None:
    """Options a tensor-parallel launch cannot take, refused before any rank starts."""
    if weights != "native" or offload_fraction:
        raise FerryError("--weights int8 and --offload-weights are single-rank options; drop them with --tp")
    if compression not in (None, "int8"):
        raise FerryError(f"unknown --compressed-allreduce {compression!r} (only 'int8')")


def check_launch(config: ModelConfig, device_type: str, tp: int) -> None:
    """The layout fits the model and the devices present (checked in the launching process)."""
    import torch

    check_tensor_parallel(config, tp)
    check_device_count(device_type, tp, torch.cuda.device_count() if device_type == "cuda" else 0)


def check_device_count(device_type: str, tp: int, available: int) -> None:
    if device_type != "cpu" and tp > available:
        raise FerryError(f"--tp {tp} needs {tp} {device_type} devices, but {available} are present")
