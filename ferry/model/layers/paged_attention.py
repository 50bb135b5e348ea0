"""Attention over a paged KV cache: K/V live in fixed-size blocks of one pool per layer, and a block table per
sequence lists its blocks in order.

Shapes (one layer):
    q             [S, Hq, D]      one query token per sequence (decode) / [T, Hq, D] one sequence's chunk (prefill)
    k_pool/v_pool [num_blocks, block_size, Hkv, D], q's dtype, last dimension contiguous
    block_tables  [S, W] int32    row s: sequence s's physical blocks in order; entries past them are junk
    context_lens  [S] int32       tokens of sequence s in the cache, this step's token included (0: padding row)

Decode has four implementations behind `paged_decode_attention`, chosen by device and named by
`decode_attention_path` (logs and benchmarks print it):
  - `triton-split-k` (CUDA): paged_attention_kernel.py reads K/V in place through the table; capturable in CUDA
    graphs (no host sync, scratch sized from shapes).
  - `ferry-cpu` (a CPU where Ferry's C++ kernels are built, cpu_kernels.py): cpu_paged_attention.cpp reads K/V in
    place too, AVX-512 where the CPU has it, eager and inside compiled steps alike (one opaque op).
  - `gather-sdpa` (every other device, and the reference the others are tested against): gathers each sequence's
    blocks (k_pool[block_tables]) and runs SDPA under a length mask.
  - `inductor-loops` (a CPU decode step inside torch.compile, without Ferry's kernels): attention written as plain
    tensor ops (scores as a product and a sum, a masked softmax, a weighted sum), which inductor fuses with the
    table lookup into its own C++ loops over the pool. See `decode_as_loops` for why.
On CUDA it is the custom op `ferry::paged_decode_attention`, so torch.compile treats it as one opaque call.

Free or stale cache slots may hold anything, NaN included: the reference zeroes K and V outside each context
before SDPA (a masked score of NaN * 0 would still be NaN), and the kernel never loads them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ferry.device import triton_import_error
from ferry.errors import FerryError
from ferry.model.layers import cpu_kernels


class PagedAttentionError(FerryError):
    """Shapes or dtypes the paged attention op cannot take (names the bad value)."""


TRITON_PATH = "triton-split-k"
CPU_KERNEL_PATH = "ferry-cpu"
REFERENCE_PATH = "gather-sdpa"
LOOPS_PATH = "inductor-loops"
PREFILL_TRITON_PATH = "triton-varlen"
PREFILL_REFERENCE_PATH = "gather-sdpa per chunk"
# FERRY_CPU_ATTENTION=0 keeps Ferry's C++ kernel out of CPU decode (gather-sdpa eager, inductor-loops compiled).
CPU_KERNEL_WANTED = os.environ.get("FERRY_CPU_ATTENTION", "1") != "0"


def decode_attention_path(device: torch.device | str, compiled: bool = False,
                          heads: tuple[int, int, int] = (64, 1, 16)) -> str:
    """Which implementation `paged_decode_attention` runs on `device` (`compiled`: inside a compiled step) for
    `heads` (head size, query heads per KV head, block size), as logs and benchmarks name it. Engines ask before
    their first step, which loads Ferry's CPU kernels on a CPU (built once per machine)."""
    device = torch.device(device)
    if device.type == "cpu" and CPU_KERNEL_WANTED and cpu_kernels.load() is None and cpu_kernels.attention_takes(
            *heads):
        return CPU_KERNEL_PATH
    if device.type == "cpu" and compiled:
        return LOOPS_PATH
    if device.type == "cuda":
        error = triton_import_error()
        return TRITON_PATH if error is None else f"{REFERENCE_PATH} (triton not importable: {error})"
    return REFERENCE_PATH


def attention_heads(head_dim: int, num_q_heads: int, num_kv_heads: int, block_size: int) -> tuple[int, int, int]:
    """The shapes the CPU kernel's choice depends on: (head size, query heads per KV head, block size)."""
    return head_dim, num_q_heads // num_kv_heads, block_size


def prefill_attention_path(device: torch.device | str) -> str:
    """Which implementation the prefill chunks of a paged step run on `device`: on CUDA one Triton launch for every
    chunk of the step (paged_prefill_kernel.py), elsewhere `paged_prefill_attention` per chunk."""
    if torch.device(device).type == "cuda" and triton_import_error() is None:
        return PREFILL_TRITON_PATH
    return PREFILL_REFERENCE_PATH


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise PagedAttentionError(f"expected q [S, Hq, D] and pools [blocks, block_size, Hkv, D] of one shape, got "
                                  f"q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    if k_pool.shape[3] != head_dim or num_q_heads % num_kv_heads:
        raise PagedAttentionError(f"q has {num_q_heads} heads of {head_dim}, the pools {num_kv_heads} KV heads of "
                                  f"{k_pool.shape[3]}: head sizes must match and Hq be a multiple of Hkv")
    if not (q.dtype == k_pool.dtype == v_pool.dtype):
        raise PagedAttentionError(f"q and the pools must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if block_size < 16 or block_size & (block_size - 1):
        raise PagedAttentionError(f"block size {block_size} must be a power of two >= 16")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise PagedAttentionError("q and the pools need a contiguous last (head) dimension")
    if block_tables.dim() != 2 or context_lens.shape != (q.shape[0],) or block_tables.shape[0] != q.shape[0]:
        raise PagedAttentionError(f"expected block_tables [S, W] and context_lens [S] for S={q.shape[0]}, got "
                                  f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise PagedAttentionError(f"block_tables and context_lens must be int32, got {block_tables.dtype}, "
                                  f"{context_lens.dtype}")


def _gather(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., W] block ids -> [..., W * block_size, Hkv, D] tokens in logical order."""
    gathered = pool[table]
    return gathered.reshape(*table.shape[:-1], -1, *pool.shape[2:])


def reference_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Gather + SDPA. With the lengths on the host (CPU), each sequence gathers exactly its own tokens; otherwise
    one batched gather, where junk table entries past a context are replaced by block 0 before the gather (they may
    be out of range) and everything gathered past the context is zeroed, so neither junk nor stale slots reach the
    output."""
    if context_lens.device.type == "cpu":
        return _decode_each_sequence(q, k_pool, v_pool, block_tables, context_lens, scale)
    return _decode_batched(q, k_pool, v_pool, block_tables, context_lens, scale)


def _decode_batched(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    lens = context_lens.long()
    used_blocks = (lens + block_size - 1) // block_size
    width = block_tables.shape[1]
    in_use = torch.arange(width, device=q.device) < used_blocks[:, None]
    table = torch.where(in_use, block_tables.long(), 0)
    positions = torch.arange(width * block_size, device=q.device)
    inside = positions < lens[:, None]  # [S, W * bs]
    keep = inside[:, :, None, None]
    keys = torch.where(keep, _gather(k_pool, table), 0).transpose(1, 2)  # [S, Hkv, W * bs, D]
    values = torch.where(keep, _gather(v_pool, table), 0).transpose(1, 2)
    # A padding row (context 0) may see position 0, whose K and V were just zeroed: its output is 0. Without
    # that, its mask would hide every key, which the CPU math backend turns into zeros but other SDPA backends
    # may turn into NaN.
    visible = inside | ((positions == 0) & (lens == 0)[:, None])
    # GQA folded as in attention.py: each KV head's query group is its query axis, no K/V repetition.
    queries = q.view(seqs, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(seqs, num_q_heads, head_dim)


def _decode_each_sequence(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence at a time, its first context_lens[s] slots only: no padding to the longest sequence and no
    masking pass. On 2 CPU cores (16 sequences of 100-640 tokens, SmolLM2's heads) 2.1 ms per layer against 10.0
    ms for the batched gather, which pads every row to the longest and zeroes what it masks. SDPA gets 4-D inputs:
    that is what sends it to the CPU flash kernel (3-D went to the unfused math path): a batch-1 decode layer took
    65 instead of 119 us there (2026-11-30)."""
    seqs = q.shape[0]
    lengths = context_lens.tolist()
    if seqs == 1 and lengths[0] > 0:  # batch-1 decode, the common CPU case: no output buffer to copy into
        return _attend_one(q[0], k_pool, v_pool, block_tables[0], lengths[0], scale)[None]
    out = torch.zeros_like(q)  # rows of context 0 (padding) stay zeros
    for s, length in enumerate(lengths):
        if length == 0:
            continue
        out[s] = _attend_one(q[s], k_pool, v_pool, block_tables[s], length, scale)
    return out


def _attend_one(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table_row: torch.Tensor, length: int,
                scale: float) -> torch.Tensor:
    """One sequence's query [Hq, D] over its first `length` cached tokens -> [Hq, D]."""
    num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    table = table_row[: -(-length // block_size)]
    keys = k_pool.index_select(0, table).view(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
    values = v_pool.index_select(0, table).view(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
    queries = q.view(num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(queries[None], keys[None], values[None], scale=scale)
    return out.reshape(num_q_heads, head_dim)


def decode_as_loops(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention as elementwise ops and reductions, for torch.compile on the CPU to fuse into loops that read
    each sequence's K/V straight from the pool (no gathered copy, no SDPA call).

    Why: a batch-1 decode token attends with 9 query heads to a few hundred keys, work far too small for SDPA's
    CPU kernel, whose per-call cost dominated (75 us a layer at 300 tokens), and a custom op's Python dispatch
    cost more again. In one compiled SmolLM2-135M step on 2 cores (bf16, int4 weights, 300 tokens of context) the
    step took 12.9 ms with gather + SDPA and 9.0 ms with this (2026-11-30).

    Every sequence reads the table's first W blocks (the CPU engine narrows the table to the longest sequence's
    blocks); positions past its own context are sent to slot 0 and masked, so neither junk table entries nor
    stale (possibly NaN) slots reach the output. Rows of context 0 give zeros. Math in fp32, output in q's dtype."""
    seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    t = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    inside = t[None, :] < context_lens.long()[:, None]  # [S, T]
    slots = torch.where(inside, block_tables.long()[:, t // block_size] * block_size + t % block_size, 0)
    keys = k_pool.view(-1, num_kv_heads, head_dim)[slots].float()  # [S, T, Hkv, D]
    values = torch.where(inside[:, :, None, None], v_pool.view(-1, num_kv_heads, head_dim)[slots].float(), 0.0)
    queries = q.view(seqs, 1, num_kv_heads, group, head_dim).float()
    scores = (queries * keys[:, :, :, None, :]).sum(-1) * scale  # [S, T, Hkv, group]
    scores = torch.where(inside[:, :, None, None], scores, float("-inf"))
    top = scores.amax(1, keepdim=True)
    weights = torch.exp(scores - torch.where(top == float("-inf"), 0.0, top))  # all masked: zeros, not NaN
    total = weights.sum(1)  # [S, Hkv, group]
    out = (weights[..., None] * values[:, :, :, None, :]).sum(1) / torch.where(total == 0, 1.0, total)[..., None]
    return out.reshape(seqs, num_q_heads, head_dim).to(q.dtype)


@torch.library.custom_op("ferry::paged_decode_attention", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return reference_decode(q, k_pool, v_pool, block_tables, context_lens, scale)


@_paged_decode_op.register_kernel("cuda")
def _paged_decode_cuda(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if decode_attention_path(q.device) != TRITON_PATH:
        return reference_decode(q, k_pool, v_pool, block_tables, context_lens, scale)
    from ferry.model.layers.paged_attention_kernel import paged_decode

    return paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale)


@_paged_decode_op.register_fake
def _paged_decode_fake(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention of one query token per sequence over its first context_lens[s] cached tokens.
    Query head h reads KV head h // (Hq // Hkv). Returns [S, Hq, D] in q's dtype; rows of context 0 are zeros."""
    _check(q, k_pool, v_pool, block_tables, context_lens)
    if q.device.type == "cpu":
        # Ferry's C++ op where it is built (a C++ op's dispatch costs a few microseconds); otherwise no custom op:
        # a Python one's dispatch cost ~40 us a layer in eager decode, and inside torch.compile the loops below fuse.
        if CPU_KERNEL_WANTED and k_pool.is_contiguous() and v_pool.is_contiguous() and cpu_kernels.attention_takes(
                *attention_heads(q.shape[-1], q.shape[1], k_pool.shape[2], k_pool.shape[1])):
            return torch.ops.ferry_cpu.paged_decode(q, k_pool, v_pool, block_tables, context_lens, float(scale))
        if torch.compiler.is_compiling():
            return decode_as_loops(q, k_pool, v_pool, block_tables, context_lens, float(scale))
        return reference_decode(q, k_pool, v_pool, block_tables, context_lens, float(scale))
    return torch.ops.ferry.paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, float(scale))


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_table_row: torch.Tensor, start: int, context_len: int, scale: float) -> torch.Tensor:
    """One sequence's prefill chunk: q [T, Hq, D] holds positions [start, start + T), whose K/V are already in the
    pool, and context_len == start + T. Each query sees the whole prefix and the chunk causally. Only the
    sequence's first context_len slots are gathered, so nothing stale can reach the output. Returns [T, Hq, D]."""
    tokens, num_q_heads, head_dim = q.shape
    if context_len != start + tokens or start < 0:
        raise PagedAttentionError(f"a chunk of {tokens} tokens at start {start} needs context_len {start + tokens}, "
                                  f"got {context_len}")
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    used_blocks = -(-context_len // block_size)
    if used_blocks > block_table_row.shape[0]:
        raise PagedAttentionError(f"context {context_len} needs {used_blocks} blocks, the table row lists "
                                  f"{block_table_row.shape[0]}")
    group = num_q_heads // num_kv_heads
    table = block_table_row[:used_blocks].long()
    keys = _gather(k_pool, table)[:context_len].transpose(0, 1)  # [Hkv, context, D]
    values = _gather(v_pool, table)[:context_len].transpose(0, 1)
    query_pos = torch.arange(start, context_len, device=q.device)
    mask = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]  # [T, context]
    queries = q.view(tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * tokens,
                                                                                        head_dim)
    mask = mask.repeat(group, 1)  # row g * T + t of the folded query axis is token t of group member g
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.view(num_kv_heads, group, tokens, head_dim).permute(2, 0, 1, 3).reshape(tokens, num_q_heads, head_dim)
