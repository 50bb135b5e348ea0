"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.model.layers.linear import QuantizableMatmul
from ferry.model.layers.quant import quantize_rows_int8
from ferry.model.weights.source import WeightSource


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, group: ParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_start, self.vocab_stop = group.shard_range(vocab_size)
        self.shard_widths = group.shard_widths(vocab_size)
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

    def load_quantized(self, source: WeightSource, name: str) -> bool:
        """Keep the checkpoint's blocks of this rank's vocabulary rows for the int4 kernel (Q4_0/Q4_1, or Q8_0 as
        int4 pairs) when the model keeps quantized weights; a tied table stays dense for the embedding lookup."""
        return self.load_int4(source, [(f"{name}.weight", 0, self.vocab_start, self.vocab_stop)])

    def quantize_int8(self) -> None:
        if self.int4 is not None:
            return
        if self.tied:  # the shared table stays dense for the embedding lookup; the head gets an int8 copy
            self.int8 = quantize_rows_int8(self.weight.data)
        else:
            super().quantize_int8()


class CheckpointRowsEmbedding(nn.Module):
    """An embedding that reads the rows it is asked for from the checkpoint instead of holding the table.

    For a split edge the table is the largest thing it would hold: SmolLM2-135M's 49152 x 576 rows are 113 MB in
    fp32, twice its first 4 decoder layers. The checkpoint is memory-mapped and GGUF rows are whole quantized
    blocks, so a lookup touches only its rows' bytes; values equal the dense table's (the same dequantization).
    """

    def __init__(self, source: WeightSource, name: str, vocab_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.source, self.name, self.vocab_size = source, name, vocab_size
        self.dtype, self.device = dtype, device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten().tolist()
        bad = [i for i in flat if not 0 <= i < self.vocab_size]
        if bad:
            raise IndexError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        unique = sorted(set(flat))
        rows = torch.cat([self.source.get(self.name, dim=0, start=i, stop=i + 1) for i in unique])
        where = {token: row for row, token in enumerate(unique)}
        index = torch.tensor([where[i] for i in flat], dtype=torch.long).view(ids.shape)
        return F.embedding(index, rows).to(self.device, self.dtype)
