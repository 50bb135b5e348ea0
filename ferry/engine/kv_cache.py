"""The preallocated KV cache: one K and one V tensor per layer, [max_batch, max_len, kv_heads, head_dim]."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_batch = self.max_len = 0
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def for_model(cls, model, num_layers: int | None = None) -> KVCache:
        """An empty cache shaped for `model`'s layers on this rank (the first `num_layers`, default all), in the
        model's dtype and on its device."""
        weight = model.norm.weight
        layers = model.config.num_layers if num_layers is None else num_layers
        return cls(layers, model.kv_heads_per_rank, model.config.head_dim, weight.dtype, weight.device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def ensure(self, batch: int, length: int, keep: bool = False) -> bool:
        """Grow to hold `batch` sequences of `length` tokens; True when the tensors were reallocated.

        With `keep`, what the old tensors held is copied over (a session that grows mid-sequence)."""
        if batch <= self.max_batch and length <= self.max_len:
            return False
        old, (old_b, old_len) = self.layers, (self.max_batch, self.max_len)
        self.max_batch, self.max_len = max(batch, self.max_batch), max(length, self.max_len)
        if not keep:
            self.layers = old = []  # free the old tensors before allocating the new ones
        shape = (self.max_batch, self.max_len, self.kv_heads, self.head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.num_layers)
        ]
        for (k_new, v_new), (k_old, v_old) in zip(self.layers, old):
            k_new[:old_b, :old_len].copy_(k_old)
            v_new[:old_b, :old_len].copy_(v_old)
        return True

    def grow_for(self, positions: int, floor: int = 256, limit: int | None = None) -> bool:
        """Room for one sequence of `positions` tokens, keeping what is held (a session growing mid-sequence).

        Grows only when full, to twice what is needed (at least `floor`, at most `limit`), so a session that
        decodes n tokens reallocates and copies about log2(n) times rather than at every step."""
        if positions <= self.max_len and self.max_batch >= 1:
            return False
        length = max(floor, 2 * positions)
        return self.ensure(1, max(positions, min(length, limit)) if limit else length, keep=True)
