"""Quality of a variant against the exact path: teacher-forced next-token agreement and perplexity on the text that
ships with Ferry (the compressed all-reduce, int8 and int4 weights)."""

from __future__ import annotations

import torch

from ferry.comm.group import ParallelGroup
from ferry.engine.kv_cache import KVCache


def full_logits_on_ranks(group: ParallelGroup, path: str, ids: list[list[int]]) -> torch.Tensor:
    """Rank 0's fp32 logits for every position of `ids` (spawn target: every rank loads its shard)."""
    from ferry.model.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model(path, torch.device("cpu"), torch.float32, group=group, show_progress=False)
    return teacher_forced_logits(loaded.model, ids)


def teacher_forced_logits(model, ids: list[list[int]]) -> torch.Tensor:
    """fp32 logits at every position of `ids` [batch, tokens] in one forward over a fresh cache of the model's dtype."""
    x = torch.tensor(ids)
    cache = KVCache.for_model(model)
    cache.ensure(*x.shape)
    with torch.inference_mode():
        return model.full_logits(x, cache.layers).float()


def compare(reference: torch.Tensor, variant: torch.Tensor, ids: list[list[int]]) -> dict:
    targets = torch.tensor(ids)[:, 1:].reshape(-1)

    def ppl(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets).exp())

    return {
        "top1_agreement": round(float((reference.argmax(-1) == variant.argmax(-1)).float().mean()), 4),
        "max_logit_error": round(float((reference - variant).abs().max()), 4),
        "perplexity_exact": round(ppl(reference), 4),
        "perplexity_variant": round(ppl(variant), 4),
    }
