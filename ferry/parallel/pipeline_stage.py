"""One pipeline stage's part of a paged step: receive the previous stage's hidden states, run this stage's layers,
send them on; the last stage samples and returns the token ids to every earlier stage.

Every stage runs the same scheduler on the same token stream (SPMD, like tensor parallelism), so each one knows
every step's shape, positions and block tables without being told: a hidden-state message carries nothing but
the [1, tokens, hidden] activations (with tensor-parallel stages, each rank's 1/tp piece of them), one message per
micro-batch, and the token message [rows] int64.

Two links, for two reasons. Hidden states go over the device backend (NCCL between GPUs, gloo on CPU) in one
direction only, stage s -> s+1. Token ids go back over a separate gloo group on the host: the schedulers need them
on the host anyway, and a pair of GPUs sending hidden states one way and tokens the other on one NCCL communicator
would serialise both on its stream, where a send can wait for a receive queued behind it (a deadlock).

Stages on devices of different kinds (placement.py: a GPU stage and a CPU stage) meet through the host: the GPU
side copies its hidden states into a pinned buffer on its copy stream and sends that over gloo once the copy is
done, without holding up the launch of its next micro-batch (the send is posted when the host next has to wait
anyway); a GPU receiving from a CPU takes the message into a pinned buffer and uploads it. Each stage computes in
its own dtype (bf16 on a GPU, fp32 or bf16 on a CPU); a message travels in the narrower of the two and the
receiver converts it.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ferry.comm.copy_stream import CopyStream
from ferry.comm.pinned_pool import PinnedBufferPool
from ferry.device import BACKENDS
from ferry.errors import FerryError
from ferry.parallel.mesh import StagePeers

log = logging.getLogger("ferry.pipeline")


@dataclass(frozen=True)
class Hop:
    """How hidden states cross one stage boundary, seen from either end."""

    sender: torch.device
    receiver: torch.device
    wire_dtype: torch.dtype  # the narrower of the two stages' dtypes (the receiver's on a tie)
    group: dist.ProcessGroup | None = None  # None: the world group

    @property
    def via_host(self) -> bool:
        """A CPU on one side and an accelerator on the other: the accelerator's side stages through pinned memory."""
        return (self.sender.type == "cpu") != (self.receiver.type == "cpu")

    @classmethod
    def between(cls, sender: torch.device, sender_dtype: torch.dtype, receiver: torch.device,
                receiver_dtype: torch.dtype, group=None) -> Hop:
        narrower = sender_dtype if sender_dtype.itemsize < receiver_dtype.itemsize else receiver_dtype
        return cls(sender, receiver, narrower, group)


class _SendDone:
    """A pinned buffer's fence for the pool: free once its gloo send completed."""

    def __init__(self, work) -> None:
        self.work = work

    def query(self) -> bool:
        return self.work.is_completed()


class StageTiming:
    """Where a stage's time goes, per micro-batch step: its own layers (CUDA events on a GPU, whose host runs
    ahead; wall time on a CPU, whose compute is synchronous) and the host's waits for the previous stage's hidden
    states and for the last stage's tokens."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self.steps = 0
        self.compute_s = self.hidden_wait_s = self.token_wait_s = 0.0
        self._events: list = []  # (start, end) CUDA events not yet read
        self._started = 0.0

    def start(self) -> None:
        self.steps += 1
        if self.on_gpu:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, None))
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.on_gpu:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)
            if len(self._events) > 64:
                self._collect(block=False)
        else:
            self.compute_s += time.perf_counter() - self._started

    def _collect(self, block: bool) -> None:
        pending = []
        for start, end in self._events:
            if end is not None and (block or end.query()):
                end.synchronize()
                self.compute_s += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._events = pending

    def per_step_ms(self) -> dict:
        self._collect(block=True)
        n = max(self.steps, 1)
        return {"steps": self.steps, "compute_ms": round(self.compute_s / n * 1e3, 3),
                "hidden_wait_ms": round(self.hidden_wait_s / n * 1e3, 3),
                "token_wait_ms": round(self.token_wait_s / n * 1e3, 3)}


class PipelineLinks:
    """The process groups of one pipeline (created on every rank, in one order: group creation is collective).

    `stage_devices` / `stage_dtypes`: each stage's device (of this rank's TP position) and dtype, where stages
    differ (a placement); by default every stage is on this rank's kind of device, in its dtype, and hidden states
    use the world group."""

    def __init__(self, peers: StagePeers, timeout_s: float, stage_devices: list[torch.device] | None = None,
                 stage_dtypes: list[torch.dtype] | None = None) -> None:
        self.peers = peers
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # The world group carries hidden states; tokens and host-side agreement get their own gloo group.
        self.tokens = dist.new_group(backend="gloo", timeout=self.timeout)
        self.stage_devices, self.stage_dtypes = stage_devices, stage_dtypes
        self._groups: dict[int, dist.ProcessGroup] = {}
        if stage_devices is not None and len({d.type for d in stage_devices}) > 1:
            # A mixed world group is gloo: neighbouring stages on one kind of accelerator get a group of its
            # backend for each TP position's pair (every rank creates every pair's group, in one order).
            mesh = peers.mesh
            for boundary in range(mesh.pp - 1):
                a, b = stage_devices[boundary], stage_devices[boundary + 1]
                if a.type == b.type != "cpu":
                    for t in range(mesh.tp):
                        pair = [mesh.rank_at(boundary, t), mesh.rank_at(boundary + 1, t)]
                        group = dist.new_group(pair, backend=BACKENDS[a.type], timeout=self.timeout)
                        if peers.rank in pair:
                            self._groups[boundary] = group

    def hop(self, boundary: int, device: torch.device, dtype: torch.dtype) -> Hop:
        """The hop from stage `boundary` to the next, for a rank on `device` in `dtype` (the default layout)."""
        if self.stage_devices is None:
            return Hop(device, device, dtype)
        s, r = boundary, boundary + 1
        return Hop.between(self.stage_devices[s], self.stage_dtypes[s], self.stage_devices[r], self.stage_dtypes[r],
                           self._groups.get(boundary))

    def agree_min(self, values: list[float]) -> list[float]:
        """The smallest of each value over every rank of every stage (pool sizes, measured rates)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tokens)
        return t.tolist()


class PipelineStage:
    """Runs this rank's stage of a step; counts the bytes it sent on each link."""

    def __init__(self, model, links: PipelineLinks) -> None:
        self.model, self.links, self.peers = model, links, links.peers
        self.device = model.norm.weight.device
        self.dtype = model.norm.weight.dtype
        self.hidden_size = model.config.hidden_size
        # With tensor-parallel stages every rank of a stage holds the whole hidden state: each sends only its
        # 1/tp piece to its peer in the next stage, whose ranks all-gather the pieces over their own (in-node) group,
        # so the link between stages (between nodes) carries the hidden state once, not tp times.
        self.tp = model.group
        self.split = self.tp.world_size > 1 and self.hidden_size % self.tp.world_size == 0
        stage = self.peers.stage
        self.send_hop = None if self.last else links.hop(stage, self.device, self.dtype)
        self.recv_hop = None if self.first else links.hop(stage - 1, self.device, self.dtype)
        hops = [h for h in (self.send_hop, self.recv_hop) if h is not None]
        self.copies = CopyStream(self.device) if any(h.via_host for h in hops) else None
        self.pool = PinnedBufferPool(max_bytes=256 << 20) if self.copies and self.device.type == "cuda" else None
        self._sends: list = []  # (work, tensor): a sent tensor lives until its send completed
        self._staged: list = []  # (fence, pinned buffer, host tensor): copied to the host, not yet sent
        self.hidden_bytes_sent = 0
        self.token_bytes_sent = 0
        self.timing = StageTiming(self.device)

    @property
    def first(self) -> bool:
        return self.peers.first

    @property
    def last(self) -> bool:
        return self.peers.last

    def run(self, ids: torch.Tensor, positions: torch.Tensor, caches, paged, logits_index: torch.Tensor):
        """This stage's layers over the step: logits [rows, vocab] on the last stage, None on the others (their
        output has been sent on)."""
        self._post_staged(block=False)
        tokens = ids.numel()
        if self.first:
            inputs = ids.view(1, tokens)
        else:
            inputs = torch.empty((1, tokens, self.hidden_size), dtype=self.dtype, device=self.device)
            self._receive_hidden(inputs)
        self.timing.start()
        out = self.model.stage_forward(inputs, positions.view(1, tokens), caches, paged, logits_index)
        self.timing.stop()
        return out if self.last else self._send_hidden(out)

    def run_captured(self, graph, rows: int):
        """A decode step of `rows` rows replayed from the stage's CUDA graph (paged_graphs.py); the messages carry
        the real rows only, never the bucket's padding."""
        self._post_staged(block=False)
        if not self.first:
            self._receive_hidden(graph.hidden[:, :rows])
        self.timing.start()
        out = graph.replay(rows)
        self.timing.stop()
        # The graph's output buffer is rewritten by its next replay, which could overtake the send: send a copy.
        return out if self.last else self._send_hidden(out.clone())

    def _send_hidden(self, out: torch.Tensor) -> None:
        self._reap()
        hop = self.send_hop
        if out.dtype != hop.wire_dtype:
            out = out.to(hop.wire_dtype)
        if self.split:
            out = out.reshape(-1).chunk(self.tp.world_size)[self.tp.rank]  # a view: it keeps `out` alive
        self.hidden_bytes_sent += out.numel() * out.element_size()
        if hop.via_host and self.device.type != "cpu":
            # Into pinned memory on the copy stream; sent once the copy is done (_post_staged), so the host goes
            # on to launch the next micro-batch meanwhile.
            buf = self.pool.acquire(out.numel() * out.element_size())
            host = buf.view(out.numel() * out.element_size(), out.dtype, tuple(out.shape))
            fence = self.copies.copy(host, out, host_pinned=buf.pinned, fence=buf.event, record=False)
            self._staged.append((fence, buf, host, out))
            self._post_staged(block=False)
            return
        self._sends.append((dist.isend(out, dst=self.peers.next, group=hop.group), out))

    def _post_staged(self, block: bool) -> None:
        """Send the staged hidden states whose copy to the host is done, in order (all of them with `block`)."""
        while self._staged:
            fence, buf, host, _ = self._staged[0]
            if not block and not fence.query():
                return
            fence.synchronize()
            self._staged.pop(0)
            work = dist.isend(host, dst=self.peers.next, group=self.send_hop.group)
            self.pool.release(buf, _SendDone(work))
            self._sends.append((work, host))

    def _receive_hidden(self, buf: torch.Tensor) -> None:
        """Fill `buf` [1, tokens, hidden] (contiguous) with the previous stage's hidden states."""
        self._post_staged(block=True)  # a stage that waits must not sit on sends its successor waits for
        started = time.perf_counter()
        try:
            self._receive_hidden_now(buf)
        finally:
            self.timing.hidden_wait_s += time.perf_counter() - started

    def _receive_hidden_now(self, buf: torch.Tensor) -> None:
        """The message lands in this rank's part of `buf` (all of it, or its 1/tp piece, all-gathered after), or,
        where it travels in another dtype or reaches an accelerator through the host, in a staging buffer that is
        then converted (and uploaded) into that part."""
        hop = self.recv_hop
        pieces = list(buf.view(-1).chunk(self.tp.world_size)) if self.split else [buf.view(-1)]
        mine = pieces[self.tp.rank] if self.split else pieces[0]
        on_host = hop.via_host and self.device.type != "cpu"
        pinned = wire = None
        if on_host:
            nbytes = mine.numel() * hop.wire_dtype.itemsize
            pinned = self.pool.acquire(nbytes)
            wire = pinned.view(nbytes, hop.wire_dtype, (mine.numel(),))
        elif mine.dtype != hop.wire_dtype:
            wire = torch.empty(mine.numel(), dtype=hop.wire_dtype, device=self.device)
        work = dist.irecv(mine if wire is None else wire, src=self.peers.previous, group=hop.group)
        if on_host:
            self._wait(work, f"hidden states from rank {self.peers.previous}")
            self.pool.release(pinned, self.copies.copy_in_order(mine, wire, host_pinned=True))
        else:
            self._wait_hidden(work)
            if wire is not None:
                mine.copy_(wire)
        if self.split:
            dist.all_gather(pieces, mine.clone(), group=self.tp.process_group)

    def receive_tokens(self, rows: int) -> ReceivedTokens:
        """Post the receive of the last stage's sampled tokens for a step of `rows` sampled rows (a step of
        prefill chunks that sample nothing has no message: every stage knows `rows`)."""
        buf = torch.empty(rows, dtype=torch.int64)
        work = dist.irecv(buf, src=self.peers.token_source, group=self.links.tokens) if rows else None
        return ReceivedTokens(self, work, buf)

    def send_tokens(self, values: list[int]) -> None:
        """Last stage: the step's tokens, read back to the host, to every earlier stage."""
        if not values:
            return
        self._reap()
        host = torch.tensor(values, dtype=torch.int64)
        for dst in self.peers.token_receivers():
            self._sends.append((dist.isend(host, dst=dst, group=self.links.tokens), host))
            self.token_bytes_sent += host.numel() * 8

    def _wait_hidden(self, work) -> None:
        """Order this stage's compute after the hidden states' arrival. On GPUs that is a wait of the compute stream,
        not of the host, which goes on to queue the step (NCCL's watchdog enforces the group's timeout; a timeout
        given here would make the host block until the data is in)."""
        if self.device.type == "cuda":
            work.wait()
        else:
            self._wait(work, f"hidden states from rank {self.peers.previous}")

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.links.timeout)
        except RuntimeError as exc:  # gloo: a peer that died closes its connection; a silent one times out
            reason = str(exc).strip().splitlines()[0]
            reason = reason.split("] ", 1)[-1][:160]  # gloo prefixes its source file and line
            where = f"pipeline stage {self.peers.stage} (rank {self.peers.rank})"
            if "timed out" in reason.lower():
                raise FerryError(f"{where}: {what} did not arrive within {self.links.timeout.total_seconds():.0f} s "
                                 "(--timeout); that rank is stuck or too slow") from None
            raise FerryError(f"{where}: waiting for {what} failed, that rank died or stopped ({reason})") from None
        if ok is False:
            raise FerryError(f"pipeline stage {self.peers.stage} (rank {self.peers.rank}): {what} did not arrive "
                             f"within {self.links.timeout.total_seconds():.0f} s")

    def _reap(self) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def drain(self) -> None:
        """Wait for every send still in flight (before the groups are destroyed)."""
        self._post_staged(block=True)
        for work, _ in self._sends:
            self._wait(work, "a send to complete")
        self._sends.clear()


class ReceivedTokens:
    """Tokens of a step, arriving from the last stage: what `PendingTokens` is for the stage that sampled them."""

    def __init__(self, stage: PipelineStage, work, buf: torch.Tensor) -> None:
        self.stage, self.work, self.buf = stage, work, buf

    def result(self) -> list[int]:
        self.stage._post_staged(block=True)  # the tokens come after the last stage had these hidden states
        if self.work is not None:
            started = time.perf_counter()
            self.stage._wait(self.work, f"sampled tokens from rank {self.stage.peers.token_source}")
            self.stage.timing.token_wait_s += time.perf_counter() - started
        return self.buf.tolist()


class ForwardedTokens:
    """The last stage's own readback; reading it sends the tokens on to the earlier stages."""

    def __init__(self, stage: PipelineStage, pending) -> None:
        self.stage, self.pending = stage, pending

    def result(self) -> list[int]:
        values = self.pending.result()
        self.stage.send_tokens(values)
        return values
