"""How the ranks of a long-lived engine take the driver's commands: the same ones, in one order, on every rank.

Two feeds behind one call, `take(block)` (this step's commands, identical on every rank):

- `QueueFeed`, ranks spawned on one machine: the driver puts every command on every rank's own queue. At a step
  boundary rank 0 takes what has arrived and says how many over a gloo group on the host; the others then read
  exactly that many from their own queues. An idle rank waits on its queue, not in a collective.
- `RelayFeed`, ranks started by torchrun: the other ranks may be on other machines, where no queue reaches. The
  driver's queue feeds rank 0 alone, which passes the commands on over the gloo group. While idle it sends an
  empty batch every `heartbeat_s`, which every rank answers: so each wait of the others has the --timeout (a rank 0
  that died or a node that went away is found within it), and rank 0 finds a rank that died while no request
  ran, by name, from the answer that did not come.
"""

from __future__ import annotations

import datetime
import queue
import time

import torch
import torch.distributed as dist

from ferry.errors import FerryError


def control_group(timeout_s: float):
    """A gloo group over every rank for host-side agreement: a device collective here would make ranks > 0 wait
    for each step's GPU work."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class QueueFeed:
    def __init__(self, commands, rank: int, world: int, timeout_s: float) -> None:
        self.commands, self.rank, self.world, self.timeout_s = commands, rank, world, timeout_s
        self.group = control_group(timeout_s) if world > 1 else None

    def take(self, block: bool) -> list:
        taken = []
        if self.rank == 0 or self.world == 1:
            if block:
                taken.append(self.commands.get())
            taken += _drain(self.commands)
            if self.world > 1:
                dist.broadcast(torch.tensor([len(taken)]), src=0, group=self.group)
            return taken
        if block:  # every rank receives every command, so an idle rank waits on its own queue, not in a collective
            taken.append(self.commands.get())
        count = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(count, src=0, group=self.group)
        while len(taken) < int(count):
            try:
                taken.append(self.commands.get(timeout=self.timeout_s))
            except queue.Empty:
                raise FerryError(f"rank {self.rank}: rank 0 announced a command that did not arrive within "
                                 f"{self.timeout_s:.0f} s") from None
        return taken


class RelayFeed:
    def __init__(self, commands, rank: int, world: int, timeout_s: float, heartbeat_s: float | None = None) -> None:
        if rank == 0 and commands is None:
            raise ValueError("rank 0 relays the driver's queue; it needs one")
        self.commands, self.rank, self.world, self.timeout_s = commands, rank, world, timeout_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(5.0, timeout_s / 4)
        self.group = control_group(timeout_s) if world > 1 else None

    def take(self, block: bool) -> list:
        """Blocking, this may return no command (a heartbeat); the caller waits again."""
        if self.rank == 0:
            return self._send(block)
        return self._receive(block)

    def _send(self, block: bool) -> list:
        taken = []
        if block:
            try:
                taken.append(self.commands.get(timeout=self.heartbeat_s))
            except queue.Empty:
                pass
        taken += _drain(self.commands)
        if self.world == 1:
            return taken
        # One message to each rank rather than a broadcast: a send that fails names the rank it was for.
        count = torch.tensor([len(taken)])
        self._each({r: lambda r=r: dist.isend(count, dst=r, group=self.group) for r in range(1, self.world)},
                   "passing commands to")
        if taken:
            self._collective(lambda: dist.broadcast_object_list(taken, src=0, group=self.group),
                             "passing commands to the other ranks", "a rank")
        elif block:  # idle: every rank answers, so one that died while no request ran is found
            answers = {r: torch.zeros(1) for r in range(1, self.world)}
            self._each({r: lambda r=r, t=t: dist.irecv(t, src=r, group=self.group) for r, t in answers.items()},
                       "an idle heartbeat's answer from")
        return taken

    def _each(self, starts: dict, what: str) -> None:
        """Start one message per peer rank (`starts`: rank -> call returning its work), then wait for each within
        the timeout; a message that fails or times out names its rank."""
        deadline = time.monotonic() + self.timeout_s
        works = {}
        for r, start in starts.items():
            try:
                works[r] = start()
            except RuntimeError as exc:
                raise FerryError(f"{what} rank {r} failed, that rank died or stopped ({_reason(exc)})") from None
        for r, work in works.items():
            try:
                ok = work.wait(datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
            except RuntimeError as exc:
                if _timed_out(exc):
                    ok = False
                else:
                    raise FerryError(f"{what} rank {r} failed, that rank died or stopped ({_reason(exc)})") from None
            if ok is False:
                raise FerryError(f"{what} rank {r}: nothing within {self.timeout_s:.0f} s (--timeout); that rank "
                                 "is stuck or gone")

    def _receive(self, block: bool) -> list:
        count = torch.zeros(1, dtype=torch.int64)
        self._each({0: lambda: dist.irecv(count, src=0, group=self.group)}, "waiting for commands from")
        if int(count) == 0:
            if block:  # rank 0 is idle and checks that every rank is still here
                self._collective(lambda: dist.send(torch.ones(1), dst=0, group=self.group), "answering rank 0",
                                 "rank 0")
            return []
        taken = [None] * int(count)
        self._collective(lambda: dist.broadcast_object_list(taken, src=0, group=self.group),
                         "waiting for commands from rank 0", "rank 0")
        return taken

    def _collective(self, call, what: str, who: str) -> None:
        try:
            call()
        except RuntimeError as exc:
            if _timed_out(exc):
                raise FerryError(f"{what}: nothing within {self.timeout_s:.0f} s (--timeout); {who} is stuck or "
                                 "gone") from None
            raise FerryError(f"{what} failed, {who} died or stopped ({_reason(exc)})") from None


def _drain(commands) -> list:
    taken = []
    while True:
        try:
            taken.append(commands.get_nowait())
        except queue.Empty:
            return taken


def _timed_out(exc: Exception) -> bool:
    return "timed out" in str(exc).lower() or "timeout" in str(exc).lower()


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split("] ", 1)[-1][:160]  # gloo prefixes its source file and line
