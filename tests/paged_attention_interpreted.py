"""Runs Ferry's paged decode Triton kernel in Triton's CPU interpreter on small cases and prints, per case, its
largest error against float64 dense attention and against the gather + SDPA reference, as JSON.

    TRITON_INTERPRET=1 python tests/paged_attention_interpreted.py

TRITON_INTERPRET must be set before triton is first imported, hence a separate process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paged_cases import dense_decode, make_case  # noqa: E402

# (name, contexts, Hq, Hkv, D, block size, dtype, splits, tile)
CASES = [
    ("one split, group 4", [1, 16, 37, 0, 70], 8, 2, 32, 16, torch.float32, 1, 32),
    ("three splits, group 4", [1, 16, 37, 0, 70, 160], 8, 2, 32, 16, torch.float32, 3, 32),
    ("five splits, group 3, head 48, block 32", [33, 64, 0, 5, 190], 6, 2, 48, 32, torch.float32, 5, 32),
    ("two splits, group 1, bf16", [16, 1, 100], 2, 2, 32, 16, torch.bfloat16, 2, 16),
    ("four splits, group 2, fp16", [0, 129, 48], 4, 2, 64, 16, torch.float16, 4, 16),
]


def _bf16_dot_as_on_gpus() -> None:
    """Triton 3.9's interpreter holds bf16 as uint16 in numpy, and its tl.dot multiplies those bit patterns (a dot
    of two bf16 N(0, 1) tiles comes out near 1e10). GPUs multiply bf16 exactly into an fp32 accumulator, so widen
    bf16 operands to the fp32 values they stand for before the interpreter's matmul."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def main() -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from ferry.model.layers.paged_attention import reference_decode
    from ferry.model.layers.paged_attention_kernel import paged_decode

    _bf16_dot_as_on_gpus()
    results = []
    for i, (name, contexts, hq, hkv, d, bs, dtype, splits, tile) in enumerate(CASES):
        case = make_case(contexts, hq, hkv, d, bs, dtype=dtype, seed=i)
        out = paged_decode(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale,
                           num_splits=splits, tile=tile)
        ref = reference_decode(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
        dense = dense_decode(case)
        zero_rows = [s for s, c in enumerate(contexts) if c == 0]
        results.append({
            "name": name,
            "dtype": str(dtype),
            "finite": bool(torch.isfinite(out).all()),
            "out_dtype": str(out.dtype),
            "max_error_vs_dense": float((out.double() - dense).abs().max()),
            "max_error_vs_reference": float((out.double() - ref.double()).abs().max()),
            "zero_rows_are_zero": all(bool((out[s] == 0).all()) for s in zero_rows),
        })
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
