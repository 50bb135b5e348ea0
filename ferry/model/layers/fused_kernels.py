"""Triton kernels that each replace a run of small elementwise ops of a decoder layer with one launch.

Why: a CUDA-graph decode step of the Llama-3-8B shape ran 1426 kernels on an H200, 1168 of them elementwise (36
a layer: an fp32 RMSNorm alone is 8 launches), 1.9 ms of a 6.7 ms step
(benchmarks/results/2026-11-30_decode_paths_llama3-8b.md). At batch 1 each of those kernels moves a few KiB, so
its cost is the launch, not the bytes.

Each kernel rounds where the torch ops it replaces round (a bf16 result of every op that had one), so outputs
match the unfused path up to the order of the fp32 sum inside a norm:
  - add_rmsnorm_kernel: residual += x (optional), out = weight * rmsnorm(residual), one program per row;
  - silu_mul_kernel: silu(gate) * up of a fused gate|up projection's output;
  - rotary_kv_write_kernel: q, k and v of a fused qkv projection (+ its bias): rotary on q and k, q written out,
    k and v stored in their KV-pool slots (what the attention then reads through the block table).
The launchers take any device (Triton's interpreter runs them on CPU in the tests); ferry/model/layers/fused.py
decides when they run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """fp32 `x` rounded to `dtype` and widened back, where torch rounds an intermediate result. For bf16 the rounding
    (to nearest, ties to even) is done on the raw bits: Triton's compiler folds a truncate-then-extend pair (and a
    round trip through a bitcast) back to the fp32 value, which left some of the rotary kernel's outputs one bf16
    step off the torch ops on an H200; with integer rounding all were equal (tests/test_gpu_fused.py). fp16 keeps
    the plain casts."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(dtype).to(tl.float32)
    else:
        return x


@triton.jit
def rmsnorm_row(h32, dtype: tl.constexpr, w_ptr, cols, mask, n_cols, eps):
    """weight * rmsnorm(h) for one row held in registers as fp32 values of `dtype`, rounded as RMSNorm.forward
    rounds (ferry/model/layers/norm.py): the normalised row in `dtype`, then the product with the weight in the
    weight's dtype."""
    mean_square = tl.sum(h32 * h32, axis=0) / n_cols
    normed = rounded(h32 * tl.math.rsqrt(mean_square + eps), dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * normed).to(w.dtype)


@triton.jit
def add_rmsnorm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                       HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    h32 = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h32 = rounded(r.to(tl.float32) + h32, x.dtype)  # the residual add, rounded as torch's add rounds
        tl.store(residual_ptr + row * stride_r + cols, h32.to(x.dtype), mask=mask)
    tl.store(out_ptr + row * stride_o + cols, rmsnorm_row(h32, x.dtype, w_ptr, cols, mask, n_cols, eps), mask=mask)


@triton.jit
def silu_mul_kernel(in_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = rounded(g / (1.0 + tl.exp(-g)), gate.dtype)  # F.silu's result, rounded to the activations' dtype
    tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


@triton.jit
def rotary_kv_write_kernel(qkv_ptr, bias_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr,
                           stride_qkv, stride_table, stride_slot,
                           Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HALF_PAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (token, head) over the Q_HEADS + 2 * KV_HEADS heads of one token's qkv row."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)
    mask = d < half
    src = qkv_ptr + token * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + half + d, mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_BIAS:  # the projection's bias, added (and rounded) before rotary as ColumnParallelLinear adds it
        a1 = rounded(a1 + tl.load(bias_ptr + head * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32), dtype)
        a2 = rounded(a2 + tl.load(bias_ptr + head * HEAD_DIM + half + d, mask=mask, other=0.0).to(tl.float32), dtype)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if head < Q_HEADS + KV_HEADS:
        # x * cos + rotate_half(x) * sin, with the fp32 tables rounded to the activations' dtype first and each
        # product rounded, as the torch ops do (rotary.py); the roundings also keep the compiler from contracting
        # a product and the sum into one FMA.
        pos = tl.load(pos_ptr + token).to(tl.int64)
        c1 = rounded(tl.load(cos_ptr + pos * stride_table + d, mask=mask, other=0.0), dtype)
        c2 = rounded(tl.load(cos_ptr + pos * stride_table + half + d, mask=mask, other=0.0), dtype)
        s1 = rounded(tl.load(sin_ptr + pos * stride_table + d, mask=mask, other=0.0), dtype)
        s2 = rounded(tl.load(sin_ptr + pos * stride_table + half + d, mask=mask, other=0.0), dtype)
        r1 = (rounded(a1 * c1, dtype) - rounded(a2 * s1, dtype)).to(dtype)
        r2 = (rounded(a2 * c2, dtype) + rounded(a1 * s2, dtype)).to(dtype)
        if head < Q_HEADS:
            dst = q_out_ptr + (token * Q_HEADS + head) * HEAD_DIM
        else:
            dst = k_pool_ptr + slot * stride_slot + (head - Q_HEADS) * HEAD_DIM
        tl.store(dst + d, r1, mask=mask)
        tl.store(dst + half + d, r2, mask=mask)
    else:
        dst = v_pool_ptr + slot * stride_slot + (head - Q_HEADS - KV_HEADS) * HEAD_DIM
        tl.store(dst + d, a1.to(dtype), mask=mask)  # exact: a1 holds a value of `dtype`
        tl.store(dst + half + d, a2.to(dtype), mask=mask)


# -- launchers: shapes checked here, so a kernel never reads out of bounds --------------------------------------


def launch_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> torch.Tensor:
    """x (and residual) [..., n]; residual updated in place to residual + x; returns weight * rmsnorm(that)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    r2 = residual.view(-1, n) if residual is not None else x2
    assert x2.stride(-1) == 1 and r2.stride(-1) == 1 and weight.numel() == n
    block = triton.next_power_of_2(n)
    add_rmsnorm_kernel[(rows,)](x2, r2, weight, out, n, eps, x2.stride(0), r2.stride(0), n,
                                HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=norm_warps(block))
    return out


def launch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2n] (gate first) -> silu(gate) * up [..., n]."""
    n = gate_up.shape[-1] // 2
    g2 = gate_up.reshape(-1, 2 * n)
    assert g2.stride(-1) == 1
    out = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](g2, out, n, g2.stride(0), n, BLOCK=block, num_warps=4)
    return out


def launch_rotary_kv_write(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           q_heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [tokens, (q_heads + 2 kv_heads) * head_dim]; positions, slots [tokens]; cos/sin [max_pos, head_dim] fp32;
    pools [blocks, block_size, kv_heads, head_dim]. Writes k, v at their slots; returns rotated q [tokens, q_heads,
    head_dim]."""
    tokens = qkv.shape[0]
    assert qkv.shape[1] == (q_heads + 2 * kv_heads) * head_dim and qkv.stride(1) == 1 and head_dim % 2 == 0
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape[-2:] == (kv_heads, head_dim)
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[-1] == head_dim
    q = torch.empty((tokens, q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    rotary_kv_write_kernel[(tokens, q_heads + 2 * kv_heads)](
        qkv, bias if bias is not None else qkv, positions, cos, sin, slots, q, k_pool, v_pool,
        qkv.stride(0), cos.stride(0), kv_heads * head_dim,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, HALF_PAD=triton.next_power_of_2(head_dim // 2),
        HAS_BIAS=bias is not None, num_warps=1)
    return q


def norm_warps(block: int) -> int:
    """Warps of a program that normalises one row of `block` columns. Every kernel that norms a row uses this, so
    the fused all-reduce + add + RMSNorm sums a row's squares in the same order as the add+RMSNorm kernel and both
    paths give the same bits."""
    return max(4, min(16, block // 256))
