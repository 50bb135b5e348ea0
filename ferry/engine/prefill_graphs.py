"""Small steps that carry prefill chunks, captured as CUDA graphs by token count.

Why: such a step runs eagerly otherwise, and at a few dozen tokens its time is the host's, not the GPU's: a
32-token step after a cached 2000-token prefix (Llama-3-8B shape, H200) took 13.0 ms to its first token, about
nine kernel and matmul launches a layer dispatched one by one, against 49.9 ms for the whole 2032-token prefill
(benchmarks/results/2026-11-30_serve_core_llama3-8b_cuda_run6_prefill.md).

A captured step has a fixed token count (a bucket: 16..256) and room for a fixed number of sequences. Every
sequence of the step, decode rows included, is one chunk of the prefill kernel's fixed layout
(paged_prefill_kernel.PrefillLayout.fixed): its records, block tables, token ids, positions, K/V slots and the
rows to sample are rewritten in the graph's input buffer before each replay (step_inputs.build_packed), and the
kernel's grid covers the bucket's most tiles, the ones past the step's doing nothing. Padding tokens write the
padding block, as a decode graph's padding rows do. Larger steps stay eager: their matmuls keep the GPU busy.
"""

from __future__ import annotations

import logging
import time

import torch

from ferry.engine.paged_cache import PagedKVCache
from ferry.engine.scheduler import ScheduledStep
from ferry.engine.step_inputs import PackedRegion
from ferry.model.layers.attention import PagedBatch, PrefillChunk
from ferry.model.layers.paged_prefill_kernel import PrefillLayout, max_tiles_for, tile_tokens_for

log = logging.getLogger("ferry.graphs")

TOKEN_BUCKETS = (16, 32, 64, 128, 256)


class CapturedPrefill:
    def __init__(self, model, cache: PagedKVCache, tokens: int, chunks: int, width: int, group: int, pool,
                 capture: bool = True) -> None:
        """`capture=False` runs the same step on the same buffers without a graph: how the CPU tests check the
        layout and the engine's use of it in Triton's interpreter."""
        self.tokens, self.chunks = tokens, chunks
        self.tile_tokens = tile_tokens_for(group)
        max_tiles = max_tiles_for(tokens, chunks, self.tile_tokens)
        self.region = PackedRegion(tokens, chunks, width, max_tiles)
        self.inputs = torch.zeros(self.region.total, dtype=torch.int32, device=cache.device)
        ids, positions, slots, sampled, meta, tables = self.region.views(self.inputs)
        self.ids = ids
        paged = PagedBatch(slots=slots, decode_rows=0, block_tables=None, context_lens=None,
                           prefills=(PrefillChunk(0, tokens, 0, tables.view(-1)),))
        paged.use_layout(group, PrefillLayout.fixed(meta, tables.view(-1), chunks, max_tiles, group))
        self._read_by_graph = paged  # the graph reads its tensors by address: they live as long as it does

        def step():
            return model(ids.view(1, tokens), positions.view(1, tokens), cache.layers, 0, logits_index=sampled,
                         paged=paged)

        self.graph = None
        if not capture:
            self._step = step
            return
        side = torch.cuda.Stream(cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton compiles and lazy inits happen outside the capture
                step()
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = step()

    def replay(self, rows: int) -> torch.Tensor:
        if self.graph is None:
            self.logits = self._step()
        else:
            self.graph.replay()
        return self.logits[:rows]


class PrefillGraphs:
    """One captured step per token bucket, captured on first use (or all at warm-up)."""

    def __init__(self, model, cache: PagedKVCache, width: int, max_running: int, max_tokens: int, group: int,
                 pool, capture: bool = True) -> None:
        self.model, self.cache, self.width, self.group, self.pool = model, cache, width, group, pool
        self.capture = capture
        self.max_running = max_running
        self.buckets = [t for t in TOKEN_BUCKETS if t <= max_tokens] or [TOKEN_BUCKETS[0]]
        self.graphs: dict[int, CapturedPrefill] = {}
        self.path = f"cuda-graph up to {self.buckets[-1]} tokens, eager above"

    def chunks(self, tokens: int) -> int:
        return min(tokens, self.max_running)

    def for_step(self, step: ScheduledStep) -> CapturedPrefill | None:
        """The captured step this one fits, or None (more tokens than the largest bucket)."""
        tokens, sequences = step.num_tokens, len(step.decodes) + len(step.prefills)
        for bucket in self.buckets:
            if tokens <= bucket and sequences <= self.chunks(bucket):
                return self.get(bucket)
        return None

    def get(self, bucket: int) -> CapturedPrefill:
        graph = self.graphs.get(bucket)
        if graph is None:
            started = time.perf_counter()
            graph = self.graphs[bucket] = CapturedPrefill(self.model, self.cache, bucket, self.chunks(bucket),
                                                          self.width, self.group, self.pool, self.capture)
            log.info("prefill step of %d tokens (%d sequences) captured in %.1f s", bucket, self.chunks(bucket),
                     time.perf_counter() - started)
        return graph
