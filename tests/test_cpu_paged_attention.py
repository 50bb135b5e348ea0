"""Ferry's CPU paged decode attention (cpu_paged_attention.cpp, `ferry_cpu::paged_decode`): K/V read in place
through the block table, split over the context when a step has few heads; equal to dense attention over the
contiguous K/V (float64) with NaN in every slot it must not read, junk table entries, padding rows, GQA groups,
bf16 and fp32; its vector and scalar paths agree; torch.compile takes it as one op."""

from __future__ import annotations

import pytest
import torch
from paged_cases import dense_decode, make_case

from ferry.model.layers import cpu_kernels

if cpu_kernels.load() is not None:
    pytest.skip(f"Ferry's CPU kernels are not built here: {cpu_kernels.load()}", allow_module_level=True)


def _run(case, vector: bool = True) -> torch.Tensor:
    return torch.ops.ferry_cpu.paged_decode(case.q, case.k_pool, case.v_pool, case.block_tables, case.context_lens,
                                            case.scale, vector)


# (contexts, Hq, Hkv, D): SmolLM2's heads at batch 1 (context split over threads) and batched; Llama's 128-wide
# heads; MHA; a group too large for the vector path's registers (scalar); a head size it does not take (scalar).
CASES = [([517], 9, 3, 64), ([1, 40, 300, 17, 1024], 9, 3, 64), ([250, 3], 32, 8, 128), ([70, 33], 4, 4, 32),
         ([90], 12, 1, 64), ([65, 7], 6, 2, 24)]


@pytest.mark.parametrize("contexts, hq, hkv, dim", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_decode_equals_dense_attention_and_never_reads_nan_slots(contexts, hq, hkv, dim, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1: one split per head pair; 2: a batch-1 context is split and merged
    try:
        seed = int(torch.randint(1 << 30, ()))  # fresh inputs each run
        case = make_case(contexts, hq, hkv, dim, 16, seed=seed)
        out = _run(case)
        assert out.shape == case.q.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), dense_decode(case), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
        torch.testing.assert_close(_run(case, vector=False), out, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_bf16_stays_within_bf16_rounding_and_padding_rows_are_zeros():
    case = make_case([0, 200, 0, 31], 9, 3, 64, 16, dtype=torch.bfloat16, seed=int(torch.randint(1 << 30, ())))
    out = _run(case)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(out.double(), dense_decode(case), rtol=2e-2, atol=2e-2)


def test_bad_inputs_are_refused_by_name():
    case = make_case([20], 4, 2, 32, 16)
    with pytest.raises(RuntimeError, match="must all be fp32 or all bf16"):
        torch.ops.ferry_cpu.paged_decode(case.q.bfloat16(), case.k_pool, case.v_pool, case.block_tables,
                                         case.context_lens, 1.0)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.ferry_cpu.paged_decode(case.q, case.k_pool, case.v_pool, case.block_tables,
                                         torch.tensor([10_000], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.ferry_cpu.paged_decode(case.q, case.k_pool, case.v_pool, case.block_tables.long(),
                                         case.context_lens, 1.0)


def test_torch_compile_takes_it_as_one_op_without_graph_breaks():
    case = make_case([100, 9], 6, 2, 32, 16)

    def f(q):
        return torch.ops.ferry_cpu.paged_decode(q * 1, case.k_pool, case.v_pool, case.block_tables,
                                                case.context_lens, case.scale).sum(-1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(case.q), f(case.q))


def test_a_sequence_gets_the_same_bits_alone_in_a_batch_and_on_any_thread_count():
    """Contexts are cut into fixed pieces, so the serving engine's batched steps give a request exactly the values
    it gets alone (its greedy tokens then equal `ferry generate`'s)."""
    before = torch.get_num_threads()
    batch = make_case([700, 31, 1200, 260], 9, 3, 64, 16, seed=int(torch.randint(1 << 30, ())))
    try:
        together = _run(batch)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for s in range(4):
                alone = torch.ops.ferry_cpu.paged_decode(batch.q[s:s + 1], batch.k_pool, batch.v_pool,
                                                         batch.block_tables[s:s + 1], batch.context_lens[s:s + 1],
                                                         batch.scale)
                assert torch.equal(alone[0], together[s]), (threads, s)
    finally:
        torch.set_num_threads(before)


def test_a_compiler_that_hangs_fails_the_build_by_name_and_leaves_no_process(tmp_path, monkeypatch):
    import time
    from pathlib import Path

    slow, pid_file = tmp_path / "slow-cxx", tmp_path / "child.pid"
    slow.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pid_file}\nwait\n")  # a compiler and a child of its own
    slow.chmod(0o755)
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 1)
    with pytest.raises(RuntimeError, match="slow-cxx did not finish within 1 s"):
        cpu_kernels._build(str(slow), tmp_path / "lib.so")
    assert not list(tmp_path.glob(".building-*"))  # its scratch file is gone

    def running(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status")
        return status.exists() and "\nState:\tZ" not in status.read_text()  # gone, or dead and not yet reaped

    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child), "the compiler's child outlived the timeout"
