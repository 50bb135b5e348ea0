"""Grouped-query attention over a KV cache: a dense one (a row per sequence) or the paged one (blocks).

Dense: every forward (prefill, chunked prefill or decode) writes this step's K/V at each sequence's own
positions, then attends over the cache prefix [0, kv_len) under a mask built from those positions. That keeps
one code path for ragged batches and makes decode capturable in a CUDA graph. The edge/cloud split and the
static engine use it.

Paged (the serving engine): the step's tokens of every sequence are packed in one row ([1, tokens]); K/V are
written to their slots in the block pool, decode tokens (first in the row) attend through their block tables in
one kernel, and each prefill chunk attends to its sequence's cached prefix plus itself (paged_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.errors import FerryError
from ferry.model.layers import fused
from ferry.model.layers.heads import HeadShard
from ferry.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from ferry.model.layers.paged_attention import (
    PREFILL_TRITON_PATH,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention_path,
)
from ferry.model.layers.rotary import RotaryEmbedding, apply_rotary_joint
from ferry.model.weights.source import WeightSource


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk in a paged step: row tokens [q_start, q_start + length) are its positions
    [start, start + length); `table` is its block table (device, int32)."""

    q_start: int
    length: int
    start: int
    table: torch.Tensor

    @property
    def context_len(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class PagedBatch:
    """Where a paged step's tokens go and what they read.

    slots: [tokens] pool slot (block * block_size + offset) each token's K/V is written to.
    decode_rows: the first `decode_rows` tokens are one decode token each of different sequences, reading
    through block_tables [decode_rows, width] (int32) up to context_lens [decode_rows] (int32, this token included).
    prefills: the chunks after them, one sequence each.
    """

    slots: torch.Tensor
    decode_rows: int
    block_tables: torch.Tensor | None
    context_lens: torch.Tensor | None
    prefills: tuple[PrefillChunk, ...] = ()
    # The prefill kernel's layout of the chunks, built by the first layer that needs it and read by every other.
    _prefill_layouts: dict = field(default_factory=dict, compare=False, repr=False)

    def use_layout(self, group: int, layout) -> None:
        """Read the prefill chunks through `layout` (a captured step's static one) instead of building one."""
        self._prefill_layouts[group] = layout

    def prefill_layout(self, group: int, device: torch.device):
        from ferry.model.layers.paged_prefill_kernel import PrefillLayout

        if group not in self._prefill_layouts:
            self._prefill_layouts[group] = PrefillLayout.build(self.prefills, device, group)
        return self._prefill_layouts[group]


@dataclass(frozen=True)
class AttentionBatch:
    """What every attention layer of one forward needs, built once by the model.

    positions: [batch, tokens] absolute position of each token in its own sequence.
    mask: [batch, 1, tokens, kv_len] True where a query may see a cached key.
    cos, sin: rotary tables at those positions, [batch, tokens, 1, head_dim].
    """

    positions: torch.Tensor
    mask: torch.Tensor | None
    kv_len: int
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    paged: PagedBatch | None = None
    # A paged step on the fused kernels reads the whole fp32 tables by position itself (cos, sin stay None).
    rotary: RotaryEmbedding | None = None

    def rows(self, start: int, stop: int) -> AttentionBatch:
        """The same step for batch rows [start, stop) (a micro-batch)."""
        return AttentionBatch(self.positions[start:stop], self.mask[start:stop], self.kv_len,
                              self.cos[start:stop], self.sin[start:stop])

    @classmethod
    def build(cls, positions: torch.Tensor, kv_len: int, rotary: RotaryEmbedding, dtype: torch.dtype,
              paged: PagedBatch | None = None) -> AttentionBatch:
        if paged is not None:
            if fused.runs_kernels(positions):
                return cls(positions=positions, mask=None, kv_len=0, cos=None, sin=None, paged=paged, rotary=rotary)
            cos, sin = rotary.tables_for(positions, dtype)
            return cls(positions=positions, mask=None, kv_len=0, cos=cos, sin=sin, paged=paged)
        keys = torch.arange(kv_len, device=positions.device)
        mask = keys.view(1, 1, 1, kv_len) <= positions.unsqueeze(1).unsqueeze(-1)
        cos, sin = rotary.tables_for(positions, dtype)
        return cls(positions=positions, mask=mask, kv_len=kv_len, cos=cos, sin=sin)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        group: ParallelGroup,
    ) -> None:
        super().__init__()
        heads = HeadShard.for_rank(num_heads, num_kv_heads, group.world_size, group.rank, group.shares)
        self.heads = heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, head_dim
        # Each rank's queries find their keys locally: folded per KV head when the local groups are equal,
        # else (some replicated layouts) K/V are gathered per query head.
        self.group_size = heads.local_group
        self._kv_index: torch.Tensor | None = None  # built on first use: modules are created on the meta device
        q_rows = (heads.q_start * head_dim, heads.q_stop * head_dim)
        kv_rows = (heads.kv_start * head_dim, heads.kv_stop * head_dim)
        self.qkv_proj = ColumnParallelLinear(
            hidden_size,
            [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
            group,
            bias=bias,
            block_ranges=[q_rows, kv_rows, kv_rows],
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, group, in_range=q_rows)

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor], reduce: bool = True
    ) -> torch.Tensor:
        bsz, tokens, _ = x.shape
        hd, n_kv, group = self.head_dim, self.num_kv_heads, self.group_size
        if batch.rotary is not None:  # a paged step on the fused kernels
            return self.o_proj(self._paged_fused(x[0], batch, kv_cache).reshape(1, tokens, -1), reduce=reduce)
        qkv = self.qkv_proj(x)
        qk_width = (self.num_heads + n_kv) * hd
        q, k = apply_rotary_joint(qkv[..., :qk_width].view(bsz, tokens, self.num_heads + n_kv, hd), self.num_heads,
                                  batch.cos, batch.sin)
        v = qkv[..., qk_width:]
        if batch.paged is not None:
            return self.o_proj(self._paged(q[0], k[0], v.view(tokens, n_kv, hd), batch.paged, kv_cache).reshape(
                1, tokens, -1), reduce=reduce)

        # Cache layout [max_batch, max_len, kv_heads, head_dim]; row i of the batch is cache row i.
        k_cache, v_cache = kv_cache
        rows = torch.arange(bsz, device=x.device).unsqueeze(1)
        k_cache[rows, batch.positions] = k
        v_cache[rows, batch.positions] = v.view(bsz, tokens, n_kv, hd)
        keys = k_cache[:bsz, : batch.kv_len].transpose(1, 2)
        values = v_cache[:bsz, : batch.kv_len].transpose(1, 2)

        if group is None:
            if self._kv_index is None or self._kv_index.device != x.device:
                self._kv_index = torch.tensor(self.heads.kv_of_query, device=x.device)
            keys, values = keys.index_select(1, self._kv_index), values.index_select(1, self._kv_index)
            n_kv, group = self.num_heads, 1
        # Fold each KV head's query group into the query axis: SDPA then needs no K/V repetition.
        q = q.view(bsz, tokens, n_kv, group, hd).permute(0, 2, 3, 1, 4).reshape(bsz, n_kv, group * tokens, hd)
        mask = batch.mask.unsqueeze(2).expand(bsz, 1, group, tokens, batch.kv_len).reshape(bsz, 1, group * tokens, batch.kv_len)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(bsz, n_kv, group, tokens, hd).permute(0, 3, 1, 2, 4).reshape(bsz, tokens, -1)
        return self.o_proj(out, reduce=reduce)

    def _paged_fused(self, x: torch.Tensor, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
                     ) -> torch.Tensor:
        """x [tokens, hidden] of one packed step: the projection, then one kernel for its bias, rotary and the K/V
        writes into the pool, then attention."""
        from ferry.model.layers.fused_kernels import launch_rotary_kv_write

        self._check_paged()
        paged, rotary = batch.paged, batch.rotary
        k_pool, v_pool = kv_cache
        qkv = self.qkv_proj.matmul(x)
        q = launch_rotary_kv_write(qkv, self.qkv_proj.bias, batch.positions.reshape(-1), rotary.cos, rotary.sin,
                                   paged.slots, k_pool, v_pool, self.num_heads, self.num_kv_heads, self.head_dim)
        return self._paged_attend(q, paged, kv_cache)

    def _check_paged(self) -> None:
        if self.group_size is None:
            raise FerryError("this tensor-parallel layout gives a rank an uneven number of query heads per KV "
                             "head, which the paged KV cache does not run; choose a --tp that divides the KV heads")

    def _paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paged: PagedBatch,
               kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q [tokens, heads, hd], k/v [tokens, kv_heads, hd] of one packed step -> attention output like q."""
        self._check_paged()
        k_pool, v_pool = kv_cache
        n_kv, hd = self.num_kv_heads, self.head_dim
        k_pool.view(-1, n_kv, hd)[paged.slots] = k
        v_pool.view(-1, n_kv, hd)[paged.slots] = v
        return self._paged_attend(q, paged, kv_cache)

    def _paged_attend(self, q: torch.Tensor, paged: PagedBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
        """Attention of a packed step whose K/V are already in the pool."""
        k_pool, v_pool = kv_cache
        scale = self.head_dim**-0.5
        rows = paged.decode_rows
        if not paged.prefills:  # a decode-only step (what CUDA graphs capture)
            return paged_decode_attention(q, k_pool, v_pool, paged.block_tables, paged.context_lens, scale)
        out = torch.empty_like(q)
        if rows:
            out[:rows] = paged_decode_attention(q[:rows], k_pool, v_pool, paged.block_tables, paged.context_lens,
                                                scale)
        if prefill_attention_path(q.device) == PREFILL_TRITON_PATH:
            from ferry.model.layers.paged_prefill_kernel import paged_prefill

            return paged_prefill(q, k_pool, v_pool, paged.prefill_layout(self.group_size, q.device), out, scale)
        for c in paged.prefills:
            out[c.q_start : c.q_start + c.length] = paged_prefill_attention(
                q[c.q_start : c.q_start + c.length], k_pool, v_pool, c.table, c.start, c.context_len, scale)
        return out

    def load(self, source: WeightSource, prefix: str) -> None:
        self.qkv_proj.load(source, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(source, f"{prefix}.o_proj")
