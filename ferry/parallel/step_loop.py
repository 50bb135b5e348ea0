"""The loop every rank runs while `ferry serve` is up: the driver's requests join and leave at step boundaries.

At each step boundary every rank takes the same commands from its feed (command_feed.py: each rank's own queue
on one machine, or rank 0 passing them on under torchrun), so every rank adds and aborts the same requests before
the same step (the ranks' schedules must never part) without a device sync. With nothing to run, every rank
waits for the next command. Rank 0 reports each step's tokens and the engine's gauges to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.engine.scheduler import QueueFullError
from ferry.errors import InvalidRequestError


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
    def __init__(self, engine: Engine, feed, events, rank: int) -> None:
        self.engine, self.feed, self.events, self.rank = engine, feed, events, rank
        self.cid_of: dict[int, int] = {}  # engine request id -> driver's id
        self.rid_of: dict[int, int] = {}

    def run(self, pending: list) -> list:
        """Serve `pending` (taken with the command that started serving), then the feed's commands until
        LeaveLoop; returns the commands taken after it (the rank's own loop runs them: a "stop" that arrived in
        the same take as LeaveLoop would otherwise be lost, and the rank never exit)."""
        while True:
            commands = pending or self.feed.take(block=not self.engine.has_unfinished())
            pending = []
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
