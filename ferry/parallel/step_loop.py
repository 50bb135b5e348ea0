"""The loop every rank runs while `ferry serve` is up: the driver's requests join and leave at step boundaries.

The driver (the HTTP server's process) puts each command on every rank's queue, in one order. At a step boundary
rank 0 takes what has arrived and tells the other ranks how many over a gloo group on the host, so every rank adds
and aborts the same requests before the same step (the ranks' schedules must never part) without a device sync;
the others then read exactly that many from their own queues. With nothing to run, every rank waits on its queue
(all of them receive the next command). Rank 0 reports each step's tokens and the engine's gauges to the driver.
"""

from __future__ import annotations

import datetime
import queue
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.engine.scheduler import QueueFullError
from ferry.errors import FerryError, InvalidRequestError


@dataclass(frozen=True)
class AddRequest:
    cid: int  # the driver's id for it; events come back under this id
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    cid: int


@dataclass(frozen=True)
class LeaveLoop:
    """Abort what is still running and return to the command loop (the driver drained what it wanted first)."""


# (cid, token id, text delta, finish reason or None) for every token a step read back.
StepToken = tuple[int, int, str, str | None]


class StepLoop:
    def __init__(self, engine: Engine, commands, events, rank: int, world: int, timeout_s: float) -> None:
        self.engine, self.commands, self.events = engine, commands, events
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        # Host-side agreement: a device collective here would make ranks > 0 wait for each step's GPU work.
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if world > 1 else None
        self.cid_of: dict[int, int] = {}  # engine request id -> driver's id
        self.rid_of: dict[int, int] = {}

    def run(self) -> list:
        """Serve until LeaveLoop; returns the commands taken after it (the rank's own loop runs them: a "stop"
        that arrived in the same drain as LeaveLoop would otherwise be lost, and the rank never exit)."""
        while True:
            commands = self._take_commands(block=not self.engine.has_unfinished())
            for i, command in enumerate(commands):
                if isinstance(command, LeaveLoop):
                    for rid in list(self.cid_of):
                        self.engine.abort(rid)
                    self.engine.check_no_leaks()
                    return commands[i + 1:]
                self._apply(command)
            if not self.engine.has_unfinished():
                if commands and self.rank == 0:  # an abort freed blocks with no step to follow: say so
                    self.events.put(("step", [], self.engine.gauges()))
                continue
            tokens = [(self.cid_of[e.index], e.token_id, e.text, e.finish_reason) for e in self.engine.step()
                      if e.index in self.cid_of]
            for cid, _, _, finish in tokens:
                if finish is not None:
                    self.cid_of.pop(self.rid_of.pop(cid), None)
            if self.rank == 0:
                self.events.put(("step", tokens, self.engine.gauges()))

    def _take_commands(self, block: bool) -> list:
        """This step's commands, the same on every rank."""
        taken = []
        if self.rank == 0 or self.world == 1:
            if block:
                taken.append(self._get(None))
            while True:
                try:
                    taken.append(self.commands.get_nowait())
                except queue.Empty:
                    break
            if self.world > 1:
                dist.broadcast(torch.tensor([len(taken)]), src=0, group=self.control)
            return taken
        if block:  # every rank receives every command, so an idle rank waits on its own queue, not in a collective
            taken.append(self._get(None))
        count = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(count, src=0, group=self.control)
        while len(taken) < int(count):
            taken.append(self._get(self.timeout_s))
        return taken

    def _get(self, timeout_s: float | None):
        try:
            return self.commands.get(timeout=timeout_s)
        except queue.Empty:
            raise FerryError(f"rank {self.rank}: rank 0 announced a command that did not arrive within "
                             f"{timeout_s:.0f} s") from None

    def _apply(self, command) -> None:
        if isinstance(command, AbortRequest):
            rid = self.rid_of.pop(command.cid, None)
            if rid is not None:
                self.cid_of.pop(rid, None)
                self.engine.abort(rid)
            return
        try:  # every rank reaches the same verdict (the checks are deterministic), so none of them diverge
            rid = self.engine.add_request(command.prompt_ids, command.params)
        except QueueFullError as exc:
            self._reject(command.cid, "queue_full", str(exc))
            return
        except InvalidRequestError as exc:
            self._reject(command.cid, "invalid", str(exc))
            return
        self.cid_of[rid], self.rid_of[command.cid] = command.cid, rid

    def _reject(self, cid: int, kind: str, message: str) -> None:
        if self.rank == 0:
            self.events.put(("rejected", cid, (kind, message)))
