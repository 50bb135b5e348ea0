"""Runs Ferry's paged decode and prefill Triton kernels in Triton's CPU interpreter on small cases and prints, per
case, the largest error against float64 dense attention and against the gather + SDPA reference, as JSON.

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

from paged_cases import dense_attention, dense_decode, make_case

# (name, contexts, Hq, Hkv, D, block size, dtype, splits, tile)
CASES = [
    ("one split, group 4", [1, 16, 37, 0, 70], 8, 2, 32, 16, torch.float32, 1, 32),
    ("three splits, group 4", [1, 16, 37, 0, 70, 160], 8, 2, 32, 16, torch.float32, 3, 32),
    ("five splits, group 3, head 48, block 32", [33, 64, 0, 5, 190], 6, 2, 48, 32, torch.float32, 5, 32),
    ("two splits, group 1, bf16", [16, 1, 100], 2, 2, 32, 16, torch.bfloat16, 2, 16),
    ("four splits, group 2, fp16", [0, 129, 48], 4, 2, 64, 16, torch.float16, 4, 16),
]

# Prefill: (name, [(start, length)] per chunk, decode rows before the chunks, Hq, Hkv, D, block size, dtype)
PREFILL_CASES = [
    ("chunks at 0 and mid-block, one longer than a tile, group 4", [(0, 40), (21, 7), (48, 1), (5, 70)], 2, 8, 2, 32,
     16, torch.float32),
    ("group 3 padded to 4, block 32", [(33, 19), (0, 1)], 0, 6, 2, 48, 32, torch.float32),
    ("group 1, bf16", [(16, 20), (0, 33)], 1, 2, 2, 32, 16, torch.bfloat16),
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


def main() -> dict:
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
            "largest_output": float(dense.abs().max()),
        })
    results += [_prefill_case(i, *case) for i, case in enumerate(PREFILL_CASES)]
    return {"kernels": results, "engine": _engine_case()}


def _engine_case() -> dict:
    """The serving engine with its prefill chunks through the kernel (as on CUDA) and through the per-chunk
    reference: prompts sharing a cached prefix join every other step under a 40-token budget, so chunks start at
    many offsets beside decode rows. fp32 random weights: the same greedy tokens."""
    from ferry.bench.shapes import TINY, random_model
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams
    from ferry.model.layers import attention

    model = random_model(TINY, torch.device("cpu"), torch.float32, seed=5)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(10, 8000, (20,), generator=gen).tolist()
    prompts = [prefix + torch.randint(10, 8000, (5 + 13 * i,), generator=gen).tolist() for i in range(5)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def run(packed: bool = False) -> tuple[list[list[int]], int]:
        engine = Engine(model, None, num_blocks=64, max_batched_tokens=40, max_running=5, compile=False)
        if packed:  # what a GPU captures (prefill_graphs.py), run here without a graph
            engine.prefill_graphs = PrefillGraphs(model, engine.cache, engine.width, 5, 40,
                                                  model.layers[0].self_attn.group_size, None, capture=False)
        out: dict[int, list[int]] = {}
        ids, step = [], 0
        while len(ids) < len(prompts) or engine.has_unfinished():
            if len(ids) < len(prompts) and step % 2 == 0:
                ids.append(engine.add_request(prompts[len(ids)], params))
            for e in engine.step():
                out.setdefault(e.index, []).append(e.token_id)
            step += 1
        engine.check_no_leaks()
        if packed:
            counts["packed_steps"] = engine.stats.prefill_graph_steps
        return [out[i] for i in ids], engine.blocks.stats.prefix_hit_tokens

    from ferry.engine.prefill_graphs import PrefillGraphs
    from ferry.model.layers import paged_prefill_kernel

    counts = {}
    reference, _ = run()
    attention.prefill_attention_path = lambda device: attention.PREFILL_TRITON_PATH
    launches = {"all": 0, "beside_decodes": 0}
    launch = paged_prefill_kernel.paged_prefill

    def counted(q, k_pool, v_pool, layout, out, scale):
        launches["all"] += 1
        launches["beside_decodes"] += int(layout.meta[0]) > 0  # the first chunk starts after decode rows
        return launch(q, k_pool, v_pool, layout, out, scale)

    paged_prefill_kernel.paged_prefill = counted
    kernel, hits = run()
    packed, _ = run(packed=True)
    return {"tokens_equal": kernel == reference, "tokens": sum(map(len, kernel)), "prefix_hit_tokens": hits,
            **{f"kernel_launches_{k}": v for k, v in launches.items()},
            "packed_tokens_equal": packed == reference, **counts}


def _prefill_case(seed, name, spans, decode_rows, hq, hkv, d, bs, dtype) -> dict:
    """Chunks packed after `decode_rows` rows the kernel must not touch; each chunk's K/V (prefix and itself) in the
    pool as the engine leaves them before attention."""
    from ferry.model.layers.attention import PrefillChunk
    from ferry.model.layers.paged_attention import paged_prefill_attention
    from ferry.model.layers.paged_prefill_kernel import PrefillLayout, paged_prefill

    case = make_case([start + length for start, length in spans], hq, hkv, d, bs, dtype=dtype, seed=100 + seed)
    tokens = decode_rows + sum(length for _, length in spans)
    q = torch.randn(tokens, hq, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    chunks, row = [], decode_rows
    for s, (start, length) in enumerate(spans):
        chunks.append(PrefillChunk(row, length, start, case.block_tables[s]))
        row += length
    sentinel = 7.0
    out = torch.full_like(q, sentinel)
    paged_prefill(q, case.k_pool, case.v_pool, PrefillLayout.build(chunks, q.device, hq // hkv), out, case.scale)
    error_dense = error_reference = largest = 0.0
    for s, c in enumerate(chunks):
        got = out[c.q_start : c.q_start + c.length].double()
        dense = dense_attention(q[c.q_start : c.q_start + c.length], case.keys[s], case.values[s], case.scale,
                                torch.arange(c.start, c.context_len))
        ref = paged_prefill_attention(q[c.q_start : c.q_start + c.length], case.k_pool, case.v_pool, c.table,
                                      c.start, c.context_len, case.scale)
        error_dense = max(error_dense, float((got - dense).abs().max()))
        largest = max(largest, float(dense.abs().max()))
        error_reference = max(error_reference, float((got - ref.double()).abs().max()))
    return {
        "name": f"prefill: {name}",
        "dtype": str(dtype),
        "finite": bool(torch.isfinite(out).all()),
        "out_dtype": str(out.dtype),
        "max_error_vs_dense": error_dense,
        "max_error_vs_reference": error_reference,
        "zero_rows_are_zero": bool((out[:decode_rows] == sentinel).all()),  # rows outside the chunks untouched
        "largest_output": largest,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
