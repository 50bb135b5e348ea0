"""Paged-cache test cases shared by the CPU, interpreter and GPU tests of paged attention: contiguous K/V per
sequence scattered into shuffled blocks of a pool whose every other slot is NaN, and dense attention computed in
float64 straight from the contiguous K/V (an independent reference: no gather, no SDPA, K/V repeated per head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    q: torch.Tensor  # [S, Hq, D]
    k_pool: torch.Tensor  # [blocks, bs, Hkv, D], views into kv like the engine's cache
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # [S, W] int32
    context_lens: torch.Tensor  # [S] int32
    keys: list[torch.Tensor]  # per sequence, [context, Hkv, D], contiguous
    values: list[torch.Tensor]
    scale: float


def make_case(contexts: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype = torch.float32, seed: int = 0, width: int | None = None, spare_blocks: int = 3,
              device: str | torch.device = "cpu") -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in contexts]
    width = width or max(max(needed), 1) + 1  # at least one junk entry per row
    num_blocks = sum(needed) + spare_blocks
    # One tensor for every layer and K/V, as the engine allocates it: the pools are views of layer 1 of 2.
    kv = torch.full((2, 2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    k_pool, v_pool = kv[1, 0], kv[1, 1]
    order = torch.randperm(num_blocks, generator=gen)
    free = order[sum(needed):]  # never written: NaN, and where junk table entries point
    tables = torch.empty(len(contexts), width, dtype=torch.int32)
    keys, values, taken = [], [], 0
    for s, (context, blocks) in enumerate(zip(contexts, needed)):
        mine = order[taken: taken + blocks]
        taken += blocks
        tables[s, :blocks] = mine.to(torch.int32)
        tables[s, blocks:] = free[torch.randint(len(free), (width - blocks,), generator=gen)].to(torch.int32)
        k = torch.randn(context, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(context, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(context)
        k_pool[mine[pos // block_size], pos % block_size] = k
        v_pool[mine[pos // block_size], pos % block_size] = v
        keys.append(k)
        values.append(v)
    q = torch.randn(len(contexts), num_q_heads, head_dim, generator=gen).to(dtype)
    dev = torch.device(device)
    kv = kv.to(dev)  # moved whole, so the pools stay views of one tensor there too
    return PagedCase(q.to(dev), kv[1, 0], kv[1, 1], tables.to(dev),
                     torch.tensor(contexts, dtype=torch.int32, device=dev), keys, values, head_dim ** -0.5)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] against contiguous k, v [context, Hkv, D] in float64; query head h reads KV head h // group.
    With query_positions, query t sees keys [0, position_t] (causal); without, every key. Context 0: zeros."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,chd->htc", q.double().cpu(), k.cpu()) * scale
    if query_positions is not None:
        visible = torch.arange(k.shape[0])[None, :] <= query_positions.cpu()[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htc,chd->thd", scores.softmax(-1), v.cpu())


def dense_decode(case: PagedCase) -> torch.Tensor:
    """[S, Hq, D] float64: each sequence's query against its own contiguous K/V."""
    return torch.cat([dense_attention(case.q[s: s + 1], case.keys[s], case.values[s], case.scale)
                      for s in range(case.q.shape[0])])
