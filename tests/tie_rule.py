"""The tie rule for paths whose arithmetic differs from the reference's (another device, dtype or summation
order): greedy paths may part at a near-tie, so every token a path chose must be within a margin of the top logit
of Ferry's fp32 model, teacher-forced on that path's own prefix."""

from __future__ import annotations

import torch

from ferry.engine.kv_cache import KVCache


def worst_gap(loaded, prompt_ids: list[int], token_ids: list[int]) -> float:
    """The largest (top logit - chosen token's logit) over the steps, under `loaded` (an fp32 model on the CPU)."""
    cfg = loaded.config
    cache = KVCache(cfg.num_layers, loaded.model.kv_heads_per_rank, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(1, len(prompt_ids) + len(token_ids))
    with torch.inference_mode():
        logits = loaded.model.full_logits(torch.tensor([prompt_ids + token_ids]), cache.layers)
    logits = logits[0, len(prompt_ids) - 1: -1]
    chosen = logits.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)
    return float((logits.max(dim=1).values - chosen).max())
