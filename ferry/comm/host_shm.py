"""All-reduce between CPU ranks of one host through one shared-memory segment, instead of gloo's loopback TCP.

A gloo all-reduce between two busy one-thread processes costs a millisecond or more, and tensor-parallel decode
makes two per layer per token (60 a token for SmolLM2): on a CPU that, not the matmuls, sets TP's speed. Here
every rank copies its tensor into its own slot of a segment all ranks map, says so in its `arrived` flag, waits
until every rank has, and sums the slots itself, in rank order and in fp32, so every rank computes the same bits;
then it marks `left`. Slots are double-buffered by call parity: a rank writes the slot of call n only once every
rank has left call n - 2, which used the same one.

The flags are plain int64 stores and loads. That orders correctly on x86-64, whose stores become visible in
program order and whose loads are not reordered with older loads (a rank's data is in its slot before its flag
says so); other architectures need fences Python cannot issue, so the path is offered on x86-64 only. Waits spin
(yielding the core to any other process) and end at the group's timeout with the ranks that never came named.
Rank 0 creates the segment (a file in /dev/shm) and removes its name once every rank has mapped it, so no file
outlives the job.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
import uuid

import torch
import torch.distributed as dist

from ferry.errors import FerryError

FLAG_STRIDE = 8  # int64 words between two ranks' flags: one 64-byte cache line each
SUMMABLE = (torch.float32, torch.bfloat16, torch.float16)


class HostSharedMemoryPath:
    name = "host_shm"
    label = "host shared memory"

    def __init__(self, process_group: dist.ProcessGroup | None, max_bytes: int, timeout_s: float = 300.0) -> None:
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        where: list = [None] * self.world
        dist.all_gather_object(where, (socket.gethostname(), os.getpid()), group=process_group)
        hosts = {host for host, _ in where}
        if len(hosts) > 1:
            raise RuntimeError(f"the group's ranks are on {len(hosts)} hosts; shared memory joins one host's")
        self._pids = [pid for _, pid in where]  # a rank that died is named at once, not at the timeout
        flags = 2 * self.world * FLAG_STRIDE * 8
        size = flags + 2 * self.world * max_bytes
        # A file in the host's RAM-backed folder, mapped shared by every rank: no resource tracker involved (the
        # spawned ranks share one, whose bookkeeping of a segment opened in several processes races).
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = [os.path.join(folder, f"ferry-allreduce-{uuid.uuid4().hex}")]
        dist.broadcast_object_list(path, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                                   group=process_group)
        if self.rank == 0:
            fd = os.open(path[0], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        dist.barrier(group=process_group)
        raw = torch.from_file(path[0], shared=True, size=size, dtype=torch.uint8)
        dist.barrier(group=process_group)
        if self.rank == 0:
            os.unlink(path[0])  # every rank holds its mapping; the name is no longer needed
        words = raw[:flags].view(torch.int64).view(2, self.world, FLAG_STRIDE)  # a new file reads as zeros
        self._arrived, self._left = words[0, :, 0], words[1, :, 0]
        self._slots = raw[flags:].view(2, self.world, max_bytes)
        self._calls = 0

    @staticmethod
    def unavailable_reason(process_group: dist.ProcessGroup | None, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "ranks on an accelerator (host shared memory joins CPU ranks)"
        if not dist.is_initialized() or dist.get_world_size(process_group) < 2:
            return "one rank has nothing to sum with"
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"{platform.machine()}: its memory ordering needs fences the flags do not issue (x86-64 only)"
        return None

    def fits(self, tensor: torch.Tensor) -> bool:
        return (tensor.device.type == "cpu" and tensor.dtype in SUMMABLE
                and tensor.numel() * tensor.element_size() <= self.max_bytes)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        call, parity = self._calls, self._calls % 2
        nbytes = tensor.numel() * tensor.element_size()
        self._wait_all(self._left, call - 2, "finish the all-reduce before last")
        mine = self._slots[parity, self.rank, :nbytes]
        mine.copy_(tensor.reshape(-1).view(torch.uint8))
        self._arrived[self.rank] = call
        self._wait_all(self._arrived, call, "reach the all-reduce")
        slots = self._slots[parity, :, :nbytes].view(tensor.dtype)
        total = slots[0].float()  # a copy (fp32) unless the dtype already is
        if tensor.dtype == torch.float32:
            total = total.clone()
        for r in range(1, self.world):
            total += slots[r]
        self._left[self.rank] = call
        tensor.copy_(total.view(tensor.shape))
        return tensor

    def _wait_all(self, flags: torch.Tensor, value: int, what: str) -> None:
        if value <= 0 or int(flags.min()) >= value:
            return
        started = time.monotonic()
        checked, spins = started, 0
        while int(flags.min()) < value:
            spins += 1
            if spins % 64:
                continue
            os.sched_yield()  # another process may need this core (ranks can outnumber cores)
            now = time.monotonic()
            if now - checked < 0.2:
                continue
            checked = now
            late = [r for r in range(self.world) if int(flags[r]) < value]
            dead = [r for r in late if not _alive(self._pids[r])]
            if dead:
                raise FerryError(f"all-reduce over host shared memory: rank(s) {dead} died before they could "
                                 f"{what}")
            if now - started > self.timeout_s:
                raise FerryError(f"all-reduce over host shared memory: rank(s) {late} did not {what} within "
                                 f"{self.timeout_s:.0f} s; they are stuck")




def _alive(pid: int) -> bool:
    """Whether a process still runs: a killed rank its parent has not reaped yet is a zombie, and counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
