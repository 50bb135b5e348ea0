"""Decode steps captured as CUDA graphs, one per (batch bucket, context bucket).

A decode step of a small model is hundreds of tiny kernels; replaying them as one graph removes the
per-kernel launch cost that otherwise dominates batch-1 decode. Context is bucketed too, so attention
reads only the cache prefix a step needs rather than the whole allocation.
"""

from __future__ import annotations

import logging
import time

import torch

from ferry.engine.compiled_step import compile_decode_step
from ferry.engine.kv_cache import KVCache
from ferry.model.llama import LlamaForCausalLM

log = logging.getLogger("ferry.graphs")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MIN_CONTEXT_BUCKET = 256


def batch_bucket(batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= batch), batch)


def context_bucket(length: int, limit: int) -> int:
    bucket = MIN_CONTEXT_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


class _CapturedStep:
    def __init__(self, forward, cache: KVCache, batch: int, kv_len: int, pool) -> None:
        device = cache.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Warm-up runs really execute and write K/V. Capture can happen mid-generation (a new context bucket), so
        # they write at the bucket's last slot: beyond every live row's position, and each row's own step
        # overwrites a slot before it first attends to it.
        self.positions = torch.full((batch, 1), kv_len - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation, lazy inits and autotuning happen outside the capture
                forward(self.ids, self.positions, cache.layers, kv_len)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = forward(self.ids, self.positions, cache.layers, kv_len)

    def run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        # Padding rows decode token 0 at position 0 in cache rows no live sequence uses.
        self.ids[n:].zero_()
        self.positions[n:].zero_()
        self.graph.replay()
        return self.logits[:n]


class DecodeGraphs:
    """Captures lazily on first use of a bucket; forgets everything when the cache is reallocated."""

    def __init__(
        self, model: LlamaForCausalLM, cache: KVCache, compile: bool = False, compile_mode: str | None = None
    ) -> None:
        self.cache = cache
        # torch.compile fuses the small elementwise kernels between the matmuls (norms, RoPE, SwiGLU, residual
        # adds); inside a graph each would still cost GPU time. Shapes are static per bucket (compiled_step.py
        # says which mode and why).
        self.forward, self.path = model, "cuda-graph"
        if compile:
            self.forward, mode = compile_decode_step(model, compile_mode)
            self.path = f"cuda-graph+compile({mode})"
        self.compiled = compile
        self.graphs: dict[tuple[int, int], _CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def reset(self) -> None:
        """Drop every graph (the cache they read was reallocated) and start a fresh memory pool for the next.

        A pool whose graphs are all destroyed is released by the caching allocator, yet stays registered until
        its blocks are freed; capturing into it again fails `use_count > 0` in capture_begin. That is what a second
        generate with a larger batch (cache grown, graphs reset, bucket captured) hit on the H200."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def step(self, ids: torch.Tensor, positions: torch.Tensor, needed_len: int) -> torch.Tensor:
        key = (batch_bucket(ids.shape[0]), context_bucket(needed_len, self.cache.max_len))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.capture(*key)
        return graph.run(ids, positions)

    def capture(self, batch: int, context: int) -> _CapturedStep:
        """Capture (compiling first, with compile on) the step of one bucket; logs what it did and how long it took."""
        started = time.perf_counter()
        if self.compiled:
            log.warning("compiling the decode step for batch %d, context %d (%s): minutes the first time on a "
                        "machine, seconds once its compile cache holds it", batch, context, self.path)
        graph = self.graphs[(batch, context)] = _CapturedStep(self.forward, self.cache, batch, context, self.pool)
        log.log(logging.WARNING if self.compiled else logging.INFO, "decode step for batch %d, context %d %s in "
                "%.1f s", batch, context, "compiled and captured" if self.compiled else "captured",
                time.perf_counter() - started)
        return graph
