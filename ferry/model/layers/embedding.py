"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.model.layers.linear import QuantizableMatmul
from ferry.model.layers.quant import quantize_rows_int8
from ferry.model.layers.shard import shard_range, shard_sizes
from ferry.model.weights.source import WeightSource


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, group: ParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_start, self.vocab_stop = shard_range(vocab_size, group.world_size, group.rank)
        self.shard_widths = shard_sizes(vocab_size, group.world_size)
        self.weight = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        # Ids owned by another rank look up row 0 and are zeroed; the all-reduce fills them in.
        local = ids - self.vocab_start
        owned = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(owned, local, 0), self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.group.all_reduce(out)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.data.copy_(source.get(f"{name}.weight", dim=0, start=self.vocab_start, stop=self.vocab_stop))


class ParallelLMHead(VocabParallelEmbedding, QuantizableMatmul):
    """Logits over this rank's vocabulary slice, gathered to the full vocabulary."""

    tied = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.group.all_gather_last_dim(self.matmul(hidden), self.shard_widths)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def quantize_int8(self) -> None:
        if self.tied:  # the shared table stays dense for the embedding lookup; the head gets an int8 copy
            self.int8 = quantize_rows_int8(self.weight.data)
        else:
            super().quantize_int8()
