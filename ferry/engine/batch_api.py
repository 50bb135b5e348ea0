"""`generate` and `stream` over a batch of prompts, on top of an engine's per-request API.

Shared by the serving engine and the pipeline engine: anything with `check_prompts`, `add_request`, `step`,
`abort` and `request` gets the batch calls the CLI and the Python API use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace

from ferry.engine.outputs import Completion, TokenEvent
from ferry.engine.request import Request
from ferry.engine.sampling import SamplingParams


class BatchAPI:
    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[TokenEvent]:
        """Token events for every prompt of the batch (`index` is the prompt's position), as they come. Leaving
        the loop early aborts the batch's unfinished requests."""
        return self._run_batch(prompts, params, [])

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[Completion]:
        requests: list[Request] = []
        for event in self._run_batch(prompts, params, requests):
            if on_token:
                on_token(event)
        return [Completion.from_sequence(r.seq, r.arrival) for r in requests]

    def _run_batch(self, prompts, params, requests: list[Request]) -> Iterator[TokenEvent]:
        """Queue the batch (into `requests`), then step the engine until all of it has finished."""
        ids = self._add_batch(prompts, params)
        requests.extend(self.request(rid) for rid in ids)
        index = {rid: i for i, rid in enumerate(ids)}
        try:
            while any(not r.finished for r in requests):
                for event in self.step():
                    if event.index in index:
                        yield replace(event, index=index[event.index])
        finally:
            for rid in ids:
                self.abort(rid)
            if sys.exc_info()[0] in (None, GeneratorExit):  # done, or the caller left the stream: not on an error
                self.settle()

    def _add_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[int]:
        self.check_prompts(prompts, params)  # all or nothing: a bad prompt queues none of the batch
        ids = []
        for i, p in enumerate(prompts):
            # One seed for the batch gives each prompt its own reproducible stream, not n copies of one.
            ids.append(self.add_request(p, params if params.seed is None else replace(params, seed=params.seed + i)))
        return ids

    def settle(self) -> None:
        """After a batch: whatever the engine must still run so every rank ends it in the same state (the
        pipeline engine's last ticks); nothing for one engine."""
