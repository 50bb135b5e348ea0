"""What the SequenceRunner tests (CPU and GPU) compare against: random token ids for the tiny shape, and the dense
path's logits over a whole sequence in one prefill."""

from __future__ import annotations

import torch

from ferry.bench.shapes import TINY
from ferry.engine.kv_cache import KVCache


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def dense_logits(model, ids: list[int]) -> torch.Tensor:
    """fp32 logits at every position of `ids`, one dense prefill on the model's device (the reference)."""
    cache = KVCache.for_model(model)
    cache.ensure(1, len(ids))
    with torch.inference_mode():
        return model.full_logits(torch.tensor([ids], device=model.norm.weight.device), cache.layers)[0]
