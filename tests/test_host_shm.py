"""The host shared-memory all-reduce (CPU ranks of one host): exact sums in every dtype it takes, the same bits on
every rank, call after call (the double-buffered slots), and a rank that never comes named at the timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ferry.errors import FerryError
from ferry.parallel.launch import spawn


def _sum_many_times(group) -> dict:
    from ferry.comm.host_shm import HostSharedMemoryPath

    path = HostSharedMemoryPath(group.process_group, max_bytes=1 << 16, timeout_s=60)
    gen = torch.Generator().manual_seed(1234)
    results = []
    for call in range(7):  # more calls than the two slot sets, so each set is reused
        for dtype in (torch.float32, torch.bfloat16):
            numel = 1 + (call * 997) % 4000
            every = [torch.randn(numel, generator=gen).to(dtype) for _ in range(group.world_size)]
            mine = every[group.rank].clone()
            out = path.reduce(mine)
            expected = every[0].float()
            for t in every[1:]:
                expected = expected + t.float()
            results.append((bool(torch.equal(out, expected.to(dtype))), out.clone()))
    return {"exact": all(ok for ok, _ in results), "outputs": [o for _, o in results],
            "fits_large": path.fits(torch.empty(1 << 15, dtype=torch.float32)),
            "fits_int": path.fits(torch.empty(8, dtype=torch.int64))}


def _gather_outputs(group) -> dict:
    result = _sum_many_times(group)
    gathered = [None] * group.world_size
    torch.distributed.all_gather_object(gathered, result["outputs"], group=group.process_group)
    same = all(all(torch.equal(a, b) for a, b in zip(gathered[0], g, strict=True)) for g in gathered)
    return result | {"same_on_every_rank": same}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_host_shared_memory_sums_exactly_and_alike_on_every_rank(world):
    result = spawn(world, "cpu", _gather_outputs, (), timeout_s=120)
    assert result["exact"] and result["same_on_every_rank"]
    assert not result["fits_large"] and not result["fits_int"]  # gloo takes what a slot cannot


def _one_rank_stays_away(group) -> str:
    from ferry.comm.host_shm import HostSharedMemoryPath

    path = HostSharedMemoryPath(group.process_group, max_bytes=1 << 12, timeout_s=2)
    if group.rank == 1:
        return "away"
    try:
        path.reduce(torch.ones(4))
    except FerryError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_a_rank_that_never_comes_is_named_at_the_timeout():
    message = spawn(2, "cpu", _one_rank_stays_away, (), timeout_s=60)
    assert "rank(s) [1] did not reach the all-reduce within 2 s" in message


def _one_rank_dies(group) -> str:
    from ferry.comm.host_shm import HostSharedMemoryPath

    path = HostSharedMemoryPath(group.process_group, max_bytes=1 << 12, timeout_s=60)
    if group.rank == 1:
        os._exit(0)  # gone without a word, like a killed rank
    started = time.monotonic()
    try:
        path.reduce(torch.ones(4))
    except FerryError as exc:
        return f"{exc} after {time.monotonic() - started:.1f} s"
    return "no error"


@pytest.mark.slow
def test_a_rank_that_dies_is_named_at_once_not_at_the_timeout():
    message = spawn(2, "cpu", _one_rank_dies, (), timeout_s=60)
    assert "rank(s) [1] died before they could reach the all-reduce" in message
    assert float(message.rsplit("after ", 1)[1].split()[0]) < 5  # the timeout is 60 s
