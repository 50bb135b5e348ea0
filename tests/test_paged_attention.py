"""Attention over the paged KV cache on CPU: the gather + SDPA reference against float64 dense attention over
contiguous K/V (shuffled blocks, GQA, ragged contexts, padding rows, NaN in every slot no sequence owns), the
prefill chunk, input checks, and the Triton kernel in Triton's interpreter and through the real sm_90 compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paged_cases import dense_attention, dense_decode, make_case

from ferry.model.layers.paged_attention import (
    PagedAttentionError,
    decode_attention_path,
    paged_decode_attention,
    paged_prefill_attention,
)

BS = 16
# One token, exactly one block, one past a block boundary, ragged lengths, and a padding row.
CONTEXTS = [1, BS, BS + 1, 3 * BS, 57, 0, 5 * BS - 1]


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)], ids=["group1", "group3", "group4"])
def test_reference_decode_equals_dense_attention_over_contiguous_kv(num_q_heads, num_kv_heads):
    case = make_case(CONTEXTS, num_q_heads, num_kv_heads, 32, BS, seed=num_q_heads)
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-6, rtol=1e-5)


def test_padding_rows_of_context_zero_are_zeros():
    case = make_case([0, 20, 0], 4, 2, 32, BS, seed=3)
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0


def test_nan_in_free_blocks_stale_slots_and_junk_table_entries_does_not_leak():
    # make_case fills every slot no sequence owns with NaN (free blocks, the tail of each last block) and points
    # every junk table entry at a free block; the case is only meaningful if NaN is really there to leak.
    case = make_case(CONTEXTS, 8, 2, 32, BS, seed=5)
    assert torch.isnan(case.k_pool).any() and torch.isnan(case.v_pool).any()
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    assert torch.isfinite(out).all()


def test_junk_table_entries_out_of_the_pool_are_never_gathered():
    case = make_case([5, 33], 4, 2, 32, BS, seed=6, width=6)
    tables = case.block_tables.clone()
    tables[0, 1:] = 1 << 30
    tables[1, 3:] = -7
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, tables, case.context_lens, case.scale)
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-6, rtol=1e-5)


def test_reference_decode_in_bf16_stays_within_bf16_rounding_of_dense():
    case = make_case(CONTEXTS, 8, 2, 64, BS, dtype=torch.bfloat16, seed=7)
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-2, rtol=2e-2)


def test_prefill_chunk_in_the_middle_of_a_sequence_equals_dense_causal_attention():
    start, tokens = 21, 26  # the chunk starts inside block 1 and ends inside block 2
    case = make_case([start + tokens], 6, 2, 32, BS, seed=8)
    q = torch.randn(tokens, 6, 32, generator=torch.Generator().manual_seed(9))
    out = paged_prefill_attention(q, case.k_pool, case.v_pool, case.block_tables[0], start, start + tokens,
                                  case.scale)
    expected = dense_attention(q, case.keys[0], case.values[0], case.scale,
                               query_positions=torch.arange(start, start + tokens))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_prefill_from_position_zero_is_plain_causal_attention():
    case = make_case([BS * 2], 4, 4, 32, BS, seed=10)
    q = torch.randn(BS * 2, 4, 32, generator=torch.Generator().manual_seed(11))
    out = paged_prefill_attention(q, case.k_pool, case.v_pool, case.block_tables[0], 0, BS * 2, case.scale)
    expected = dense_attention(q, case.keys[0], case.values[0], case.scale, query_positions=torch.arange(BS * 2))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_prefill_refuses_a_context_len_that_is_not_start_plus_chunk():
    case = make_case([40], 4, 2, 32, BS)
    with pytest.raises(PagedAttentionError, match="needs context_len 40, got 41"):
        paged_prefill_attention(case.q[:1].expand(8, -1, -1), case.k_pool, case.v_pool, case.block_tables[0], 32, 41,
                                case.scale)


@pytest.mark.parametrize("change,message", [
    (lambda c: {"k_pool": c.k_pool.to(torch.float16), "v_pool": c.v_pool.to(torch.float16)}, "share a dtype"),
    (lambda c: {"block_tables": c.block_tables.long()}, "must be int32"),
    (lambda c: {"q": c.q[:, :3]}, "multiple of Hkv"),
    (lambda c: {"k_pool": c.k_pool[:, :12], "v_pool": c.v_pool[:, :12]}, "block size 12 must be a power of two"),
    (lambda c: {"context_lens": c.context_lens[:1]}, "context_lens \\[S\\]"),
])
def test_bad_shapes_and_dtypes_are_refused_by_name(change, message):
    case = make_case([20, 3], 4, 2, 32, BS)
    args = {"q": case.q, "k_pool": case.k_pool, "v_pool": case.v_pool, "block_tables": case.block_tables,
            "context_lens": case.context_lens, "scale": case.scale}
    with pytest.raises(PagedAttentionError, match=message):
        paged_decode_attention(**{**args, **change(case)})


def test_decode_path_is_named_per_device(monkeypatch):
    from ferry.model.layers import cpu_kernels, paged_attention

    if cpu_kernels.load() is None:  # Ferry's C++ kernel, eager and compiled
        assert decode_attention_path("cpu") == decode_attention_path("cpu", compiled=True) == "ferry-cpu"
        # heads its vector path does not take run torch's path, and are named so
        assert decode_attention_path("cpu", heads=(72, 1, 16)) == "gather-sdpa"
        assert decode_attention_path("cpu", compiled=True, heads=(64, 12, 16)) == "inductor-loops"
        monkeypatch.setattr(cpu_kernels, "_vector_attention", False)  # a CPU without AVX-512: torch's paths
        assert decode_attention_path("cpu") == "gather-sdpa"
        monkeypatch.undo()
    monkeypatch.setattr(paged_attention, "CPU_KERNEL_WANTED", False)  # FERRY_CPU_ATTENTION=0, or no kernels
    assert decode_attention_path("cpu") == "gather-sdpa"
    assert decode_attention_path("cpu", compiled=True) == "inductor-loops"
    try:
        import triton  # noqa: F401
    except ImportError:
        assert decode_attention_path("cuda").startswith("gather-sdpa (triton not importable: ")
    else:
        assert decode_attention_path("cuda") == decode_attention_path("cuda:1") == "triton-split-k"


def test_the_op_is_registered_with_a_fake_impl_so_compile_sees_one_opaque_call():
    case = make_case([20, 0, 3], 4, 2, 32, BS, seed=12)
    args = (case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    torch.library.opcheck(torch.ops.ferry.paged_decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.ferry.paged_decode_attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                        for a in args))
    assert fake.shape == case.q.shape and fake.dtype == case.q.dtype


def test_triton_kernels_in_the_interpreter_match_dense_and_the_reference():
    """The decode kernel itself (split and reduce) and the prefill kernel (chunks at several offsets, tiles, padded
    query groups; rows outside the chunks untouched) on CPU; bf16 and fp16 tolerances are a few output roundings.
    And the serving engine with its prefills through the kernel: the per-chunk path's tokens."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("paged_attention_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(script.parents[1])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    engine = doc["engine"]
    assert engine["tokens_equal"] and engine["tokens"] == 30 and engine["prefix_hit_tokens"] >= 16, engine
    assert engine["kernel_launches_beside_decodes"] > 0, engine  # chunks and decode rows in one step
    # the layout a GPU captures for small prefill steps (every sequence a chunk of a fixed grid), run uncaptured
    assert engine["packed_tokens_equal"] and engine["packed_steps"] > 0, engine
    results = doc["kernels"]
    assert len(results) == 8 and sum(r["name"].startswith("prefill") for r in results) == 3
    for r in results:
        assert r["finite"] and r["zero_rows_are_zero"] and r["out_dtype"] == r["dtype"], r
        # bf16/fp16: a few roundings of the output (the probabilities are rounded to the dtype of V for the
        # second product, as in flash attention: ~2^-8 of the output's size in bf16).
        tolerance = 1e-6 if r["dtype"] == "torch.float32" else 1e-2 * max(1.0, r["largest_output"])
        assert r["max_error_vs_dense"] < tolerance and r["max_error_vs_reference"] < tolerance, r


def _compile_for_hopper(kernel, signature: dict, constexprs: dict):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # As the launcher specialises them: 16-byte aligned tensors, strides that are multiples of 16 (all at D=128).
    names = list(signature)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, kind in signature.items()
               if kind.startswith("*") or (n.startswith("stride") and n != "stride_ts")}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@pytest.mark.parametrize("num_splits", [1, 4])
def test_split_kernel_compiles_for_hopper_with_the_real_compiler(num_splits):
    """The interpreter accepts code the compiler rejects; Triton's real pipeline down to a cubin needs no GPU.
    Llama-3-8B's attention: D=128, block 16, bf16, group 4 (padded to 16 rows for the tensor cores)."""
    pytest.importorskip("triton")
    from ferry.model.layers.paged_attention_kernel import TILE_TOKENS, paged_decode_split_kernel

    ints = ["stride_qs", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt", "stride_vh",
            "stride_ts", "stride_os", "stride_oh"]
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "tables_ptr": "*i32", "lens_ptr": "*i32",
                 "out_ptr": "*bf16", "lse_ptr": "*fp32", "partial_ptr": "*fp32", "scale": "fp32",
                 **{name: "i32" for name in ints}}
    constexprs = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_SIZE": 16,
                  "TILE": TILE_TOKENS, "NUM_SPLITS": num_splits, "DOT_PRECISION": "ieee"}
    compiled = _compile_for_hopper(paged_decode_split_kernel, signature, constexprs)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx  # both products on the tensor cores
    # Gathered K/V rows still move 16 bytes per access, asynchronously into shared memory (cp.async.cg only
    # copies 16-byte vectors); a 2-byte load per element would cap the kernel far below HBM bandwidth.
    assert "cp.async.cg.shared.global" in ptx, sorted({line.split()[0] for line in ptx.splitlines() if "ld." in line})


def test_reduce_kernel_compiles_for_hopper_with_the_real_compiler():
    pytest.importorskip("triton")
    from ferry.model.layers.paged_attention_kernel import TILE_TOKENS, paged_decode_reduce_kernel

    signature = {"lse_ptr": "*fp32", "partial_ptr": "*fp32", "lens_ptr": "*i32", "out_ptr": "*bf16",
                 "stride_os": "i32", "stride_oh": "i32"}
    constexprs = {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 6, "SPLITS_PAD": 8, "TILE": TILE_TOKENS}
    assert _compile_for_hopper(paged_decode_reduce_kernel, signature, constexprs).asm["cubin"]


@pytest.mark.parametrize("fixed_grid", [False, True], ids=["exact-grid", "fixed-grid"])
def test_prefill_kernel_compiles_for_hopper_on_the_tensor_cores(fixed_grid):
    """Llama-3-8B's prefill: D=128, block 16, bf16, group 4 -> 32 tokens x 4 heads = 128 rows a program; the
    fixed grid is what a captured prefill step launches."""
    pytest.importorskip("triton")
    from ferry.model.layers.paged_prefill_kernel import KV_TILE, paged_prefill_kernel, tile_tokens_for

    ints = ["tiles_at", "count_at", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt",
            "stride_vh", "stride_ot", "stride_oh"]
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "meta_ptr": "*i32",
                 "tables_ptr": "*i32", **{name: "i32" for name in ints[:2]}, "scale": "fp32",
                 **{name: "i32" for name in ints[2:]}}
    constexprs = {"GROUP": 4, "GROUP_PAD": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_SIZE": 16,
                  "TILE_T": tile_tokens_for(4), "TILE_K": KV_TILE, "DOT_PRECISION": "ieee",
                  "FIXED_GRID": fixed_grid}
    compiled = _compile_for_hopper(paged_prefill_kernel, signature, constexprs)
    assert compiled.asm["cubin"]
    assert "bf16" in compiled.asm["ptx"] and ("mma.sync" in compiled.asm["ptx"] or "wgmma" in compiled.asm["ptx"])


def test_kernel_benchmark_runs_on_cpu_with_reference_and_dense_rows(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "paged_attention_kernels.py"
    command = [sys.executable, str(script), "--device", "cpu", "--batches", "2", "--contexts", "40", "--replays", "1",
               "--out", str(tmp_path)]
    out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(script.parents[1])})
    assert out.returncode == 0, out.stderr[-3000:]
    [doc] = [json.loads(p.read_text()) for p in tmp_path.glob("*_paged_attention_cpu.json")]
    cpu_path = decode_attention_path("cpu")
    assert doc["decode_path"] == cpu_path and doc["copy_bandwidth_GBps"] > 0
    kernel = ["ferry-cpu"] if cpu_path == "ferry-cpu" else []
    assert [r["path"] for r in doc["results"]] == [*kernel, "gather-sdpa", "dense-sdpa"]
    for row in doc["results"]:
        assert row["us"] > 0 and row["GBps"] > 0 and row["max_abs_err"] < 1e-5, row
    assert (tmp_path / f"{doc['date']}_paged_attention_cpu.md").exists()


def test_the_batched_gather_path_that_gpus_without_triton_take_is_exact_and_nan_safe_too():
    """CPU runs one sequence at a time; the batched gather (lengths on the device, no host sync) is what a GPU
    without Triton runs: the same answer, no NaN from free blocks or junk entries, zeros for padding rows."""
    from ferry.model.layers.paged_attention import _decode_batched

    case = make_case(CONTEXTS, 8, 2, 32, BS, seed=5)
    out = _decode_batched(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (9, 3)], ids=["group1", "group3"])
def test_attention_as_loops_equals_dense_with_nan_slots_junk_entries_and_padding_rows(num_q_heads, num_kv_heads):
    """What a compiled CPU decode step runs, here eagerly: the same answer as dense attention; free blocks and
    stale slots hold NaN, junk table entries point out of the pool, rows of context 0 are zeros."""
    from ferry.model.layers.paged_attention import decode_as_loops

    case = make_case(CONTEXTS, num_q_heads, num_kv_heads, 32, BS, seed=13)
    tables = case.block_tables.clone()
    tables[0, 1:] = 1 << 30  # context 1: everything past its one block is junk, far out of the pool
    tables[5, :] = -7  # the padding row's whole table is junk
    assert torch.isnan(case.k_pool).any()
    out = decode_as_loops(case.q, case.k_pool, case.v_pool, tables, case.context_lens, case.scale)
    assert out.dtype == case.q.dtype and torch.equal(out[5], torch.zeros_like(out[5]))
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-6, rtol=1e-5)


def test_inside_torch_compile_the_cpu_decode_runs_as_fused_loops_and_still_equals_dense(monkeypatch):
    from ferry.model.layers import paged_attention

    monkeypatch.setattr(paged_attention, "CPU_KERNEL_WANTED", False)  # the path without Ferry's C++ kernel
    case = make_case([5, 40, 0, 17], 6, 2, 32, BS, seed=14)
    traced = []
    loops = paged_attention.decode_as_loops
    monkeypatch.setattr(paged_attention, "decode_as_loops", lambda *args: traced.append(1) or loops(*args))

    def step(q, k_pool, v_pool, tables, lens):
        return paged_decode_attention(q, k_pool, v_pool, tables, lens, case.scale) * 1.0

    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=False, fullgraph=True)  # fullgraph: no opaque call, no graph break
    out = compiled(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens)
    assert traced, "the compiled step did not trace the loops"
    torch.testing.assert_close(out.double(), dense_decode(case), atol=2e-6, rtol=1e-5)


def test_with_ferry_cpu_kernels_cpu_decode_is_one_opaque_op_eager_and_compiled_and_equals_dense(monkeypatch):
    from ferry.model.layers import cpu_kernels, paged_attention

    if cpu_kernels.load() is not None:
        pytest.skip(f"Ferry's CPU kernels are not built here: {cpu_kernels.load()}")
    case = make_case([5, 40, 0, 17], 6, 2, 32, BS, seed=15)
    monkeypatch.setattr(paged_attention, "decode_as_loops", lambda *args: pytest.fail("traced the loops"))

    def step(q, k_pool, v_pool, tables, lens):
        return paged_decode_attention(q, k_pool, v_pool, tables, lens, case.scale) * 1.0

    eager = step(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens)
    torch.testing.assert_close(eager.double(), dense_decode(case), atol=2e-6, rtol=1e-5)
    torch._dynamo.reset()
    gm_ops = []

    def backend(gm, inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    out = torch.compile(step, backend=backend, dynamic=False, fullgraph=True)(
        case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens)
    assert any("ferry_cpu.paged_decode" in name for name in gm_ops), gm_ops
    torch.testing.assert_close(out, eager)
