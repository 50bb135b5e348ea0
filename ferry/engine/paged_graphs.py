"""Decode-only steps of the serving engine captured as CUDA graphs, one per batch bucket.

A captured step reads fixed device buffers: token ids, positions, K/V slots, context lengths and block tables
(step_inputs.py lays a decode-only step out exactly so, and uploads it straight into them). Attention loops over
each sequence's blocks up to its own length inside the kernel, so one graph serves every context length: only
the batch is bucketed. Steps with prefill chunks run eagerly (their shapes change every step).
"""

from __future__ import annotations

import logging
import time

import torch

from ferry.engine.cuda_graphs import batch_bucket
from ferry.engine.paged_cache import PagedKVCache
from ferry.engine.step_inputs import decode_region, decode_views
from ferry.model.layers.attention import PagedBatch

log = logging.getLogger("ferry.graphs")


class _CapturedDecode:
    def __init__(self, forward, cache: PagedKVCache, rows: int, width: int, pool, stage_model=None) -> None:
        device = cache.device
        # Zeros: warm-up and capture write K/V into the padding block and read nothing (context 0).
        self.inputs = torch.zeros(decode_region(rows, width), dtype=torch.int32, device=device)
        ids, positions, slots, lens, tables = decode_views(self.inputs, rows, width)
        self.ids = ids
        paged = PagedBatch(slots=slots, decode_rows=rows, block_tables=tables, context_lens=lens)
        every_row = torch.arange(rows, device=device)
        # The graph reads these by address: they must live as long as it does (a freed index tensor was reused
        # by the allocator and the replay read garbage indices).
        self._read_by_graph = (every_row, paged)
        # A pipeline stage after the first reads the previous stage's hidden states from this buffer instead.
        self.hidden = None
        if stage_model is not None and not stage_model.span.first:
            self.hidden = torch.zeros((1, rows, stage_model.config.hidden_size), dtype=stage_model.norm.weight.dtype,
                                      device=device)

        def step():
            if stage_model is not None:
                inputs = self.hidden if self.hidden is not None else ids.view(1, rows)
                return stage_model.stage_forward(inputs, positions.view(1, rows), cache.layers, paged, every_row)
            return forward(ids.view(1, rows), positions.view(1, rows), cache.layers, 0, logits_index=every_row,
                           paged=paged)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compilation, lazy inits and autotuning happen outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = step()  # a stage before the last: its hidden states [1, rows, hidden]

    def replay(self, rows: int) -> torch.Tensor:
        self.graph.replay()
        return self.logits[:rows] if self.logits.dim() == 2 else self.logits[:, :rows]


class PagedDecodeGraphs:
    """Captures a bucket on first use; `compile` first runs the step through torch.compile (compiled_step.py)."""

    def __init__(self, model, cache: PagedKVCache, width: int, compile: bool = False,
                 compile_mode: str | None = None, stage: bool = False) -> None:
        """`stage`: capture the model's pipeline stage (stage_forward) rather than the whole forward."""
        from ferry.engine.compiled_step import compile_decode_step

        self.cache, self.width, self.compiled = cache, width, compile
        self.forward, self.path = model, "cuda-graph"
        self.stage_model = model if stage else None
        if compile:
            self.forward, mode = compile_decode_step(model, compile_mode)
            self.path = f"cuda-graph+compile({mode})"
        self.graphs: dict[int, _CapturedDecode] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def bucket(self, rows: int) -> int:
        return batch_bucket(rows)

    def get(self, bucket: int) -> _CapturedDecode:
        graph = self.graphs.get(bucket)
        if graph is None:
            started = time.perf_counter()
            graph = self.graphs[bucket] = _CapturedDecode(self.forward, self.cache, bucket, self.width, self.pool,
                                                          self.stage_model)
            log.log(logging.WARNING if self.compiled else logging.INFO, "paged decode step for %d rows %s in %.1f s",
                    bucket, "compiled and captured" if self.compiled else "captured", time.perf_counter() - started)
        return graph
