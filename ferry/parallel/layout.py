"""Which tensor-parallel layouts a model supports.

Rule: KV heads are split as evenly as possible over the ranks (the first ranks take one more), and each rank
takes the query heads of its KV heads (the whole group of each), so attention never crosses ranks. Head counts
need not divide: SmolLM2's 9 query / 3 KV heads split 6+3 queries (2+1 KV heads) at tp=2. MLP columns and the
vocabulary split the same way, unevenly when they must. A rank needs at least one KV head: tp above the KV-head
count would need replicated KV heads, which Ferry does not do yet, so it is refused by name.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.model.config import ModelConfig


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise FerryError(f"--tp must be >= 1, got {tp}")
    if tp > config.num_kv_heads:
        raise FerryError(
            f"--tp {tp} is more ranks than this model's {config.num_kv_heads} KV heads; use --tp <= "
            f"{config.num_kv_heads} (KV-head replication across ranks is not supported yet)"
        )


def check_device_count(device_type: str, tp: int, available: int) -> None:
    if device_type != "cpu" and tp > available:
        raise FerryError(f"--tp {tp} needs {tp} {device_type} devices, but {available} are present")
