"""Pipeline-parallel serving: the running batch cut into micro-batches that flow through the stages in turn.

Each micro-batch is its own serving engine (scheduler, block manager, its share of the stage's KV pool): a
request joins the one with the fewest requests and stays there. Every rank holds the same engines in the same
state (every stage runs every scheduler on the same token stream), so a step of micro-batch k has the same shape
everywhere and only activations and token ids cross the links.

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
        self.kv_report = dict(first.kv_report, blocks=per_engine * count, micro_batches=count)
        self._owner: dict[int, Engine] = {}
        self._next_id = 0
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
        """Queue a request on the micro-batch with the fewest (the same choice on every rank)."""
        engine = min(self.engines, key=lambda e: e.scheduler.num_requests())
        rid = engine.add_request(prompt_ids, params, request_id=self._next_id)
        self._next_id += 1
        self._owner[rid] = engine
        return rid

    def abort(self, request_id: int) -> None:
        engine = self._owner.pop(request_id, None)
        if engine is not None:
            engine.abort(request_id)

    def request(self, request_id: int) -> Request | None:
        engine = self._owner.get(request_id)
        return engine.request(request_id) if engine else None

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    # -- the step loop ----------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One tick: a step of every micro-batch that has work; returns the token events read in it."""
        import torch

        events: list[TokenEvent] = []
        with torch.inference_mode():
            for engine in self.engines:
                if not self.stage.last:
                    events += engine.finish_step()
                    engine.start_step()
                elif not self._defer_finish:
                    engine.start_step()
                    events += engine.finish_step()
                else:
                    if engine is self._unfinished:  # one micro-batch: nothing to queue before its tokens
                        events += engine.finish_step()
                        self._unfinished = None
                    engine.start_step()
                    if self._unfinished is not None:
                        events += self._unfinished.finish_step()
                    self._unfinished = engine
        for event in events:
            if event.finish_reason is not None:
                self._owner.pop(event.index, None)
        return events

    def check_no_leaks(self) -> None:
        for engine in self.engines:
            engine.check_no_leaks()

    def close(self) -> None:
        self.stage.drain()

    @property
    def stats(self) -> dict[str, int]:
        """Work and link bytes summed over the micro-batches, and this stage's point-to-point bytes."""
        total = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        for engine in self.engines:
            for key in total:
                total[key] += getattr(engine.stats, key)
        total["hidden_bytes_sent"] = self.stage.hidden_bytes_sent
        total["token_bytes_sent"] = self.stage.token_bytes_sent
        return total
