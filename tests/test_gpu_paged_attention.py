"""The paged decode Triton kernel on a GPU (skipped without CUDA): against float64 dense attention and the gather +
SDPA reference on the same GPU, in bf16 at Llama-3-8B's attention shape with contexts up to 4000, with one split and
with many, and inside a CUDA graph replayed with new context lengths and block tables written between replays."""

from __future__ import annotations

import pytest
import torch
from paged_cases import dense_decode, make_case

from ferry.model.layers.paged_attention import decode_attention_path, paged_decode_attention, reference_decode

pytestmark = pytest.mark.gpu
BF16_ATOL = 2e-2  # outputs are O(0.1..1): a few bf16 roundings of the output and of the softmax weights


def _contexts(batch: int, seed: int, longest: int = 4000) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ragged = torch.randint(1, longest + 1, (batch,), generator=gen).tolist()
    # A padding row, one token, a block boundary and one past it, the longest; short batches: the longest only.
    fixed = [0, 1, 16, 17, longest] if batch >= 8 else [longest]
    return fixed + ragged[len(fixed):]


def _check_against_dense_and_reference(case, out):
    contexts = case.context_lens.tolist()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    for s, c in enumerate(contexts):
        if c == 0:
            assert torch.equal(out[s], torch.zeros_like(out[s]))
    torch.testing.assert_close(out.double().cpu(), dense_decode(case), atol=BF16_ATOL, rtol=BF16_ATOL)
    ref = reference_decode(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=BF16_ATOL, rtol=BF16_ATOL)


def test_cuda_runs_the_triton_kernel():
    assert decode_attention_path("cuda") == "triton-split-k"


@pytest.mark.parametrize("batch", [64, 2], ids=["batch64-one-split", "batch2-many-splits"])
def test_kernel_matches_dense_attention_at_llama3_8b_shape_in_bf16(batch):
    from ferry.model.layers.paged_attention_kernel import choose_num_splits

    case = make_case(_contexts(batch, seed=batch), 32, 8, 128, 16, dtype=torch.bfloat16, seed=batch, device="cuda")
    splits = choose_num_splits(batch, 8, case.block_tables.shape[1] * 16, case.q.device)
    assert (splits == 1) if batch == 64 else (splits > 4), splits  # both kernel variants are exercised
    out = paged_decode_attention(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale)
    _check_against_dense_and_reference(case, out)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_kernel_with_head_dim_64_and_group_3_matches_dense(num_splits):
    from ferry.model.layers.paged_attention_kernel import paged_decode

    case = make_case(_contexts(8, seed=3, longest=1500), 9, 3, 64, 16, dtype=torch.bfloat16, seed=3, device="cuda")
    out = paged_decode(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens, case.scale,
                       num_splits=num_splits)
    _check_against_dense_and_reference(case, out)


@pytest.mark.parametrize("batch", [64, 2])
def test_kernel_in_a_cuda_graph_reads_context_lens_and_tables_written_between_replays(batch):
    case = make_case(_contexts(batch, seed=10 + batch), 32, 8, 128, 16, dtype=torch.bfloat16, seed=batch,
                     device="cuda")
    full_lens, full_tables = case.context_lens.clone(), case.block_tables.clone()
    q, tables, lens = case.q.clone(), case.block_tables.clone(), case.context_lens.clone()  # the static buffers

    def step():
        return paged_decode_attention(q, case.k_pool, case.v_pool, tables, lens, case.scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    gen = torch.Generator().manual_seed(batch)
    shorter = (full_lens.cpu() * torch.rand(batch, generator=gen)).to(torch.int32)
    shorter[-1] = 0  # a row that became padding
    rolled = torch.roll(torch.arange(batch), 1)
    for new_lens, new_tables in [(full_lens, full_tables), (shorter.cuda(), full_tables),
                                 (full_lens[rolled.cuda()], full_tables[rolled.cuda()])]:
        lens.copy_(new_lens)
        tables.copy_(new_tables)
        graph.replay()
        expected = reference_decode(q, case.k_pool, case.v_pool, tables, lens, case.scale)
        torch.testing.assert_close(out.float(), expected.float(), atol=BF16_ATOL, rtol=BF16_ATOL)
        zero = lens == 0
        assert torch.equal(out[zero], torch.zeros_like(out[zero]))


def test_torch_compile_calls_the_op_as_one_opaque_kernel():
    case = make_case(_contexts(4, seed=20, longest=700), 32, 8, 128, 16, dtype=torch.bfloat16, seed=20, device="cuda")

    @torch.compile(fullgraph=True)
    def attend(q, k_pool, v_pool, tables, lens):
        return paged_decode_attention(q * 1.0, k_pool, v_pool, tables, lens, case.scale) + 0.0

    out = attend(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens)
    _check_against_dense_and_reference(case, out)


@pytest.mark.parametrize("spans", [[(0, 512), (1500, 300), (37, 1), (2000, 48)], [(0, 2048)]],
                         ids=["mixed-chunks", "one-long-prompt"])
def test_prefill_kernel_matches_dense_and_the_per_chunk_reference_at_llama3_8b_shape(spans):
    """Every chunk of a step in one launch: prefixes up to 2000 cached tokens, chunks of 1..2048 tokens, four
    decode rows before them that it must leave alone."""
    from paged_cases import dense_attention

    from ferry.model.layers.attention import PrefillChunk
    from ferry.model.layers.paged_attention import paged_prefill_attention, prefill_attention_path
    from ferry.model.layers.paged_prefill_kernel import PrefillLayout, paged_prefill

    assert prefill_attention_path("cuda") == "triton-varlen"
    case = make_case([s + n for s, n in spans], 32, 8, 128, 16, dtype=torch.bfloat16, seed=len(spans), device="cuda")
    decode_rows = 4
    q = torch.randn(decode_rows + sum(n for _, n in spans), 32, 128, device="cuda").to(torch.bfloat16)
    chunks, row = [], decode_rows
    for s, (start, n) in enumerate(spans):
        chunks.append(PrefillChunk(row, n, start, case.block_tables[s]))
        row += n
    out = torch.full_like(q, 7.0)
    paged_prefill(q, case.k_pool, case.v_pool, PrefillLayout.build(chunks, q.device, 4), out, case.scale)
    assert torch.isfinite(out).all() and bool((out[:decode_rows] == 7.0).all())
    for s, c in enumerate(chunks):
        got = out[c.q_start : c.q_start + c.length]
        ref = paged_prefill_attention(q[c.q_start : c.q_start + c.length], case.k_pool, case.v_pool, c.table,
                                      c.start, c.context_len, case.scale)
        torch.testing.assert_close(got.float(), ref.float(), atol=BF16_ATOL, rtol=BF16_ATOL)
        if c.length <= 512:  # float64 dense attention on the host: keep it small
            dense = dense_attention(q[c.q_start : c.q_start + c.length], case.keys[s], case.values[s], case.scale,
                                    torch.arange(c.start, c.context_len))
            torch.testing.assert_close(got.double().cpu(), dense, atol=BF16_ATOL, rtol=BF16_ATOL)
