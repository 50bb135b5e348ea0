"""Run one function on `tp` ranks: spawned worker processes (rank 0's result comes back), or under torchrun.

Every rank runs the same engine steps in lockstep (SPMD); collectives have a timeout; the parent watches every
child and, when one dies, stops the rest and names the rank that failed. Children die with the parent
(PR_SET_PDEATHSIG), so a killed `ferry` leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ferry.comm.group import ParallelGroup
from ferry.device import BACKENDS, backend_for
from ferry.errors import FerryError

log = logging.getLogger("ferry.launch")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """A rank dies with its parent and leaves Ctrl-C to it: a terminal's SIGINT reaches every process of the
    group, and the parent stops the ranks itself (ranks would otherwise each print a KeyboardInterrupt trace)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's finally block still reaps children


@contextlib.contextmanager
def sigint_ignored_by_children():
    """Start processes inside this block: they inherit SIGINT ignored from their first instruction (an ignored
    signal stays ignored across exec, and Python keeps it so), closing the window before die_with_parent runs.
    Only the main thread may change handlers; elsewhere die_with_parent alone covers it."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rank_device(rank: int, device_type: str, placement=None) -> torch.device:
    """The device a rank computes on: the placement's, else one accelerator per rank (wrapping if ranks outnumber
    them), or the host."""
    if placement is not None:
        return torch.device(placement.rank(rank).device)
    if device_type != "cpu":
        return torch.device(device_type, rank % torch.accelerator.device_count())
    return torch.device(device_type)


def init_group(
    rank: int, world: int, device_type: str, init_method: str, timeout_s: float, compression: str | None = None,
    placement=None,
) -> ParallelGroup:
    """Join the world group. With a placement (ranks on devices of different kinds, placement.py) the world group
    is gloo, host-side, and the ranks that share an accelerator type get their own groups of its backend later."""
    backend = placement.world_backend if placement is not None else backend_for([device_type])
    device = rank_device(rank, device_type, placement)
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index or 0)
    # Ranks share the host's cores: without this, gloo ranks oversubscribe them and decode slows several-fold.
    threads = placement.threads(rank) if placement is not None else max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelGroup(rank=rank, world_size=world, process_group=dist.group.WORLD, compression=compression)


def keep_multicast_off() -> None:
    """NVLink multicast (NVLS) stays off in every process Ferry starts: NCCL, torch symmetric memory and NVSHMEM
    each have their own switch. An explicit setting in the environment is left as it is (and reported by benches)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def log_like_parent(rank: int, level: int) -> None:
    """A spawned rank starts with logging unconfigured: give it the parent's level (so `--verbose` shows what each
    rank loaded and which paths it took), every line naming the rank."""
    logging.basicConfig(level=level, stream=sys.stderr, format=f"ferry: rank {rank}: %(name)s: %(message)s")


def _worker(rank, world, device_type, init_method, timeout_s, compression, fn, args, results, log_level,
            placement) -> None:
    die_with_parent()
    keep_multicast_off()
    log_like_parent(rank, log_level)
    try:
        group = init_group(rank, world, device_type, init_method, timeout_s, compression, placement)
        log.info("rank %d of %d joined the group (pid %d)", rank, world, os.getpid())
        result = fn(group, *args)
        if rank == 0:
            # Plain pickle copies tensor data: the queue's own pickler would pass tensors as shared-memory
            # handles, which die with this process before the parent unpickles them.
            results.put(("ok", pickle.dumps(result)))
        dist.barrier()
        dist.destroy_process_group()
    except FerryError as exc:
        results.put(("error", rank, str(exc), ""))
        raise SystemExit(2) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        results.put(("crash", rank, f"{type(exc).__name__}: {reason[:300]}", traceback.format_exc(limit=8)))
        raise SystemExit(1) from None


def spawn(
    world: int, device_type: str, fn: Callable[..., Any], args: tuple, timeout_s: float = 300.0,
    compression: str | None = None, placement=None,
) -> Any:
    """Run fn(group, *args) on `world` spawned ranks (on the devices of `placement`, if given); return rank 0's
    result."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    level = logging.getLogger("ferry").getEffectiveLevel()
    procs = [ctx.Process(target=_worker, args=(r, world, device_type, init_method, timeout_s, compression, fn, args, results,
                                               level, placement), name=f"ferry-rank{r}", daemon=True) for r in range(world)]
    with sigint_ignored_by_children():
        for p in procs:
            p.start()
    log.info("spawned %d ranks (%s, %s), pids %s", world, placement or device_type,
             placement.world_backend if placement else BACKENDS[device_type],
             " ".join(str(p.pid) for p in procs))
    try:
        outcome = None
        while outcome is None:
            try:
                outcome = results.get(timeout=0.2)
            except queue.Empty:
                if dead := describe_dead_rank(procs):
                    raise FerryError(f"{dead}; stopped the other ranks")
        if outcome[0] != "ok":
            _, rank, reason, trace = outcome
            log.debug("rank %d traceback:\n%s", rank, trace)
            time.sleep(1.0)  # a peer's death usually surfaces first as this rank's collective error
            dead = describe_dead_rank(procs, exclude=rank)
            raise FerryError(f"{dead}; rank {rank} then failed: {reason}" if dead else f"rank {rank}: {reason}")
        payload = pickle.loads(outcome[1])
        deadline = time.monotonic() + 30
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        return payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def describe_dead_rank(procs: list, exclude: int | None = None) -> str | None:
    """Describe the first rank that exited abnormally (killed by a signal or non-zero), if any."""
    for rank, p in enumerate(procs):
        code = p.exitcode
        if rank == exclude or code in (None, 0):
            continue
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"rank {rank} {how}"
    return None


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def torchrun_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def torchrun_rank() -> int:
    return int(os.environ["RANK"])


def torchrun_group(device_type: str, timeout_s: float = 300.0, compression: str | None = None) -> ParallelGroup:
    rank, world = torchrun_rank(), torchrun_world_size()
    return init_group(rank, world, device_type, "env://", timeout_s, compression)
