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
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from ferry.errors import FerryError
from ferry.parallel.mesh import StagePeers

log = logging.getLogger("ferry.pipeline")


class PipelineLinks:
    """The process groups of one pipeline (created on every rank, in one order: group creation is collective)."""

    def __init__(self, peers: StagePeers, timeout_s: float) -> None:
        self.peers = peers
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # The world group carries hidden states; tokens and host-side agreement get their own gloo group.
        self.tokens = dist.new_group(backend="gloo", timeout=self.timeout)

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
        self._sends: list = []  # (work, tensor): a sent tensor lives until its send completed
        self.hidden_bytes_sent = 0
        self.token_bytes_sent = 0

    @property
    def first(self) -> bool:
        return self.peers.first

    @property
    def last(self) -> bool:
        return self.peers.last

    def run(self, ids: torch.Tensor, positions: torch.Tensor, caches, paged, logits_index: torch.Tensor):
        """This stage's layers over the step: logits [rows, vocab] on the last stage, None on the others (their
        output has been sent on)."""
        tokens = ids.numel()
        if self.first:
            inputs = ids.view(1, tokens)
        else:
            inputs = torch.empty((1, tokens, self.hidden_size), dtype=self.dtype, device=self.device)
            self._receive_hidden(inputs)
        out = self.model.stage_forward(inputs, positions.view(1, tokens), caches, paged, logits_index)
        return out if self.last else self._send_hidden(out)

    def run_captured(self, graph, rows: int):
        """A decode step of `rows` rows replayed from the stage's CUDA graph (paged_graphs.py); the messages carry
        the real rows only, never the bucket's padding."""
        if not self.first:
            self._receive_hidden(graph.hidden[:, :rows])
        out = graph.replay(rows)
        # The graph's output buffer is rewritten by its next replay, which could overtake the send: send a copy.
        return out if self.last else self._send_hidden(out.clone())

    def _send_hidden(self, out: torch.Tensor) -> None:
        self._reap()
        if self.split:
            out = out.reshape(-1).chunk(self.tp.world_size)[self.tp.rank]  # a view: it keeps `out` alive
        self._sends.append((dist.isend(out, dst=self.peers.next), out))
        self.hidden_bytes_sent += out.numel() * out.element_size()

    def _receive_hidden(self, buf: torch.Tensor) -> None:
        """Fill `buf` [1, tokens, hidden] (contiguous) with the previous stage's hidden states."""
        if not self.split:
            self._wait_hidden(dist.irecv(buf, src=self.peers.previous))
            return
        pieces = list(buf.view(-1).chunk(self.tp.world_size))
        mine = pieces[self.tp.rank]
        self._wait_hidden(dist.irecv(mine, src=self.peers.previous))
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
        for work, _ in self._sends:
            self._wait(work, "a send to complete")
        self._sends.clear()


class ReceivedTokens:
    """Tokens of a step, arriving from the last stage: what `PendingTokens` is for the stage that sampled them."""

    def __init__(self, stage: PipelineStage, work, buf: torch.Tensor) -> None:
        self.stage, self.work, self.buf = stage, work, buf

    def result(self) -> list[int]:
        if self.work is not None:
            self.stage._wait(self.work, f"sampled tokens from rank {self.stage.peers.token_source}")
        return self.buf.tolist()


class ForwardedTokens:
    """The last stage's own readback; reading it sends the tokens on to the earlier stages."""

    def __init__(self, stage: PipelineStage, pending) -> None:
        self.stage, self.pending = stage, pending

    def result(self) -> list[int]:
        values = self.pending.result()
        self.stage.send_tokens(values)
        return values
