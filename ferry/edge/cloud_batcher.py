"""The cloud's batched path: every session's frame joins one forward of the cloud's layers over a shared paged KV pool.

Session handler threads (one per gRPC stream) submit their frame's decoded hidden states and wait on a future; one
batching thread takes whatever has been submitted, packs it the way the serving engine packs a step (one-token
frames first as decode rows, multi-token frames after them as prefill chunks; a VERIFY frame is such a chunk whose
logits rows are its drafts' positions), runs the cloud's layers once over all of it through the pool, computes the
LM head for just the rows that need it, and hands each session its rows of logits. Sampling stays with the
session (its own sampler and seed), so a session's tokens do not depend on who shared its steps.

Sessions that chose different split points K run different layers: a step runs one forward per K present.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ferry.engine.block_manager import NULL_BLOCK, BlockManager, BlockTable
from ferry.engine.paged_cache import BLOCK_SIZE, KVMemory, PagedKVCache
from ferry.errors import FerryError
from ferry.model.layers.attention import PagedBatch, PrefillChunk
from ferry.model.loader import LoadedModel

log = logging.getLogger("ferry.cloud")

# How long a step may wait for the sessions in a request whose next frame has not come yet (it never waits for
# sessions between requests, and stops waiting once every session in a request has its frame in). Decode is
# weight-bound, so a step of n rows costs about what a step of one does: a session that misses a step by a few ms
# costs a whole extra step, and sessions that keep missing each other settle into groups that take turns. Waiting
# is worth up to a fraction of a step, so by default the window is a quarter of the last step's time, at most
# 20 ms (a step of 8 ms waits at most 2 ms). On the 2-core CPU with in-process edges (~55 ms SmolLM2 steps) 4 and 8
# sessions reached 3.7 and 8 frames per step with it, 2 and 4 with no window (the sessions took turns in two
# groups): 2.05x and 3.01x the one-by-one path's tokens/s against 1.23x and 1.9x
# (benchmarks/results/2026-11-30_cloud_batching_cpu.md).
WINDOW_FRACTION = 0.25
MAX_WINDOW_S = 0.020


class KVPoolFullError(FerryError):
    """A session's frame needs more KV blocks than the cloud's pool has free."""


class CloudStepError(FerryError):
    """A batched step failed or did not finish in time; the sessions in it are closed with this message."""


@dataclass(frozen=True)
class CloudBatching:
    """`ferry cloud`'s batched path: the pool's size (KVMemory's forms, or a block count) and the step's limits."""

    kv_memory: str | float | None = None
    num_blocks: int | None = None  # overrides kv_memory (tests)
    window_ms: float | None = None  # None: WINDOW_FRACTION of the last step's time, at most MAX_WINDOW_S
    max_batched_tokens: int | None = None  # default: 2048 on CUDA, 512 elsewhere (the serving engine's)


DEFAULT_BATCHING = CloudBatching()


@dataclass
class CloudStats:
    """What the cloud ran: steps (batched: one forward of its layers per split point in the step; one by one: one
    per frame) and the frames they served."""

    steps: int = 0
    frames: int = 0
    tokens: int = 0
    max_frames_per_step: int = 0
    busy_s: float = 0.0  # time in forwards (and the LM head)

    def record(self, frames: int, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.frames += frames
        self.tokens += tokens
        self.max_frames_per_step = max(self.max_frames_per_step, frames)
        self.busy_s += seconds


@dataclass
class CloudSequence:
    """One session's KV in the pool: its blocks, for the layers from its split K on."""

    split: int
    table: BlockTable = field(default_factory=BlockTable)
    in_request: bool = False  # between REQUEST and END: the batcher expects frames from it
    closed: bool = False


@dataclass(frozen=True)
class _Work:
    seq: CloudSequence
    hidden: torch.Tensor  # [tokens, hidden] on the device, the model's dtype
    start: int
    logit_rows: tuple[int, ...]  # rows of this frame whose logits the session wants
    future: Future
    submitted: float

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]


class CloudBatcher:
    def __init__(self, loaded: LoadedModel, min_split: int, config: CloudBatching) -> None:
        model = loaded.model
        self.model, self.min_split = model, min_split
        self.num_layers = model.config.num_layers
        self.device = model.norm.weight.device
        cuda = self.device.type == "cuda"
        layers = self.num_layers - min_split
        num_blocks, note = config.num_blocks, "given"
        if num_blocks is None:
            num_blocks, note = PagedKVCache.blocks_within(model, KVMemory.parse(config.kv_memory), BLOCK_SIZE, layers)
        if num_blocks < 2:
            raise FerryError(f"the cloud's KV pool needs at least 2 blocks, got {num_blocks}")
        self.cache = PagedKVCache.for_model(model, num_blocks, BLOCK_SIZE, layers)
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, prefix_caching=False)  # hidden states, not token ids
        self.window_s = None if config.window_ms is None else config.window_ms / 1000
        self.max_batched_tokens = config.max_batched_tokens or (2048 if cuda else 512)
        # The Triton decode kernel specialises on the table's row stride: CUDA steps keep one width (a full-context
        # sequence); the CPU reference gathers what it is given, so its tables are as wide as the step needs.
        self.fixed_width = self.blocks.blocks_for(model.config.max_context) if cuda else None
        self.stats = CloudStats()
        usable = self.blocks.usable_blocks
        window = (f"{config.window_ms:g} ms" if config.window_ms is not None else
                  f"{WINDOW_FRACTION:g} of the last step, at most {MAX_WINDOW_S * 1e3:g} ms")
        self.description = (f"batched paged steps, pool {num_blocks} blocks of {BLOCK_SIZE} tokens = "
                            f"{usable * BLOCK_SIZE} tokens for layers {min_split}..{self.num_layers - 1}, "
                            f"{self.cache.nbytes / (1 << 30):.2f} GiB ({note}); window {window}, "
                            f"at most {self.max_batched_tokens} tokens per step")
        self._cond = threading.Condition()
        self._queue: list[_Work] = []
        self._running: set[int] = set()  # id() of the sequences in the step now running
        self._in_request = 0  # sequences between REQUEST and END
        self._held = 0  # pause() depth
        self._last_step_end = 0.0
        self._last_step_s = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ferry-cloud-batcher")
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for work in self._queue:
                work.future.set_exception(CloudStepError("the cloud is stopping"))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @contextmanager
    def pause(self) -> Iterator[None]:
        """No step starts inside this block; frames queue up and run together after it (a test's start gate)."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def wait_queued(self, frames: int, timeout_s: float) -> bool:
        """True once `frames` frames are waiting for a step (False after `timeout_s`)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= frames, timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no frame is queued and no step is running (False after `timeout_s`)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._running, timeout_s)

    # --- sessions (called from their handler threads) ---------------------------------------------------------

    def open(self, split: int) -> CloudSequence:
        if not self.min_split <= split < self.num_layers:
            raise FerryError(f"split {split} is outside this pool's layers {self.min_split}..{self.num_layers - 1}")
        return CloudSequence(split)

    def begin_request(self, seq: CloudSequence) -> None:
        """A new request starts at position 0: whatever the last one left is dropped."""
        with self._cond:
            self.blocks.truncate(seq.table, 0)
            if not seq.in_request:
                seq.in_request = True
                self._in_request += 1

    def end_request(self, seq: CloudSequence) -> None:
        with self._cond:
            self.blocks.truncate(seq.table, 0)
            self._leave(seq)

    def truncate(self, seq: CloudSequence, tokens: int) -> None:
        """Roll back to the first `tokens` tokens (rejected drafts); called between the session's own steps."""
        with self._cond:
            self.blocks.truncate(seq.table, tokens)

    def close(self, seq: CloudSequence) -> None:
        """The session ended (closed, failed, idle): drop its queued work and free its blocks, after the step
        that is running it if there is one."""
        with self._cond:
            seq.closed = True
            self._leave(seq)
            for work in [w for w in self._queue if w.seq is seq]:
                self._queue.remove(work)
                work.future.set_exception(CloudStepError("the session was closed"))
            if id(seq) not in self._running:
                self.blocks.free(seq.table)

    def _leave(self, seq: CloudSequence) -> None:
        if seq.in_request:
            seq.in_request = False
            self._in_request -= 1
            self._cond.notify_all()  # a step waiting for this session's next frame need not wait any more

    def run(self, seq: CloudSequence, hidden: torch.Tensor, start: int, logit_rows: tuple[int, ...],
            timeout_s: float) -> torch.Tensor | None:
        """Positions [start, start + tokens) of `hidden` through the session's layers in the next step; fp32
        logits [len(logit_rows), vocab] of the rows asked for (None when none is). KVPoolFullError when the pool
        cannot hold them (nothing is taken then)."""
        future: Future = Future()
        with self._cond:
            if seq.closed or self._stopping:
                raise CloudStepError("the session is closed")
            end = start + hidden.shape[0]
            if not self.blocks.ensure_slots(seq.table, end):
                needed = self.blocks.blocks_for(end) - len(seq.table.blocks)
                raise KVPoolFullError(
                    f"the cloud's KV pool is full: positions up to {end} need {needed} more blocks of "
                    f"{self.blocks.block_size} tokens, {self.blocks.free_blocks} of {self.blocks.usable_blocks} are "
                    f"free (other sessions hold the rest); retry later, or the cloud's operator raises --kv-memory")
            self._queue.append(_Work(seq, hidden, start, logit_rows, future, time.perf_counter()))
            self._cond.notify_all()
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            raise CloudStepError(f"the cloud's step did not finish within {timeout_s:g} s") from None

    # --- the batching thread ----------------------------------------------------------------------------------

    def _ready(self) -> bool:
        """The step may start: every session in a request has its frame in, or the token budget is full."""
        return len(self._queue) >= self._in_request or sum(w.tokens for w in self._queue) >= self.max_batched_tokens

    def _collect(self) -> list[_Work] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._queue and not self._held:
                    # From the later of the first frame's arrival and the last step's end: frames that queued
                    # during a step still wait for the sessions that step just answered, or the sessions would
                    # settle into groups that take turns (two half-size steps per token instead of one).
                    window = self.window_s
                    if window is None:
                        window = min(WINDOW_FRACTION * self._last_step_s, MAX_WINDOW_S)
                    deadline = max(self._queue[0].submitted, self._last_step_end) + window
                    left = deadline - time.perf_counter()
                    if left <= 0 or self._ready():
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait(1.0)  # woken by new work, stop() or the end of pause(); the timeout is a backstop
            step, tokens = [], 0
            for work in list(self._queue):  # arrival order; a frame over the budget alone still runs (alone)
                if step and tokens + work.tokens > self.max_batched_tokens:
                    break
                step.append(work)
                tokens += work.tokens
                self._queue.remove(work)
            self._running = {id(w.seq) for w in step}
            return step

    def _loop(self) -> None:
        while (step := self._collect()) is not None:
            began = time.perf_counter()
            try:
                with torch.inference_mode():
                    results = self._run_step(step)
            except Exception as exc:  # every session in the step hears of it (logged), the thread lives on
                log.exception("cloud step of %d frames failed", len(step))
                error = CloudStepError(f"the cloud's step failed: {type(exc).__name__}: {exc}")
                results = [error] * len(step)
            with self._cond:
                for work in step:
                    if work.seq.closed:
                        self.blocks.free(work.seq.table)
                self._running = set()
                self._last_step_end = time.perf_counter()
                self._last_step_s = self._last_step_end - began
                self._cond.notify_all()  # wait_idle
            for work, result in zip(step, results, strict=True):
                if isinstance(result, Exception):
                    work.future.set_exception(result)
                else:
                    work.future.set_result(result)

    def _run_step(self, step: list[_Work]) -> list[torch.Tensor | None]:
        began = time.perf_counter()
        results: dict[int, torch.Tensor | None] = {}
        for split in sorted({w.seq.split for w in step}):
            group = [w for w in step if w.seq.split == split]
            results.update(zip(map(id, group), self._forward(split, group), strict=True))
        self.stats.record(len(step), sum(w.tokens for w in step), time.perf_counter() - began)
        return [results[id(w)] for w in step]

    def _forward(self, split: int, group: list[_Work]) -> list[torch.Tensor | None]:
        """One forward of layers split..L-1 over `group`, packed as the serving engine packs a step."""
        bs = self.blocks.block_size
        decodes = [w for w in group if w.tokens == 1]
        chunks = [w for w in group if w.tokens > 1]
        order = decodes + chunks
        positions = np.concatenate([np.arange(w.start, w.start + w.tokens) for w in order])
        blocks = np.concatenate([np.asarray(w.seq.table.blocks)[np.arange(w.start, w.start + w.tokens) // bs]
                                 for w in order])
        slots = blocks * bs + positions % bs
        d = len(decodes)
        longest = max((len(w.seq.table.blocks) for w in decodes), default=1)
        width = max(self.fixed_width, longest) if self.fixed_width else longest  # a session past max_context widens it
        tables = np.full((d, width), NULL_BLOCK, dtype=np.int64)
        for i, w in enumerate(decodes):
            tables[i, : len(w.seq.table.blocks)] = w.seq.table.blocks
        lens = np.array([w.start + 1 for w in decodes], dtype=np.int64)
        chunk_tables = [np.asarray(w.seq.table.blocks, dtype=np.int64) for w in chunks]
        # One host buffer, one upload: positions, slots, decode lengths and tables, the chunks' tables.
        packed = torch.from_numpy(np.concatenate([positions, slots, lens, tables.ravel(), *chunk_tables])
                                  .astype(np.int32)).to(self.device)
        t = len(positions)
        at = 2 * t + d + d * width
        prefills, q_start = [], d
        for w, table in zip(chunks, chunk_tables, strict=True):
            prefills.append(PrefillChunk(q_start, w.tokens, w.start, packed[at : at + len(table)]))
            at += len(table)
            q_start += w.tokens
        paged = PagedBatch(slots=packed[t : 2 * t], decode_rows=d,
                           block_tables=packed[2 * t + d : 2 * t + d + d * width].view(d, width),
                           context_lens=packed[2 * t : 2 * t + d], prefills=tuple(prefills))
        x = torch.cat([w.hidden for w in order]).unsqueeze(0)
        first = split - self.min_split
        hidden = self.model.run_layers(x, packed[:t].long().view(1, t), self.cache.layers[first:], 0,
                                       range(split, self.num_layers), paged)[0]
        # The LM head only for the rows some session samples from: one matmul for the whole step.
        rows, row = [], 0
        for w in order:
            rows.extend(row + r for r in w.logit_rows)
            row += w.tokens
        logits = self.model.logits(hidden.index_select(0, torch.tensor(rows, device=self.device))) if rows else None
        out, at = {}, 0
        for w in order:
            n = len(w.logit_rows)
            out[id(w)] = logits[at : at + n] if n else None
            at += n
        return [out[id(w)] for w in group]
