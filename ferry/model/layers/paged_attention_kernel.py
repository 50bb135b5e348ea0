"""Paged decode attention in Triton: flash-decoding (split-K) over K/V read through a block table.

Grid (sequence, kv head, split). Each program takes one KV head's whole query group (so every K/V byte is loaded
once per group, not once per query head) and one split of the sequence's context: it walks its tokens TILE at a
time, looks up each token's physical block in the table, and keeps an online softmax in fp32. With one split it
writes the output directly; with more, it writes a normalised partial output and its log-sum-exp to fp32 scratch
and a second small kernel combines the splits.

CUDA-graph rules: the grid and the scratch depend only on shapes (batch, table width, heads); the number of
splits is fixed for those shapes, and each sequence's split LENGTH comes from its runtime context length, so a
short context spreads over all splits as evenly as a long one. A split that starts past the context does nothing;
a row with context length 0 (a padding row of a graph bucket) reads nothing and outputs zeros.

Query group on the tensor cores: the group (1..8 heads) is padded to 16 rows and both products use tl.dot. The
padded rows cost arithmetic only, and decode is bound by HBM bytes, not by FLOPs; a broadcast multiply-sum would
instead hold [group, TILE, head_dim] products in registers (64 KiB per program at 8 x 64 x 128 fp32) and spill.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Starting points, not yet tuned on a GPU: `benchmarks/paged_attention_kernels.py --sweep` times the
# alternatives (tile 32/64/128, 4/8 warps, 1..32 splits) at Llama-3-8B's shape.
TILE_TOKENS = 64  # tokens per loop step: 16 KiB of K and 16 KiB of V in flight per program at D=128, bf16
MIN_SPLIT_TOKENS = 128  # a split also pays its partial write and a share of the reduce: keep it a few tiles long
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2  # resident programs per SM, so one's gather loads overlap another's arithmetic


@triton.jit
def online_softmax_step(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One tile of keys of flash attention: scores of q [rows, D] against k [TILE, D] where `visible` [rows or 1,
    TILE], the running max `m`, sum `l` and output `acc` rescaled and updated (base-2 exponentials: log2(e) is in
    `qk_scale`). A row that has seen no visible key yet keeps accumulating zeros, not NaN. Shared by the decode and
    prefill kernels."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _split_length(context_len, NUM_SPLITS: tl.constexpr, TILE: tl.constexpr):
    """Tokens per split for this sequence: the context spread over every split, rounded up to whole tiles."""
    per_split = tl.cdiv(context_len, NUM_SPLITS)
    return tl.cdiv(per_split, TILE) * TILE


@triton.jit
def paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, partial_ptr,
    scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ts,
    stride_os, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    context_len = tl.load(lens_ptr + seq)
    split_len = _split_length(context_len, NUM_SPLITS, TILE)
    start = split * split_len
    stop = tl.minimum(start + split_len, context_len)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # exp2 instead of exp: fold log2(e) into the scale once.
    qk_scale = scale * 1.4426950408889634

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    offsets = tl.arange(0, TILE)
    table_row = tables_ptr + seq * stride_ts
    for tile_start in range(start, stop, TILE):
        pos = tile_start + offsets
        valid = pos < stop
        # Table entries past the context are junk: only positions inside it look their block up.
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_rows = block * stride_kb + slot * stride_kt + kv_head * stride_kh
        v_rows = block * stride_vb + slot * stride_vt + kv_head * stride_vh
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        m, l, acc = online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale, DOT_PRECISION)

    # l == 0 only where nothing was read (an empty split or a context of 0): the output is then zeros, not NaN.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    store_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # A split that starts past the context writes nothing (a vector mask: the interpreter rejects scalar ones).
        live = rows < tl.where(start < context_len, GROUP, 0)
        lse = m + tl.log2(tl.where(l > 0, l, 1.0))  # base-2 log-sum-exp of the scaled scores
        row = (seq * num_q_heads + heads) * NUM_SPLITS + split  # scratch [S, Hq, NUM_SPLITS(, D)]
        tl.store(lse_ptr + row, lse, mask=live)
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=live[:, None] & dim_ok[None, :])


@triton.jit
def paged_decode_reduce_kernel(
    lse_ptr, partial_ptr, lens_ptr, out_ptr,
    stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(lens_ptr + seq)
    split_len = _split_length(context_len, NUM_SPLITS, TILE)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    live = splits * split_len < context_len  # the splits that wrote scratch this call (none for a context of 0)
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    lse = tl.load(lse_ptr + row, mask=live, other=float("-inf"))
    partial = tl.load(partial_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=live[:, None] & dim_ok[None, :],
                      other=0.0)
    top = tl.where(context_len > 0, tl.max(lse, axis=0), 0.0)
    weight = tl.where(live, tl.exp2(lse - top), 0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits for a (batch, table width) shape: enough programs to fill the GPU, never splits shorter than
    MIN_SPLIT_TOKENS at the longest context the table can hold. Depends on shapes only (CUDA-graph safe)."""
    programs = batch * num_kv_heads
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    splits = max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS), MAX_SPLITS))
    # A power of two: NUM_SPLITS is a compile-time constant, and every batch size of a serving run would otherwise
    # compile its own variant (each a JIT compile of up to a second, inside the run on first use).
    return 1 << (splits.bit_length() - 1)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                 tile: int = TILE_TOKENS, num_warps: int = 4) -> torch.Tensor:
    """Launches the split and (for more than one split) reduce kernels; shapes as in paged_attention.py.
    `num_splits`, `tile` and `num_warps` are for tests and tuning runs; None picks splits from the shapes."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    group = num_q_heads // num_kv_heads
    tile = max(tile, block_size)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    out = torch.empty_like(q)
    if num_splits > 1:
        lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        partial = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        lse = partial = out  # not touched with one split
    block_d = triton.next_power_of_2(head_dim)
    paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_pool, v_pool, block_tables, context_lens, out, lse, partial, scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, TILE=tile, NUM_SPLITS=num_splits, DOT_PRECISION="ieee",
        num_warps=num_warps,
    )
    if num_splits > 1:
        paged_decode_reduce_kernel[(batch, num_q_heads)](
            lse, partial, context_lens, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), TILE=tile, num_warps=4,
        )
    return out
