"""Pipeline-parallel serving: the running batch cut into micro-batches that flow through the stages in turn.

Each micro-batch is its own serving engine (scheduler, block manager, its share of the stage's KV pool): request
r joins micro-batch r mod M (the next one whose queue has room, if that one's is full) and stays there. Every rank holds the same engines in the same state (every stage runs
every scheduler on the same token stream), so a step of micro-batch k has the same shape everywhere and only
activations and token ids cross the links. What keeps the states equal: a request that arrives (or is aborted)
between ticks is applied to its micro-batch right before that micro-batch's next launch, after its last tokens
were read, on every rank alike; the stages read a micro-batch's tokens at different moments of a tick, so a change
applied at once would meet a different state on each (a request finishing on the last stage before an abort
arrives, and after it on stage 0, would leave their prefix caches apart).

One tick runs a step of every micro-batch. Stage 0 launches micro-batch k's next step as soon as k's previous
tokens are back, so with as many micro-batches as stages every stage works on a different one at once:

    stage 0:  k0  k1  k0' k1' ...        (k0' needs k0's tokens, sampled by the last stage)
    stage 1:      k0  k1  k0' k1' ...

Stages before the last read a micro-batch's tokens (finish) before launching its next step (start). The last
stage sends each micro-batch's tokens to stage 0 the moment they exist: on a CPU, whose compute is synchronous, it
reads them right after launching; on a GPU it first queues the next micro-batch's step, then waits for the
tokens, so its GPU never idles while its host reads back, schedules and launches.
"""

from __future__ import annotations

import logging

from ferry.engine.batch_api import BatchAPI
from ferry.engine.engine import Engine
from ferry.engine.outputs import TokenEvent
from ferry.engine.paged_cache import BLOCK_SIZE, KVMemory, PagedKVCache
from ferry.engine.request import Request
from ferry.engine.sampling import SamplingParams
from ferry.engine.scheduler import QueueFullError
from ferry.errors import FerryError
from ferry.parallel.pipeline_stage import PipelineStage

log = logging.getLogger("ferry.pipeline")


class PipelineEngine(BatchAPI):
    def __init__(self, model, tokenizer, stage: PipelineStage, micro_batches: int | None = None,
                 kv_memory: str | float | None = None, num_blocks: int | None = None, block_size: int = BLOCK_SIZE,
                 **engine_options) -> None:
        pp = stage.peers.mesh.pp
        count = micro_batches or pp
        if count < 1:
            raise FerryError(f"--micro-batches must be 1 or more, got {count}")
        if count < pp:
            log.warning("%d micro-batches for %d stages: stages will idle (use at least %d)", count, pp, pp)
        if num_blocks is None:
            num_blocks, _ = PagedKVCache.blocks_within(model, KVMemory.parse(kv_memory), block_size,
                                                       num_layers=len(model.span.layers))
        per_engine = int(stage.links.agree_min([num_blocks // count])[0])
        if per_engine < 2:
            raise FerryError(f"the KV cache ({num_blocks} blocks on the smallest stage) does not split into "
                             f"{count} micro-batches; raise --kv-memory")
        self.stage, self.model, self.tokenizer = stage, model, tokenizer
        self.engines = [Engine(model, tokenizer, num_blocks=per_engine, block_size=block_size, stage=stage,
                               **engine_options) for _ in range(count)]
        first = self.engines[0]
        self.config, self.device, self.dtype = first.config, first.device, first.dtype
        self.decode_path = f"pipeline stage {stage.peers.stage} of {pp} ({model.span}), {count} micro-batches, " \
                           f"{first.decode_path}"
        report = first.kv_report
        self.kv_report = dict(report, blocks=report["blocks"] * count, tokens=report["tokens"] * count,
                              gib=round(report["gib"] * count, 3),
                              full_context_sequences=report["full_context_sequences"] * count, micro_batches=count)
        self._owner: dict[int, Engine] = {}
        self._requests: dict[int, Request] = {}
        self._pending: dict[int, list[tuple[str, Request]]] = {id(e): [] for e in self.engines}  # by engine
        self._next_id = 0
        self._launched = False  # whether the last tick launched a step of any micro-batch
        self._defer_finish = stage.last and first.device.type == "cuda"
        self._unfinished: Engine | None = None  # the last stage's engine whose tokens are read after the next launch
        log.info("pipeline stage %d of %d holds %s; %d micro-batches of %d KV blocks each", stage.peers.stage, pp,
                 model.span, count, per_engine)

    # -- requests ---------------------------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams, name: str = "the prompt") -> None:
        self.engines[0].check_request(prompt_ids, params, name)

    def check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        self.engines[0].check_prompts(prompts, params)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request on micro-batch id mod M, or the next whose queue has room; it joins at that
        micro-batch's next launch. Queues are the same on every rank between ticks, so every rank picks the same
        one. Raises QueueFullError when every micro-batch's queue is at the bound (max_waiting each)."""
        count = len(self.engines)
        for offset in range(count):
            engine = self.engines[(self._next_id + offset) % count]
            if self._waiting(engine) < engine.limits.max_waiting:
                break
        else:
            raise QueueFullError(f"{sum(self._waiting(e) for e in self.engines)} requests are waiting already (the "
                                 "bound); retry later")
        request = engine.new_request(prompt_ids, params, self._next_id)
        self._pending[id(engine)].append(("add", request))
        self._next_id += 1
        self._owner[request.id], self._requests[request.id] = engine, request
        return request.id

    def abort(self, request_id: int) -> None:
        """Stop a request at its micro-batch's next launch (a token read before then is still delivered)."""
        engine = self._owner.pop(request_id, None)
        request = self._requests.pop(request_id, None)
        if engine is not None and request is not None:
            self._pending[id(engine)].append(("abort", request))

    def request(self, request_id: int) -> Request | None:
        return self._requests.get(request_id)

    def _waiting(self, engine: Engine) -> int:
        return len(engine.scheduler.waiting) + sum(kind == "add" for kind, _ in self._pending[id(engine)])

    def has_unfinished(self) -> bool:
        """The same answer on every rank between ticks (ferry serve's ranks decide from it whether to wait for
        work). Whether a request is still running is not the same: the stages read a micro-batch's last tokens in
        different ticks. Whether the last tick launched anything is, and so are the schedulers' queues. Pending
        commands can differ in one case: an abort that reaches stage 0 after the last stage saw its request end
        (the last stage drops it, stage 0 queues it); but the request's final step was launched in the last tick,
        so `_launched` is true on every rank then, and the answer agrees."""
        return (self._launched or any(self._pending.values())
                or any(e.scheduler.has_work() for e in self.engines))

    def _apply_pending(self, engine: Engine) -> None:
        for kind, request in self._pending[id(engine)]:
            if kind == "add":
                engine.enqueue(request)
            else:
                engine.abort(request.id)
                request.seq.finish_reason = request.seq.finish_reason or "abort"
        self._pending[id(engine)].clear()

    # -- the step loop ----------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One tick: a step of every micro-batch that has work; returns the token events read in it."""
        import torch

        events: list[TokenEvent] = []
        self._launched = False
        with torch.inference_mode():
            for engine in self.engines:
                if not self.stage.last:
                    events += engine.finish_step()
                    self._start(engine)
                elif not self._defer_finish:
                    self._start(engine)
                    events += engine.finish_step()
                else:
                    if engine is self._unfinished:  # one micro-batch: nothing to queue before its tokens
                        events += engine.finish_step()
                        self._unfinished = None
                    self._start(engine)
                    if self._unfinished is not None:
                        events += self._unfinished.finish_step()
                    self._unfinished = engine
        for event in events:
            if event.finish_reason is not None:
                self._owner.pop(event.index, None)
                self._requests.pop(event.index, None)
        return events

    def _start(self, engine: Engine) -> None:
        """Every rank reaches here for micro-batch k with its last tokens read: arrivals and aborts join now."""
        self._apply_pending(engine)
        self._launched |= engine.start_step()

    @property
    def limits(self):
        return self.engines[0].limits

    def warm_up(self, batch: int = 1, every_bucket: bool = False) -> None:
        """Capture each micro-batch's stage graphs up to `batch` rows (no link is used: stages capture alone)."""
        for engine in self.engines:
            engine.warm_up(batch, every_bucket=every_bucket)

    def settle(self) -> None:
        """Run the ticks that apply the last aborts and read the last tokens, as many on every rank (a batch's
        loop ends a tick earlier on the last stage, which reads tokens first); the last ticks launch nothing."""
        while self.has_unfinished():
            self.step()

    def check_no_leaks(self) -> None:
        """After every request ended or was aborted: settle, then check every micro-batch's blocks."""
        self.settle()
        for engine in self.engines:
            engine.check_no_leaks()

    def close(self) -> None:
        self.stage.drain()

    def gauges(self) -> dict[str, int]:
        """What /metrics shows (Engine.gauges), summed over the micro-batches, with this stage's point-to-point
        bytes."""
        total: dict[str, int] = {}
        for engine in self.engines:
            for key, value in engine.gauges().items():
                total[key] = total.get(key, 0) + value
        total["waiting"] += sum(kind == "add" for pending in self._pending.values() for kind, _ in pending)
        total["pipeline_hidden_bytes"] = self.stage.hidden_bytes_sent
        total["pipeline_token_bytes"] = self.stage.token_bytes_sent
        return total
