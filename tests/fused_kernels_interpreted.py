"""Runs Ferry's fused elementwise Triton kernels (ferry/model/layers/fused_kernels.py) in Triton's CPU interpreter
against the torch ops they replace and prints, per case, the largest difference as JSON.

    TRITON_INTERPRET=1 python tests/fused_kernels_interpreted.py

TRITON_INTERPRET must be set before triton is first imported, hence a separate process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ferry.model.layers.fused import rmsnorm_reference
from ferry.model.layers.fused_kernels import launch_add_rmsnorm, launch_rotary_kv_write, launch_silu_mul
from ferry.model.layers.rotary import apply_rotary_joint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpreter_bf16 import round_bf16_as_on_gpus  # noqa: E402


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def add_rmsnorm_cases(gen: torch.Generator) -> list[dict]:
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows, cols, with_residual in ((1, 64, True), (3, 100, True), (2, 100, False)):
            x = torch.randn(rows, cols, generator=gen).to(dtype)
            residual = torch.randn(rows, cols, generator=gen).to(dtype)
            weight = (torch.rand(cols, generator=gen) + 0.5).to(dtype)
            expected_residual = residual + x if with_residual else residual
            expected = rmsnorm_reference(expected_residual if with_residual else x, weight, 1e-5)
            kernel_residual = residual.clone()
            out = launch_add_rmsnorm(x, kernel_residual if with_residual else None, weight, 1e-5)
            results.append({"kernel": "add_rmsnorm", "dtype": str(dtype), "rows": rows, "cols": cols,
                            "residual": with_residual, "out_diff": _diff(out, expected),
                            "residual_diff": _diff(kernel_residual, expected_residual),
                            "out_dtype": str(out.dtype)})
    return results


def silu_mul_cases(gen: torch.Generator) -> list[dict]:
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        gate_up = (3 * torch.randn(3, 2 * 300, generator=gen)).to(dtype)  # 300: the masked tail of a block
        gate, up = gate_up.chunk(2, dim=-1)
        results.append({"kernel": "silu_mul", "dtype": str(dtype),
                        "out_diff": _diff(launch_silu_mul(gate_up), F.silu(gate) * up)})
    return results


def rotary_cases(gen: torch.Generator) -> list[dict]:
    """The kernel's q, and the pool slots it wrote, against apply_rotary_joint and indexed pool writes."""
    from ferry.model.config import RopeScaling
    from ferry.model.layers.rotary import RotaryEmbedding

    results = []
    for dtype, head_dim, bias in ((torch.float32, 16, False), (torch.bfloat16, 16, True), (torch.float32, 24, True)):
        q_heads, kv_heads, tokens, blocks, block_size = 4, 2, 5, 4, 4
        rotary = RotaryEmbedding(head_dim, 64, 10000.0, RopeScaling())
        rotary.build_tables(torch.device("cpu"))
        width = (q_heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(tokens, width, generator=gen).to(dtype)
        b = torch.randn(width, generator=gen).to(dtype) if bias else None
        positions = torch.tensor([0, 7, 3, 40, 63])
        slots = torch.tensor([5, 0, 15, 9, 2])
        k_pool = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype)
        v_pool = torch.zeros_like(k_pool)
        q = launch_rotary_kv_write(qkv, b, positions, rotary.cos, rotary.sin, slots, k_pool, v_pool, q_heads, kv_heads,
                                   head_dim)
        full = qkv + b if bias else qkv
        cos, sin = rotary.tables_for(positions.view(1, -1), dtype)
        qk = full[:, : (q_heads + kv_heads) * head_dim].view(1, tokens, q_heads + kv_heads, head_dim)
        ref_q, ref_k = apply_rotary_joint(qk, q_heads, cos, sin)
        ref_v = full[:, (q_heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
        k_flat, v_flat = k_pool.view(-1, kv_heads, head_dim), v_pool.view(-1, kv_heads, head_dim)
        untouched = torch.ones(blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        results.append({"kernel": "rotary_kv_write", "dtype": str(dtype), "head_dim": head_dim, "bias": bias,
                        "q_diff": _diff(q, ref_q[0]), "k_diff": _diff(k_flat[slots], ref_k[0]),
                        "v_diff": _diff(v_flat[slots], ref_v),
                        "other_slots_untouched": bool((k_flat[untouched] == 0).all() and (v_flat[untouched] == 0).all())})
    return results


if __name__ == "__main__":
    round_bf16_as_on_gpus()
    generator = torch.Generator().manual_seed(11)
    print(json.dumps(add_rmsnorm_cases(generator) + silu_mul_cases(generator) + rotary_cases(generator)))
