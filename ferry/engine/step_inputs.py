"""A scheduled step's inputs, written into one pinned int32 buffer and uploaded in one copy.

Layout (int32, one region after another): token ids, positions, K/V slots [tokens]; decode context lengths
[decode rows]; decode block tables [decode rows, width]; then, for eager steps, the rows whose logits are
sampled, the prefill chunks' block tables, and where tokens still in flight go (their source rows in the
previous step's sampled tokens, and their rows here). A decode-only step is laid out at its CUDA-graph bucket's
size with padding rows (token 0 at position 0, writing the padding block, context 0), so the upload lands
directly in the captured graph's input buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ferry.engine.block_manager import NULL_BLOCK
from ferry.engine.scheduler import ScheduledStep
from ferry.model.layers.attention import PagedBatch, PrefillChunk


@dataclass
class StepTensors:
    """Device views of one uploaded step."""

    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    paged: PagedBatch | None  # None: a captured prefill step, whose graph holds its own
    logits_index: torch.Tensor  # [sampled rows]
    pending_from: torch.Tensor  # rows of the previous step's sampled tokens ...
    pending_to: torch.Tensor  # ... that are this step's input ids at these rows


def decode_region(rows: int, width: int) -> int:
    """int32 elements of a decode-only step's fixed part at `rows` rows (what a captured graph reads)."""
    return rows * (4 + width)


def decode_views(buf: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, ...]:
    """ids, positions, slots, context lens, block tables of a decode-only layout in `buf` (int32)."""
    ids, positions, slots, lens = (buf[i * rows : (i + 1) * rows] for i in range(4))
    return ids, positions, slots, lens, buf[4 * rows : 4 * rows + rows * width].view(rows, width)


@dataclass(frozen=True)
class PackedRegion:
    """Offsets (int32 elements) of a captured prefill step's inputs in one buffer: every sequence of the step is a
    chunk (a decode row is a chunk of one token), tokens padded to `tokens`, `chunks` chunk slots."""

    tokens: int
    chunks: int
    width: int
    max_tiles: int

    @property
    def meta_at(self) -> int:
        return 3 * self.tokens + self.chunks  # after ids, positions, slots and the sampled rows

    @property
    def tables_at(self) -> int:
        from ferry.model.layers.paged_prefill_kernel import fixed_meta_size

        return self.meta_at + fixed_meta_size(self.chunks, self.max_tiles)

    @property
    def total(self) -> int:
        return self.tables_at + self.chunks * self.width

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots [tokens], sampled rows [chunks], meta, tables [chunks, width] of `buf`."""
        t = self.tokens
        return (buf[:t], buf[t : 2 * t], buf[2 * t : 3 * t], buf[3 * t : self.meta_at],
                buf[self.meta_at : self.tables_at], buf[self.tables_at : self.total].reshape(self.chunks, self.width))


class StepInputs:
    def __init__(self, device: torch.device, copy, block_size: int, width: int, max_tokens: int, max_rows: int,
                 narrow_tables: bool = False) -> None:
        self.device, self.copy, self.block_size, self.width = device, copy, block_size, width
        self.narrow_tables = narrow_tables
        # A compiled step takes the narrowed width as a dynamic size; torch specialises a size of 1, so a compiled
        # CPU step sets 2 here (one graph for every width instead of a second compile for contexts of one block).
        self.min_width = 1
        pin = device.type == "cuda"
        # The second line: a captured prefill step's layout (PackedRegion) at up to 256 tokens.
        capacity = 3 * max_tokens + 2 * max_rows * (width + 2) + 3 * max_rows + 64 \
            + 5 * 256 + 8 * max_rows
        self._host = [torch.zeros(capacity, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._np = [h.numpy() for h in self._host]
        self._dev = [torch.zeros(capacity, dtype=torch.int32, device=device) for _ in range(2)]
        self._fences: list = [None, None]
        self._slot = 0
        self.uploads = 0
        self.last_upload_bytes = 0

    def _next_host(self) -> np.ndarray:
        self._slot ^= 1
        if self._fences[self._slot] is not None:
            self._fences[self._slot].synchronize()  # that slot's previous upload has left the host buffer
        return self._np[self._slot]

    def build_packed(self, step: ScheduledStep, previous_rows: dict[int, int], region: PackedRegion,
                     into: torch.Tensor, tile_tokens: int) -> StepTensors:
        """`step` (it has prefill chunks) laid out for a captured prefill graph (prefill_graphs.py) and uploaded
        into its input buffer `into`; in-flight routing goes to the spare device buffer. Every sequence is one
        chunk record of the prefill kernel's layout, decode rows first, in the order the engine samples them."""
        from ferry.model.layers.paged_prefill_kernel import write_fixed_records

        host = self._next_host()
        fixed = region.total
        host[:fixed] = 0  # padding tokens: token 0 at position 0 writing slot 0 of the padding block
        ids, positions, slots, sampled_rows, meta, tables = region.views(host)
        bs, width = self.block_size, region.width
        spans, sampled, pending_from, pending_to = [], [], [], []
        row = 0
        decodes = len(step.decodes)
        for index, chunk in enumerate([*step.decodes, *step.prefills]):
            r, start, n = chunk.request, chunk.start, chunk.length
            if index < decodes and r.pending:
                pending_from.append(previous_rows[r.id])
                pending_to.append(row)
            else:
                ids[row : row + n] = r.token_ids[start : start + n]
            pos = np.arange(start, start + n, dtype=np.int32)
            positions[row : row + n] = pos
            blocks = np.asarray(r.table.blocks, dtype=np.int32)
            slots[row : row + n] = blocks[pos // bs] * bs + pos % bs
            tables[index, : len(blocks)] = blocks
            spans.append((row, n, start, index * width))
            if index < decodes or chunk.samples:
                sampled.append(row + n - 1)
            row += n
        write_fixed_records(meta, spans, tile_tokens, region.chunks, region.max_tiles)
        sampled_rows[: len(sampled)] = sampled
        k = len(pending_from)
        host[fixed : fixed + k] = pending_from
        host[fixed + k : fixed + 2 * k] = pending_to
        src, spare = self._host[self._slot], self._dev[self._slot]
        self.copy.copy_in_order(into, src[:fixed], host_pinned=src.is_pinned())
        self._fences[self._slot] = self.copy.copy_in_order(spare[fixed : fixed + 2 * k], src[fixed : fixed + 2 * k],
                                                           host_pinned=src.is_pinned())
        self.uploads += 1
        self.last_upload_bytes = (fixed + 2 * k) * 4
        dev_ids, dev_positions, _, dev_sampled, _, _ = region.views(into)
        return StepTensors(ids=dev_ids, positions=dev_positions, paged=None, logits_index=dev_sampled[: len(sampled)],
                           pending_from=spare[fixed : fixed + k], pending_to=spare[fixed + k : fixed + 2 * k])

    def build(self, step: ScheduledStep, previous_rows: dict[int, int], bucket: int | None = None,
              into: torch.Tensor | None = None) -> StepTensors:
        """Write `step` and upload it. `previous_rows`: request id -> row of the previous step's sampled tokens,
        for tokens still in flight. `bucket`: a decode-only step padded to this many rows, uploaded `into` the
        graph's input buffer."""
        host = self._next_host()
        decodes, prefills = step.decodes, step.prefills
        # A captured step reads tables of the full width; with `narrow_tables` an eager one only as many columns as
        # its longest sequence has blocks, so the reference attention never gathers columns nobody uses.
        bs = self.block_size
        width = self.width
        if self.narrow_tables and not bucket:
            width = max(max((len(c.request.table.blocks) for c in decodes), default=1), self.min_width)
        d = len(decodes)
        rows = bucket or d
        tokens = rows if bucket else step.num_tokens
        ids, positions, slots = host[:tokens], host[tokens : 2 * tokens], host[2 * tokens : 3 * tokens]
        at = 3 * tokens
        lens = host[at : at + rows]
        tables = host[at + rows : at + rows + rows * width].reshape(rows, width)
        at += rows * (1 + width)
        if bucket:  # the padding rows of a captured step
            host[:at] = 0
        pending_from, pending_to = [], []
        for i, chunk in enumerate(decodes):
            r, pos = chunk.request, chunk.start
            blocks = r.table.blocks
            if r.pending:
                pending_from.append(previous_rows[r.id])
                pending_to.append(i)
            else:
                ids[i] = r.token_ids[pos]
            positions[i] = pos
            slots[i] = blocks[pos // bs] * bs + pos % bs
            lens[i] = pos + 1
            n = len(blocks)
            tables[i, :n] = blocks
            tables[i, n:] = NULL_BLOCK
        fixed = at
        # Eager-only regions: sampled rows, prefill tables, in-flight token routing.
        sampled = list(range(d))
        row = d
        table_spans = []
        for chunk in prefills:
            r, start, n = chunk.request, chunk.start, chunk.length
            ids[row : row + n] = r.token_ids[start : start + n]
            pos = np.arange(start, start + n, dtype=np.int32)
            positions[row : row + n] = pos
            blocks = np.asarray(r.table.blocks, dtype=np.int32)
            slots[row : row + n] = blocks[pos // bs] * bs + pos % bs
            if chunk.samples:
                sampled.append(row + n - 1)
            table_spans.append((at, len(blocks)))
            host[at : at + len(blocks)] = blocks
            at += len(blocks)
            row += n
        logits_at = at
        host[at : at + len(sampled)] = sampled
        at += len(sampled)
        pend_at = at
        host[at : at + len(pending_from)] = pending_from
        host[at + len(pending_from) : at + 2 * len(pending_from)] = pending_to
        at += 2 * len(pending_from)

        dev = into if into is not None else self._dev[self._slot]
        src = self._host[self._slot]
        if into is not None and at > fixed:  # a graph buffer holds the fixed part; routing goes to the spare slot
            spare = self._dev[self._slot]
            self.copy.copy_in_order(into[:fixed], src[:fixed], host_pinned=src.is_pinned())
            self._fences[self._slot] = self.copy.copy_in_order(spare[fixed:at], src[fixed:at], host_pinned=src.is_pinned())
            tail = spare
        else:
            self._fences[self._slot] = self.copy.copy_in_order(dev[:at], src[:at], host_pinned=src.is_pinned())
            tail = dev
        self.uploads += 1
        self.last_upload_bytes = at * 4
        k = len(pending_from)
        chunks = []
        row = d
        for chunk, (t_at, t_len) in zip(prefills, table_spans, strict=True):
            chunks.append(PrefillChunk(row, chunk.length, chunk.start, tail[t_at : t_at + t_len]))
            row += chunk.length
        paged = PagedBatch(slots=dev[2 * tokens : 3 * tokens], decode_rows=rows if bucket else d,
                           block_tables=dev[3 * tokens + rows : 3 * tokens + rows + rows * width].view(rows, width),
                           context_lens=dev[3 * tokens : 3 * tokens + rows], prefills=tuple(chunks))
        return StepTensors(ids=dev[:tokens], positions=dev[tokens : 2 * tokens], paged=paged,
                           logits_index=tail[logits_at : logits_at + len(sampled)],
                           pending_from=tail[pend_at : pend_at + k], pending_to=tail[pend_at + k : pend_at + 2 * k])
