"""One sequence through a model, or its first K layers, over a paged KV cache of its own.

The edge of a split (layers 0..K-1: hidden states out) and the speculative draft (the whole model: the next
token's logits out) each run a single sequence a token at a time, with multi-token steps for prompts and verify
rounds. They use the serving engine's paged attention and, on a CPU, its compiled decode step (cpu_compiled.py),
so a one-token step is one C++ call instead of ~45 ops a layer. The sequence owns blocks 0, 1, 2, ... in order,
so its block table is a range and forgetting tokens (rejected drafts, a new prompt) only means writing over them:
attention reads no further than the position being run.
"""

from __future__ import annotations

import logging

import torch

from ferry.engine import cpu_compiled
from ferry.engine.paged_cache import BLOCK_SIZE, PagedKVCache
from ferry.errors import FerryError
from ferry.model.layers.attention import PagedBatch, PrefillChunk
from ferry.model.layers.paged_attention import attention_heads, decode_attention_path

log = logging.getLogger("ferry.engine")


class SequenceRunner:
    def __init__(self, model, num_layers: int | None = None, compile: bool | None = None,
                 mode: str | None = None, pool_tokens: int | None = None) -> None:
        """`num_layers`: run layers 0..num_layers-1 on hidden states (None: the whole model on token ids).
        `compile` as the serving engine's: True asks (an error where it cannot run), None compiles on a CPU unless
        FERRY_COMPILE=0, False never. The compiled step is built here and traced on the first one-token step (or
        `warm_up`, once the weights are read). `pool_tokens`: the pool's first size (default: below)."""
        config = model.config
        self.model, self.device = model, model.norm.weight.device
        self.layers = range(num_layers) if num_layers is not None else None
        self.max_tokens = config.max_context
        # On a CPU the pool covers the whole context: its pages are touched only as tokens are written, so an
        # unused tail costs no memory, and a pool that never grows keeps one compiled graph. Elsewhere it grows.
        default = self.max_tokens if self.device.type == "cpu" else min(self.max_tokens, 1024)
        self.cache = self._pool(pool_tokens or default, num_layers)
        compiled, step = cpu_compiled.choose(compile, mode, model)
        heads = attention_heads(config.head_dim, config.num_heads, config.num_kv_heads, BLOCK_SIZE)
        self.path = f"{step}, attention {decode_attention_path(self.device, compiled, heads)}"
        self.compiled = cpu_compiled.CompiledCPUDecode(model, self.cache, mode, self.layers) if compiled else None
        self._eager = cpu_compiled.step_function(model, self.layers)  # steps of several tokens; every step eager
        self.steps = self.compiled_steps = 0

    def _pool(self, tokens: int, num_layers: int | None) -> PagedKVCache:
        # +1: the last block is the padding block a warm-up writes into; no position reaches it
        blocks = -(-tokens // BLOCK_SIZE) + 1
        self.table = torch.arange(blocks, dtype=torch.int32, device=self.device)
        return PagedKVCache.for_model(self.model, blocks, BLOCK_SIZE, num_layers)

    @property
    def capacity(self) -> int:
        """Positions the pool holds (its padding block aside)."""
        return (self.cache.num_blocks - 1) * BLOCK_SIZE

    def _grow(self, tokens: int) -> None:
        """Room for positions [0, tokens): a pool twice as large, holding what the old one held (not on a CPU)."""
        old = self.cache
        self.cache = self._pool(min(self.max_tokens, max(2 * self.capacity, tokens)), old.num_layers)
        used = torch.arange(old.num_blocks - 1, device=self.device)
        self.cache.write_blocks(used, old.block_view(used))
        if self.compiled is not None:  # a new pool size: traced again on its next step
            self.compiled.cache = self.cache

    def warm_up(self) -> None:
        """Trace and compile the one-token step now (after the weights are read) rather than in the first answer."""
        if self.compiled is not None:
            self.compiled.warm_up(self.cache.num_blocks - 1, BLOCK_SIZE)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """inputs at positions [start, start + n): [n] token ids (whole model) -> fp32 logits [1, vocab] of the
        last, or [n, hidden] hidden states (first layers) -> theirs. K/V of positions >= start are replaced."""
        n = inputs.shape[0]
        end = start + n
        if self.layers is None:
            inputs = inputs.to(torch.int32)  # the compiled graph's dtype, as the engine's packed ids
        if end > self.max_tokens:
            raise FerryError(f"position {end - 1} is past the model's context of {self.max_tokens} tokens")
        if end > self.capacity:
            self._grow(end)
        positions = torch.arange(start, end, dtype=torch.int32, device=self.device)
        used = -(-end // BLOCK_SIZE)
        # the row whose logits the whole model returns, int32 as the engine's (the compiled step's guards)
        last = torch.tensor([n - 1], dtype=torch.int32, device=self.device)
        self.steps += 1
        if n == 1:
            # at least two columns: a width of 1 would be specialised by the compiler, and the graph kept for it
            paged = PagedBatch(slots=positions, decode_rows=1, block_tables=self.table[: max(used, 2)].view(1, -1),
                               context_lens=torch.tensor([end], dtype=torch.int32, device=self.device))
            if self.compiled is not None:
                self.compiled_steps += 1
                return self.compiled.run(inputs, positions, paged, last)
        else:
            paged = PagedBatch(slots=positions, decode_rows=0, block_tables=None, context_lens=None,
                               prefills=(PrefillChunk(0, n, start, self.table[:used]),))
        return self._eager(inputs.unsqueeze(0), positions.view(1, -1), self.cache.layers, paged, last)
