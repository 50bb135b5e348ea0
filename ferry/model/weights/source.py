"""The one interface layers load from: named tensors, readable a slice at a time."""

from __future__ import annotations

from typing import Protocol

import torch


class WeightSource(Protocol):
    """Tensors addressed by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).

    `get(name, dim, start, stop)` returns only rows/columns [start, stop) along `dim`, so a
    tensor-parallel rank reads its shard without materialising the whole tensor where the format allows.
    """

    def has(self, name: str) -> bool: ...

    def get(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor: ...
