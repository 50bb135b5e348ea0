"""Time per link (ferry/comm/link_time.py): copies timed by direction, collectives measured on CPU and estimated
from the all-reduce calibration on CUDA, and what the engine reports to /metrics."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from ferry.comm.allreduce_engine import SizeChoice
from ferry.comm.copy_stream import CopyStream
from ferry.comm.link_time import CollectiveClock, CollectiveTime, estimate_s

CPU = torch.device("cpu")
# (size, seconds): 10 us up to 8 KiB, 20 us at 32 KiB, 100 us at 1 MiB
TABLE = [(8 << 10, 10e-6), (32 << 10, 20e-6), (1 << 20, 100e-6)]


def test_estimate_is_the_smallest_time_below_linear_between_and_proportional_above():
    assert estimate_s(TABLE, 100) == pytest.approx(10e-6)
    assert estimate_s(TABLE, 20 << 10) == pytest.approx(15e-6)  # halfway from 8 to 32 KiB
    assert estimate_s(TABLE, 32 << 10) == pytest.approx(20e-6)
    assert estimate_s(TABLE, 2 << 20) == pytest.approx(200e-6)


def _group(table: list[SizeChoice] | None, compression: str | None = None):
    allreduce = SimpleNamespace(table=table) if table is not None else None
    return SimpleNamespace(allreduce=allreduce, compression=compression, clock=CollectiveClock())


def _calibrated() -> list[SizeChoice]:
    # At each size the chosen path's time is the one used, not the other path's.
    return [SizeChoice(size, "symm", {"symm": t * 1e6, "process_group": 9.0}) for size, t in TABLE]


def test_cuda_all_reduce_time_is_calls_times_the_calibrated_time_of_the_step_message():
    ct = CollectiveTime(_group(_calibrated()), torch.device("cuda"), calls_per_step=3, row_bytes=1024)
    ct.step(20)  # 20 KiB messages: 15 us each
    ct.step(1)  # 1 KiB: the 8 KiB time, 10 us
    assert ct.seconds() == {"allreduce_seconds": pytest.approx(3 * 15e-6 + 3 * 10e-6)}


def test_cuda_all_reduce_without_a_timed_table_reports_no_time():
    forced = [SizeChoice(64 << 20, "process_group", {})]  # --allreduce PATH: nothing was timed
    assert CollectiveTime(_group(forced), torch.device("cuda"), 3, 1024).seconds() == {}
    assert CollectiveTime(_group(_calibrated(), "int8"), torch.device("cuda"), 3, 1024).seconds() == {}
    assert CollectiveTime(_group(None), torch.device("cuda"), 3, 1024).seconds() == {}


def test_cpu_collective_time_is_what_the_group_clock_moved_during_each_step():
    group = _group(_calibrated())
    group.clock.allreduce_s = 5.0  # before the engine existed: not its time
    ct = CollectiveTime(group, CPU, 3, 1024)
    group.clock.allreduce_s += 0.25
    group.clock.allgather_s += 0.125
    ct.step(64)  # the table plays no part on CPU
    other = CollectiveTime(group, CPU, 3, 1024)  # a second engine on the same group (pipeline micro-batches)
    group.clock.allreduce_s += 0.5
    other.step(1)
    assert ct.seconds() == {"allreduce_seconds": 0.25, "allgather_seconds": 0.125}
    assert other.seconds() == {"allreduce_seconds": 0.5, "allgather_seconds": 0.0}


def test_timed_copies_add_to_their_direction_and_untimed_ones_to_none():
    copy = CopyStream(CPU, timed=True)
    src, dst = torch.ones(1 << 22), torch.empty(1 << 22)
    copy.copy_in_order(dst, src)  # without CUDA: an upload (in order)
    after_upload = copy.timer.seconds()
    copy.copy(dst, src)  # a readback (copy stream)
    after_readback = copy.timer.seconds()
    copy.copy(dst, src, timed=False)
    copy.copy_in_order(dst, src, timed=False)
    assert after_upload["h2d"] > 0 and after_upload["d2h"] == 0
    assert after_readback["d2h"] > 0 and after_readback["h2d"] == after_upload["h2d"]
    assert copy.timer.seconds() == after_readback
    assert CopyStream(CPU).timer is None  # other copy streams (weight streaming, pipelines) stay untimed


def test_a_cpu_group_times_its_all_reduces_including_those_before_a_norm():
    """A one-rank gloo group standing in for two (the sums run, over one rank): the clock holds their wall time.
    The all-gather's timing is checked by the two-rank server (tests/test_serve.py)."""
    import os

    import torch.distributed as dist

    from ferry.comm.group import ParallelGroup

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = ParallelGroup(rank=0, world_size=2, process_group=dist.group.WORLD)
        began = time.perf_counter()
        total = group.all_reduce(torch.ones(1024))
        after_one = group.clock.allreduce_s
        group.reduce_add_norm(torch.ones(2, 8), torch.zeros(2, 8), None)
        spent = time.perf_counter() - began
    finally:
        dist.destroy_process_group()
    assert total.sum() == 1024
    assert 0 < after_one < group.clock.allreduce_s < spent
    assert group.clock.allgather_s == 0


def test_engine_gauges_report_copy_seconds_that_grow_with_steps(ferry_smollm):
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams

    engine = Engine(ferry_smollm.model, ferry_smollm.tokenizer, num_blocks=64)
    engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    first = engine.gauges()
    while engine.has_unfinished():
        engine.step()
    last = engine.gauges()
    assert "allreduce_seconds" not in last  # one rank: no collective, no time
    assert 0 < first["pcie_h2d_seconds"] < last["pcie_h2d_seconds"]
    assert 0 < last["pcie_d2h_seconds"]


@pytest.mark.gpu
def test_cuda_copy_time_comes_from_events_without_a_sync_and_matches_the_copy():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    copy = CopyStream(device, timed=True)
    host = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    copy.copy_in_order(dev, host, host_pinned=True)
    fence = copy.copy(host, dev, host_pinned=True)
    fence.synchronize()
    torch.cuda.synchronize()
    seconds = copy.timer.seconds()
    # 64 MiB each way over PCIe or C2C: between 0.5 and 500 GB/s whatever the machine
    for way in ("h2d", "d2h"):
        assert (64 << 20) / 500e9 < seconds[way] < (64 << 20) / 0.5e9, seconds
    started = time.perf_counter()
    dev2 = torch.empty_like(dev)
    for _ in range(8):
        dev2.copy_(dev)  # keep the stream busy: the next copy's events have not passed yet
    copy.copy_in_order(dev, host, host_pinned=True)
    pending = copy.timer.seconds()["h2d"]  # returns at once: never waits for the copy
    assert time.perf_counter() - started < 0.5
    torch.cuda.synchronize()
    assert copy.timer.seconds()["h2d"] > pending or pending > seconds["h2d"]
