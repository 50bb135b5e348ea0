"""Paged prefill attention in Triton: every prefill chunk of a step in one launch, K/V read through block tables.

Why one launch: the reference path (paged_attention.paged_prefill_attention) runs per chunk and per layer a
gather, a mask, its repetition per query group and an SDPA call on 3-D inputs, which CUDA's SDPA sends to its
unfused math path: ~10 launches a chunk a layer. A mixed step of the serving engine on an H200 (Llama-3-8B shape,
up to 2048 tokens of several prompts) took 85 ms where its matmuls need about 30
(benchmarks/results/2026-11-30_serve_core_llama3-8b_cuda_run5_fused.md: 66 such steps were 59% of the run).

Layout (built once per step by `PrefillLayout.build`, read by every layer): an int32 `meta` tensor holding one
record per chunk (row of its first token in the step, its token count, its first position, where its block table
starts in `tables`) and one record per query tile (chunk, first token of the tile); `tables` holds every chunk's
block table back to back.

Grid (query tile, kv head). A program takes a tile of tokens of one chunk and the whole query group of one KV
head, folded into the rows of one matrix (row = token * GROUP_PAD + member), so every K/V byte it loads serves
the group. It walks the chunk's cache from position 0 to its last token's position KV_TILE keys at a time, each
key's physical block looked up in the table, under the causal rule (key position <= query position) with an
online softmax in fp32, as flash attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ferry.model.layers.paged_attention_kernel import online_softmax_step

ROWS = 128  # query rows per program (tokens x the query group padded to a power of two), as flash attention's tile
KV_TILE = 64  # keys per loop step
CHUNK_FIELDS = 4  # q_start, length, start, table_at
TILE_FIELDS = 2  # chunk, first token


@dataclass(frozen=True)
class PrefillLayout:
    """Where a step's prefill chunks sit, on the device, for `paged_prefill`.

    Two forms: `build` lays out one step's chunks exactly (the grid is its tile count); `fixed` is a static layout
    a CUDA graph captures, whose grid is its capacity and whose records are rewritten before each replay, the tile
    count among them (programs past it write nothing)."""

    meta: torch.Tensor  # int32 [chunks * CHUNK_FIELDS + tiles * TILE_FIELDS]
    tables: torch.Tensor  # int32, every chunk's block table back to back
    num_chunks: int  # fixed form: capacity
    num_tiles: int  # fixed form: capacity (the grid)
    tile_tokens: int
    fixed_grid: bool = False

    @classmethod
    def build(cls, chunks, device: torch.device, group: int) -> PrefillLayout:
        """`chunks`: PrefillChunk-like (q_start, length, start, table); `group`: query heads per KV head. One
        host-to-device copy of the records and one concatenation of the tables; neither waits for the device."""
        tile_tokens = tile_tokens_for(group)
        spans, table_at = [], 0
        for c in chunks:
            spans.append((c.q_start, c.length, c.start, table_at))
            table_at += c.table.shape[0]
        records, tiles = layout_records(spans, tile_tokens)
        meta = torch.tensor(records + tiles, dtype=torch.int32)
        # non_blocking from pageable memory: CUDA stages the bytes at once and the stream is not synchronised.
        meta = meta.to(device, non_blocking=True)
        tables = torch.cat([c.table.reshape(-1) for c in chunks]) if chunks else meta[:0]
        return cls(meta, tables.to(torch.int32), len(chunks), len(tiles) // TILE_FIELDS, tile_tokens)

    @classmethod
    def fixed(cls, meta: torch.Tensor, tables: torch.Tensor, max_chunks: int, max_tiles: int, group: int
              ) -> PrefillLayout:
        """A static layout over `meta` (int32, at least `fixed_meta_size(max_chunks, max_tiles)`) and `tables`."""
        if meta.numel() < fixed_meta_size(max_chunks, max_tiles):
            raise ValueError(f"{meta.numel()} int32 cannot hold {max_chunks} chunk and {max_tiles} tile records")
        return cls(meta, tables, max_chunks, max_tiles, tile_tokens_for(group), fixed_grid=True)

    @property
    def count_at(self) -> int:
        """Where the fixed form keeps its live tile count."""
        return _count_at(self.num_chunks, self.num_tiles)


def layout_records(spans, tile_tokens: int) -> tuple[list[int], list[int]]:
    """Chunk records [q_start, length, start, table_at] and tile records [chunk, first token] of `spans` (those four
    values per chunk), flat."""
    records, tiles = [], []
    for index, span in enumerate(spans):
        records += span
        for first in range(0, span[1], tile_tokens):
            tiles += [index, first]
    return records, tiles


def _count_at(max_chunks: int, max_tiles: int) -> int:
    return max_chunks * CHUNK_FIELDS + max_tiles * TILE_FIELDS


def fixed_meta_size(max_chunks: int, max_tiles: int) -> int:
    return _count_at(max_chunks, max_tiles) + 1


def write_fixed_records(meta, spans, tile_tokens: int, max_chunks: int, max_tiles: int) -> None:
    """Write `spans`' chunk and tile records and the live tile count where `PrefillLayout.fixed` reads them, into
    `meta` (an int32 array or tensor of fixed_meta_size(max_chunks, max_tiles)); a step's host side calls this."""
    records, tiles = layout_records(spans, tile_tokens)
    if len(records) > max_chunks * CHUNK_FIELDS or len(tiles) > max_tiles * TILE_FIELDS:
        raise ValueError(f"{len(records) // CHUNK_FIELDS} chunks in {len(tiles) // TILE_FIELDS} tiles do not fit a "
                         f"layout of {max_chunks} chunks and {max_tiles} tiles")
    tiles_at = max_chunks * CHUNK_FIELDS
    meta[: len(records)] = records
    meta[tiles_at : tiles_at + len(tiles)] = tiles
    meta[_count_at(max_chunks, max_tiles)] = len(tiles) // TILE_FIELDS


def max_tiles_for(tokens: int, chunks: int, tile_tokens: int) -> int:
    """Most tiles `chunks` chunks of `tokens` tokens in all can need: each chunk's last tile may be partial."""
    return min(tokens, tokens // tile_tokens + chunks)


def tile_tokens_for(group: int) -> int:
    """Query tokens per program for a query group of `group` heads: ROWS rows, at least 16 tokens."""
    return max(16, ROWS // triton.next_power_of_2(group))


@triton.jit(do_not_specialize=["tiles_at", "count_at"])
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, meta_ptr, tables_ptr,
    tiles_at, count_at, scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_T: tl.constexpr, TILE_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FIXED_GRID: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.load(meta_ptr + tiles_at + tile * 2)
    first = tl.load(meta_ptr + tiles_at + tile * 2 + 1)
    q_start = tl.load(meta_ptr + chunk * 4)
    length = tl.load(meta_ptr + chunk * 4 + 1)
    start = tl.load(meta_ptr + chunk * 4 + 2)
    table_at = tl.load(meta_ptr + chunk * 4 + 3)
    if FIXED_GRID:  # a program past this replay's tiles reads no key and writes no row
        live = tile < tl.load(meta_ptr + count_at)
        length = tl.where(live, length, 0)
        start = tl.where(live, start, 0)

    rows = tl.arange(0, TILE_T * GROUP_PAD)
    token = first + rows // GROUP_PAD  # within the chunk
    member = rows % GROUP_PAD
    row_ok = (member < GROUP) & (token < length)
    query_pos = start + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    step_row = (q_start + token).to(tl.int64)
    head = kv_head * GROUP + member
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + step_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask,
                other=0.0)
    qk_scale = scale * 1.4426950408889634  # exp2 below: log2(e) folded into the scale once

    m = tl.full([TILE_T * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([TILE_T * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([TILE_T * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    # Keys this tile can see: positions [0, its last token's position].
    kv_stop = start + tl.minimum(first + TILE_T, length)
    offsets = tl.arange(0, TILE_K)
    for key_start in range(0, kv_stop, TILE_K):
        pos = key_start + offsets
        valid = pos < kv_stop
        block = tl.load(tables_ptr + table_at + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + (block * stride_kb + slot * stride_kt + kv_head * stride_kh)[:, None] + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (block * stride_vb + slot * stride_vt + kv_head * stride_vh)[:, None] + dims[None, :],
                    mask=kv_mask, other=0.0)
        visible = valid[None, :] & (pos[None, :] <= query_pos[:, None])  # padding rows see nothing
        m, l, acc = online_softmax_step(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + step_row[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: PrefillLayout,
                  out: torch.Tensor, scale: float, num_warps: int | None = None) -> torch.Tensor:
    """Attention of every prefill chunk in `layout`: q [tokens, Hq, D] of the packed step, K/V of the chunks already
    in the pools. Writes the chunks' rows of `out` (like q) and leaves the others; returns `out`."""
    if layout.num_tiles == 0:
        return out
    _, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if layout.tile_tokens != tile_tokens_for(group):
        raise ValueError(f"the layout was cut for {layout.tile_tokens}-token tiles, this query group needs "
                         f"{tile_tokens_for(group)}")
    rows = layout.tile_tokens * group_pad
    paged_prefill_kernel[(layout.num_tiles, num_kv_heads)](
        q, k_pool, v_pool, out, layout.meta, layout.tables,
        layout.num_chunks * CHUNK_FIELDS, layout.count_at if layout.fixed_grid else 0, scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, TILE_T=layout.tile_tokens, TILE_K=max(KV_TILE, block_size), DOT_PRECISION="ieee",
        FIXED_GRID=layout.fixed_grid, num_warps=num_warps or (8 if rows >= 128 else 4),
    )
    return out
