"""The serving engine: requests join and leave at any step over a paged KV cache.

    add_request(prompt_ids, params) -> id      step() -> token events      abort(id)

A step schedules (scheduler.py), uploads its inputs in one copy (step_inputs.py), runs the model once over every
scheduled token (a CUDA graph when the step is decode-only), samples each request with its own parameters, and
starts copying the sampled tokens back. The tokens of step N are read only after step N+1 has been launched: a
sequence whose token is still in flight feeds it to step N+1 on the device, so detokenizing, stop checks and
scheduling on the host overlap with the GPU's work. A sequence that turns out to have stopped at step N ran one
extra token in step N+1; it is dropped. `generate` and `stream` are this loop for a batch of prompts.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch

from ferry.comm.copy_stream import CopyStream
from ferry.comm.link_time import CollectiveTime
from ferry.comm.pinned_pool import PinnedBufferPool
from ferry.engine.batch_api import BatchAPI
from ferry.engine.block_manager import NULL_BLOCK, BlockManager
from ferry.engine.kv_swap import KVSwap
from ferry.engine.outputs import Completion, TokenEvent
from ferry.engine.paged_cache import BLOCK_SIZE, KVMemory, PagedKVCache
from ferry.engine.readback import PendingTokens, TokenReadback
from ferry.engine.request import Request
from ferry.engine.sampling import Sampler, SamplingParams
from ferry.engine.scheduler import ScheduledStep, Scheduler, SchedulerLimits
from ferry.engine.sequence import Sequence, stop_token_ids
from ferry.engine.step_inputs import StepInputs
from ferry.errors import FerryError, InvalidRequestError, UnsupportedModelError
from ferry.model.layers import fused
from ferry.model.layers.attention import PagedBatch, PrefillChunk
from ferry.model.layers.paged_attention import (
    PREFILL_TRITON_PATH,
    attention_heads,
    decode_attention_path,
    prefill_attention_path,
)
from ferry.model.llama import LlamaForCausalLM
from ferry.model.tokenizer import FerryTokenizer

log = logging.getLogger("ferry.engine")

__all__ = ["Completion", "Engine", "TokenEvent"]


@dataclass
class _InFlight:
    rows: list[Request]  # the requests whose tokens this step sampled, in row order
    tokens: torch.Tensor  # [rows] on the device
    readback: PendingTokens
    row_of: dict[int, int]  # request id -> row


@dataclass
class EngineStats:
    steps: int = 0
    graph_steps: int = 0  # decode-only steps replayed from a CUDA graph
    prefill_graph_steps: int = 0  # small steps with prefill chunks replayed from a CUDA graph (prefill_graphs.py)
    compiled_steps: int = 0  # decode-only steps run by the compiled CPU step
    decode_tokens: int = 0
    prefill_tokens: int = 0
    wasted_tokens: int = 0  # tokens run for a sequence that had stopped one step earlier (async readback)
    # Bytes each step moved over a link (`ferry serve` exports them): the packed step inputs host -> device, the
    # sampled tokens device -> host, and with tensor parallelism the collectives' message bytes (exact, from the
    # step's token count: one all-reduce of the embedding and two per layer per token, one logits all-gather per
    # sampled row). KV swap bytes are the swapper's (kv_swap.py).
    upload_bytes: int = 0
    readback_bytes: int = 0
    allreduce_bytes: int = 0
    allgather_bytes: int = 0


class Engine(BatchAPI):
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: FerryTokenizer | None,
        cuda_graphs: bool | None = None,
        compile: bool | None = False,
        compile_mode: str | None = None,
        sync_output: bool = False,
        pinned_pool: PinnedBufferPool | None = None,
        overlap_prefill: bool = False,
        kv_memory: str | float | None = None,
        num_blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        max_batched_tokens: int | None = None,
        max_running: int | None = None,
        max_waiting: int = 1024,
        prefix_caching: bool = True,
        preemption: str = "auto",
        stage=None,
        prefill_graphs: bool | None = None,
    ) -> None:
        """`stage`: this rank's pipeline stage (ferry/parallel/pipeline_stage.py), whose layers alone this engine
        runs and caches; the pipeline engine (pipeline_engine.py) drives several such engines, one per
        micro-batch. `compile`: on a CPU, decode-only steps through the compiled step (cpu_compiled.py); None
        compiles where it can run unless FERRY_COMPILE=0 (what long-lived processes pass), False never. On a GPU
        asking for it is refused (below). `prefill_graphs`: with decode graphs, also capture small steps that carry
        prefill chunks (prefill_graphs.py); None where they can run (one rank, the Triton prefill kernel), False
        never."""
        cuda = model.norm.weight.device.type == "cuda"
        if cuda and (compile or compile_mode is not None):
            raise FerryError(
                "--compile is not offered for the serving engine on GPUs yet: torch.compile turns each layer's in-place "
                "K/V write into a copy of its whole pool view (Llama-3-8B shape, batch 64, H200: 68.4 ms per decode "
                "step compiled vs 8.65 ms with CUDA graphs alone); decode runs CUDA graphs with the Triton paged "
                "kernel")
        if overlap_prefill:
            raise FerryError("--overlap-prefill (two micro-batches per TP prefill, measured 1.02x) belongs to the "
                             "static-batch engine (build_engine picks it); the serving engine packs every sequence "
                             "in one row")
        if any(layer.self_attn.group_size is None for layer in model.layers):
            raise UnsupportedModelError("this tensor-parallel layout gives a rank an uneven number of query heads per "
                                        "KV head, which the paged KV cache does not run; choose another --tp")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.group = model.group
        self.stage = stage
        stage_layers = len(model.span.layers)
        use_graphs = cuda if cuda_graphs is None else cuda_graphs
        if use_graphs and getattr(model, "weight_streamer", None) is not None:
            log.info("weight streaming: decode runs eager (the cross-stream layer copies are not captured)")
            use_graphs = False
        if stage is not None and preemption == "auto":
            # Recompute: measuring prefill speed for the swap-or-recompute choice would need the whole pipeline,
            # and a swap could fail on one stage alone (its pinned pool full: stages hold different layer counts)
            # while the others went on, which would part the stages' schedules.
            preemption = "recompute"
        running = max_running or (128 if cuda else 64)
        # With decode graphs, a step carrying a prefill chunk costs several captured decode steps: admit in groups
        # of an eighth of the batch (scheduler.py has the measurement). Without graphs every step is eager alike.
        self.limits = SchedulerLimits(
            max_batched_tokens=max_batched_tokens or (2048 if cuda else 512), max_running=running,
            max_waiting=max_waiting, min_admission=max(1, running // 8) if use_graphs else 1)

        note = "given"
        if num_blocks is None:
            num_blocks, note = PagedKVCache.blocks_within(model, KVMemory.parse(kv_memory), block_size,
                                                          num_layers=stage_layers)
        num_blocks = self._agree_min([num_blocks])[0]  # every rank the same pool, or their schedules part
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, num_layers=stage_layers)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.width = self.blocks.blocks_for(self.config.max_context)  # block-table columns: a full-context sequence

        self.pinned_pool = pinned_pool or PinnedBufferPool(max_bytes=1 << 30, pin=cuda)
        self._copy = CopyStream(self.device, timed=True)  # copy seconds per direction for /metrics
        self.readback = TokenReadback(self.pinned_pool, self._copy)
        # Weak: the engine owns the swapper; a strong bound method back would make a cycle that keeps the whole KV
        # pool alive until the garbage collector happens to run.
        measure, agree = weakref.WeakMethod(self._measure_prefill), weakref.WeakMethod(self._agree_min)
        self.swap = KVSwap(self.cache, self.pinned_pool, self._copy, preemption,
                           measure_prefill=lambda: measure()(), agree=lambda values: agree()(values))
        self.scheduler = Scheduler(self.blocks, self.limits, self.swap)
        # The Triton kernel specialises on the table's row stride, so CUDA steps keep one width; the reference
        # (CPU) gathers every column it is given, so its eager steps send only the columns in use.
        self.inputs = StepInputs(self.device, self._copy, block_size, self.width, self.limits.max_batched_tokens,
                                 self.limits.max_running, narrow_tables=not cuda)

        self.graphs = None
        if use_graphs:
            from ferry.engine.paged_graphs import PagedDecodeGraphs

            self.graphs = PagedDecodeGraphs(model, self.cache, self.width, stage=stage is not None)
        self.prefill_graphs = None
        if use_graphs and prefill_graphs is not False and stage is None and self._prefill_graphs_fit(model):
            from ferry.engine.prefill_graphs import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(model, self.cache, self.width, self.limits.max_running,
                                                self.limits.max_batched_tokens, model.layers[0].self_attn.group_size,
                                                self.graphs.pool)
        self.compiled_decode = None
        step_path = self.graphs.path if self.graphs else "eager"
        if not cuda:
            step_path = self._compile_cpu_decode(compile, compile_mode, getattr(model, "weight_streamer", None))
        compiled = self.compiled_decode is not None
        heads = attention_heads(self.config.head_dim, self.config.num_heads, self.config.num_kv_heads, block_size)
        self.decode_path = (f"{step_path}, attention {decode_attention_path(self.device, compiled, heads)}, "
                            f"elementwise {'fused by inductor' if compiled else fused.path(self.device)}")
        self.prefill_path = (f"{self.prefill_graphs.path if self.prefill_graphs else 'eager'}, attention "
                             f"{prefill_attention_path(self.device)}")
        self.sync_output = sync_output
        self.stats = EngineStats()
        hidden_bytes = self.config.hidden_size * self.dtype.itemsize
        tp = self.group.world_size > 1
        embeds = model.span.first
        self._allreduce_bytes_per_token = (2 * stage_layers + embeds) * hidden_bytes if tp else 0
        self._allgather_bytes_per_row = self.config.vocab_size * self.dtype.itemsize if tp else 0
        self.collective_time = CollectiveTime(self.group, self.device, 2 * stage_layers + embeds, hidden_bytes) \
            if tp else None
        self._requests: dict[int, Request] = {}
        self._next_id = 0
        self._in_flight: _InFlight | None = None
        usable = self.blocks.usable_blocks * block_size
        self.kv_report = {
            "blocks": num_blocks, "block_size": block_size, "tokens": usable,
            "gib": round(self.cache.nbytes / (1 << 30), 3), "budget": note,
            "full_context_sequences": usable // self.config.max_context,
            "max_running": self.limits.max_running, "max_batched_tokens": self.limits.max_batched_tokens,
        }
        log.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB (%s); %d sequences of the full %d-token "
                 "context fit at once, more shorter ones (at most %d running)", num_blocks, block_size, usable,
                 self.cache.nbytes / (1 << 30), note, usable // self.config.max_context, self.config.max_context,
                 self.limits.max_running)
        log.info("engine on %s (%s), decode path: %s, prefill path: %s, token readback: %s", self.device, self.dtype,
                 self.decode_path, self.prefill_path, "sync" if sync_output else "async")
        if not cuda:  # what a CPU step runs on: torch's intra-op threads over the cores this process may use
            log.info("CPU threads: %d of the %d cores this process may run on (torch.set_num_threads changes it)",
                     torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count())

    def _compile_cpu_decode(self, compile: bool | None, mode: str | None, streamer) -> str:
        """Set up the compiled CPU decode step where asked (compile True), or by default (None) where it can run;
        returns the step's path for logs. Asked for where it cannot run: an error naming why."""
        from ferry.engine import cpu_compiled

        compiled, path = cpu_compiled.choose(compile, mode, self.model, self.stage, streamer is not None)
        if path == "eager":
            log.info("decode step: eager; --compile compiles it (about 2x the decode speed of SmolLM2 on 2 cores, "
                     "benchmarks/results/2026-11-30_cpu_decode.md; compiled once per machine, then ~7 s a process)")
        if not compiled:
            return path
        self.compiled_decode = cpu_compiled.CompiledCPUDecode(self.model, self.cache, mode)
        self.inputs.min_width = 2
        return cpu_compiled.PATH

    # -- requests ---------------------------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams, name: str = "the prompt") -> None:
        if not prompt_ids:
            raise InvalidRequestError(f"{name} is empty")
        low, high = min(prompt_ids), max(prompt_ids)
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise InvalidRequestError(f"{name} has token id {bad}, outside this model's vocabulary "
                                      f"0..{self.config.vocab_size - 1}")
        total = len(prompt_ids) + params.max_tokens
        if total > self.config.max_context:
            raise InvalidRequestError(f"{name} has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it "
                                      f"exceeds the model's context of {self.config.max_context} tokens")
        if self.blocks.blocks_for(total) > self.blocks.usable_blocks:
            raise InvalidRequestError(
                f"{name} with max_tokens={params.max_tokens} needs {self.blocks.blocks_for(total)} KV blocks "
                f"({total} tokens); the cache holds {self.blocks.usable_blocks} "
                f"({self.blocks.usable_blocks * self.blocks.block_size} tokens): raise --kv-memory or lower max_tokens")

    def check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if not prompts:
            raise InvalidRequestError("no prompts given")
        for i, ids in enumerate(prompts):
            self.check_request(ids, params, f"prompt {i}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: int | None = None) -> int:
        """Queue a request; returns its id (the `index` of its token events; `request_id` where the caller numbers
        requests itself). Raises QueueFullError at the bound."""
        request = self.new_request(prompt_ids, params, self._next_id if request_id is None else request_id)
        self.enqueue(request)
        return request.id

    def new_request(self, prompt_ids: list[int], params: SamplingParams, request_id: int) -> Request:
        """A checked request, not queued yet (the pipeline engine queues it at its micro-batch's next step)."""
        self.check_request(prompt_ids, params)
        return Request(request_id, Sequence(list(prompt_ids)), params, Sampler(params, self.device),
                       stop_token_ids(params, self.tokenizer))

    def enqueue(self, request: Request) -> None:
        self.scheduler.add(request)
        self._next_id = max(self._next_id, request.id + 1)
        self._requests[request.id] = request

    def abort(self, request_id: int) -> None:
        """Stop a request now and free its blocks (a token of it still in flight is dropped)."""
        request = self._requests.pop(request_id, None)
        if request is not None and not request.finished:
            request.seq.finish_reason = request.seq.finish_reason or "abort"
            self.scheduler.remove(request)

    def has_unfinished(self) -> bool:
        flight = self._in_flight
        return self.scheduler.has_work() or (flight is not None and any(not r.finished for r in flight.rows))

    def request(self, request_id: int) -> Request | None:
        return self._requests.get(request_id)

    # -- the step loop ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Run one step; returns the token events read back (the previous step's, with async readback)."""
        scheduled = self.scheduler.schedule()
        launched = self._launch(scheduled) if scheduled else None
        events = self._resolve(self._in_flight) if self._in_flight else []
        self._in_flight = launched
        if launched is not None and self.sync_output:
            events += self._resolve(launched)
            self._in_flight = None
        if launched is None and not events and self.scheduler.has_work():
            self._stuck()
        return events

    def finish_step(self) -> list[TokenEvent]:
        """The token events of the step in flight, if any (a pipeline stage's engine: the last stage's tokens)."""
        flight, self._in_flight = self._in_flight, None
        return self._resolve(flight) if flight else []

    def start_step(self) -> bool:
        """Schedule and launch a step whose tokens `finish_step` will read; False if there was nothing to run.
        The pipeline engine alternates the two over its micro-batches' engines."""
        assert self._in_flight is None, "finish_step first"
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.has_work():
                self._stuck()
            return False
        self._in_flight = self._launch(scheduled)
        return True

    @staticmethod
    def _stuck() -> None:
        raise FerryError("the scheduler could not run any waiting request (KV blocks exhausted with nothing "
                         "running); this is a bug")

    def _launch(self, step: ScheduledStep) -> _InFlight:
        for src, dst in step.copies:
            self.cache.copy_block(src, dst)
        previous = self._in_flight
        row_of = previous.row_of if previous else {}
        self.stats.steps += 1
        self.stats.decode_tokens += len(step.decodes)
        self.stats.prefill_tokens += step.num_tokens - len(step.decodes)
        rows = [c.request for c in step.decodes] + [c.request for c in step.prefills if c.samples]
        stage = self.stage  # a pipeline stage runs its layers only (pipeline_stage.py)
        if self.graphs is not None and not step.prefills and len(step.decodes) <= self.limits.max_running:
            graph = self.graphs.get(self.graphs.bucket(len(step.decodes)))
            t = self.inputs.build(step, row_of, bucket=graph.ids.shape[0], into=graph.inputs)
            self._feed_in_flight(graph.ids, t, previous)
            n = len(step.decodes)
            logits = stage.run_captured(graph, n) if stage else graph.replay(n)
            self.stats.graph_steps += 1
        elif (captured := self._prefill_graph(step)) is not None:
            t = self.inputs.build_packed(step, row_of, captured.region, captured.inputs, captured.tile_tokens)
            self._feed_in_flight(captured.ids, t, previous)
            logits = captured.replay(len(rows))
            self.stats.prefill_graph_steps += 1
        else:
            t = self.inputs.build(step, row_of)
            self._feed_in_flight(t.ids, t, previous)
            if stage:
                logits = stage.run(t.ids, t.positions, self.cache.layers, t.paged, t.logits_index)
            else:
                logits = self.step_logits(t.ids, t.positions, t.paged, t.logits_index)
                self.stats.compiled_steps += self.runs_compiled(t.paged)
        if stage and not stage.last:  # the last stage samples; this one receives its tokens
            pending = stage.receive_tokens(len(rows))
            return self._in_flight_of(rows, t, pending.buf, pending)
        tokens = self._sample(logits, rows)
        readback = self.readback.start(tokens)
        if stage:
            from ferry.parallel.pipeline_stage import ForwardedTokens

            readback = ForwardedTokens(stage, readback)  # reading them sends them to the earlier stages
        return self._in_flight_of(rows, t, tokens, readback)

    def _prefill_graphs_fit(self, model) -> bool:
        """Captured prefill steps read every chunk through the Triton prefill kernel; tensor-parallel steps keep
        their collectives eager (not measured captured yet)."""
        return prefill_attention_path(self.device) == PREFILL_TRITON_PATH and model.group.world_size == 1 \
            and model.layers[0].self_attn.group_size is not None

    def _prefill_graph(self, step: ScheduledStep):
        if self.prefill_graphs is None or not step.prefills:
            return None
        return self.prefill_graphs.for_step(step)

    def runs_compiled(self, paged: PagedBatch) -> bool:
        return self.compiled_decode is not None and not paged.prefills

    def step_logits(self, ids: torch.Tensor, positions: torch.Tensor, paged: PagedBatch,
                    logits_index: torch.Tensor) -> torch.Tensor:
        """Logits of one uploaded step ([tokens] ids and positions) outside CUDA graphs: the compiled CPU step for a
        decode-only step where the engine has one, else the eager model."""
        if self.runs_compiled(paged):
            return self.compiled_decode.run(ids, positions, paged, logits_index)
        return self.model(ids.view(1, -1), positions.view(1, -1), self.cache.layers, 0, logits_index=logits_index,
                          paged=paged)

    def _in_flight_of(self, rows: list[Request], t, tokens: torch.Tensor, readback) -> _InFlight:
        for r in rows:
            r.pending += 1
        self.stats.upload_bytes += self.inputs.last_upload_bytes
        self.stats.allreduce_bytes += self._allreduce_bytes_per_token * int(t.ids.numel())
        if self.collective_time is not None:
            self.collective_time.step(int(t.ids.numel()))
        if self.stage is None or self.stage.last:  # earlier stages get their tokens over the host link from it
            self.stats.readback_bytes += len(rows) * tokens.element_size()
            self.stats.allgather_bytes += self._allgather_bytes_per_row * len(rows)
        return _InFlight(rows, tokens, readback, {r.id: i for i, r in enumerate(rows)})

    @staticmethod
    def _feed_in_flight(ids: torch.Tensor, t, previous: _InFlight | None) -> None:
        """Tokens sampled by the previous step, still on their way to the host, are this step's inputs."""
        if t.pending_to.numel():
            ids.index_copy_(0, t.pending_to.long(), previous.tokens.index_select(0, t.pending_from.long()).to(ids.dtype))

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, r in enumerate(rows):
            if not r.params.greedy:
                tokens[i] = r.sampler(logits[i : i + 1])[0]
        return tokens

    def _resolve(self, flight: _InFlight) -> list[TokenEvent]:
        events = []
        for r, token in zip(flight.rows, flight.readback.result(), strict=True):
            if r.finished:
                self.stats.wasted_tokens += 1
                continue
            r.pending -= 1
            r.token_ids.append(token)
            delta = r.seq.append(token, self.tokenizer, r.eos_ids, r.params.stop, r.params.max_tokens)
            events.append(TokenEvent(r.id, token, delta, r.seq.finish_reason))
            if r.seq.finished:
                self.scheduler.remove(r)
                self._requests.pop(r.id, None)
        return events

    # -- start-up helpers -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, batch: int = 1, reserve_tokens: int = 4096, every_bucket: bool = False) -> None:
        """Capture (compiling first where compile is on) the decode step most requests start in, before the first
        request; `every_bucket`: every batch bucket up to `batch` (what a server does at start, so no capture
        lands inside a request). `reserve_tokens` is kept for callers of the static engine's signature."""
        if self.compiled_decode is not None:
            self.compiled_decode.warm_up(NULL_BLOCK, self.blocks.block_size, batch)
            return
        if self.graphs is None:
            return
        from ferry.engine.cuda_graphs import BATCH_BUCKETS

        top = self.graphs.bucket(batch)
        for bucket in [b for b in BATCH_BUCKETS if b <= top] if every_bucket else [top]:
            self.graphs.get(bucket)
        if every_bucket and self.prefill_graphs is not None:
            for bucket in self.prefill_graphs.buckets:
                self.prefill_graphs.get(bucket)

    def _measure_prefill(self, tokens: int = 128) -> float:
        """Prefill tokens/s of one `tokens`-token chunk, run against the padding block (no cache state touched)."""
        tokens = min(tokens, self.limits.max_batched_tokens)
        ids = torch.zeros(1, tokens, dtype=torch.int32, device=self.device)
        positions = torch.arange(tokens, dtype=torch.int32, device=self.device).view(1, tokens)
        table = torch.zeros(self.blocks.blocks_for(tokens), dtype=torch.int32, device=self.device)
        paged = PagedBatch(slots=torch.zeros(tokens, dtype=torch.int32, device=self.device), decode_rows=0,
                           block_tables=None, context_lens=None, prefills=(PrefillChunk(0, tokens, 0, table),))
        last = torch.tensor([tokens - 1], device=self.device)
        times = []
        with torch.inference_mode():
            for _ in range(3):
                started = time.perf_counter()
                self.model(ids, positions, self.cache.layers, 0, logits_index=last, paged=paged).cpu()
                times.append(time.perf_counter() - started)
        return tokens / sorted(times)[1]

    def _agree_min(self, values: list[float]) -> list:
        """The smallest of each value over the tensor-parallel ranks (and every pipeline stage)."""
        if self.stage is not None:
            return [type(v)(x) for v, x in zip(values, self.stage.links.agree_min(values), strict=True)]
        if self.group.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group.process_group)
        return [type(v)(x) for v, x in zip(values, t.tolist(), strict=True)]

    def gauges(self) -> dict[str, int]:
        """What /metrics shows of the engine: queue and batch sizes, KV blocks, and cumulative work and link bytes."""
        s, sched, blocks, swap = self.stats, self.scheduler, self.blocks, self.swap.stats
        return {
            "waiting": len(sched.waiting), "running": len(sched.running), "swapped": len(sched.swapped),
            "kv_blocks_used": blocks.usable_blocks - blocks.free_blocks, "kv_blocks_total": blocks.usable_blocks,
            "steps": s.steps, "graph_steps": s.graph_steps, "prefill_graph_steps": s.prefill_graph_steps,
            "prefill_tokens": s.prefill_tokens,
            "decode_tokens": s.decode_tokens, "prefix_hit_tokens": blocks.stats.prefix_hit_tokens,
            "preemptions": swap.swapped_out + swap.recomputed,
            "pcie_h2d_bytes": s.upload_bytes + swap.swap_in_bytes,
            "pcie_d2h_bytes": s.readback_bytes + swap.swap_out_bytes,
            "allreduce_bytes": s.allreduce_bytes, "allgather_bytes": s.allgather_bytes,
            **{f"pcie_{way}_seconds": v for way, v in self._copy.timer.seconds().items()},
            **(self.collective_time.seconds() if self.collective_time is not None else {}),
        }

    def check_no_leaks(self) -> None:
        """All blocks free and nothing queued (tests call it after every run)."""
        if self.has_unfinished():
            raise AssertionError("requests are still queued or running")
        if self._in_flight is not None:  # a step whose requests were all aborted: read it back, drop its tokens
            self._resolve(self._in_flight)
            self._in_flight = None
        self.blocks.check_no_leaks()


def build_engine(model: LlamaForCausalLM, tokenizer: FerryTokenizer | None, **options):
    """The serving engine, or the static-batch engine where an option only it has is asked for (--overlap-prefill:
    the micro-batch overlap schedule splits a batch's rows, which only its dense layout has). Logged."""
    if options.get("overlap_prefill"):
        from ferry.engine.static_engine import StaticBatchEngine

        log.warning("--overlap-prefill: running the static-batch engine (no continuous batching, dense KV cache)")
        options.pop("kv_memory", None)
        return StaticBatchEngine(model, tokenizer, **options)
    return Engine(model, tokenizer, **options)
