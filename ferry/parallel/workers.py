"""Long-lived tensor-parallel ranks behind one driver: what `LLM(tp=N)` and `ferry chat --tp N` talk to.

`spawn` (launch.py) runs one job and exits; a chat or an API user sends many requests to a model loaded once.
Here each rank loads its shard, then waits for commands on its own queue. The driver sends every rank the same
request, the ranks run the engine in lockstep (SPMD), and rank 0 streams tokens and the completions back.
The driver never joins the process group, so it stays free to watch the ranks: when one dies, the others are
stopped and the error names the rank. `close()` (or leaving the `with` block, or the driver's exit) stops all.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ferry.device import BACKENDS, dtype_name
from ferry.engine.engine import Completion, TokenEvent
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError, InvalidRequestError
from ferry.memory import peak_resident_mib
from ferry.parallel.launch import (
    describe_dead_rank,
    die_with_parent,
    free_port,
    init_group,
    keep_multicast_off,
    sigint_ignored_by_children,
    torchrun_rank,
    torchrun_world_size,
)
from ferry.parallel.placement import Placement
from ferry.parallel.tp_generate import PipelineSpec

log = logging.getLogger("ferry.workers")


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank loads and how its engine runs."""

    model: str
    device_type: str
    dtype: str | None
    engine_options: dict = field(default_factory=dict)  # Engine(**engine_options): cuda_graphs, compile, ...
    allreduce: str = "auto"  # all-reduce path: "auto" (calibrated per size) or one path's name
    shape: str | None = None  # a named architecture (ferry/bench/shapes.py) with random weights, instead of `model`
    pipeline: PipelineSpec | None = None  # pp stages of the ranks (each stage tensor parallel over the rest)
    placement: Placement | None = None  # each rank's device, threads and share (placement.py); None: alike

    @property
    def pp(self) -> int:
        return self.pipeline.pp if self.pipeline else 1


def _serve_rank(rank: int, world: int, spec: WorkerSpec, init_method: str, timeout_s: float,
                compression: str | None, commands, events, relay: bool = False) -> None:
    """One rank's life: load, then run the driver's commands until "stop". `relay`: started by torchrun, where
    only rank 0 has the driver's queues (`commands`, `events`) and passes the commands on (command_feed.py)."""
    die_with_parent()
    if relay:
        _torchrun_signals()
    keep_multicast_off()
    try:
        from ferry.engine.engine import build_engine
        from ferry.parallel.command_feed import QueueFeed, RelayFeed
        from ferry.parallel.step_loop import StepLoop
        from ferry.parallel.tp_generate import (
            gather_floats,
            generate_on_rank,
            group_device,
            load_on_rank,
            pipeline_on_rank,
            random_model_on_rank,
        )

        group = init_group(rank, world, spec.device_type, init_method, timeout_s, compression, spec.placement)
        if spec.pipeline is not None:
            engine, _, _, _, _ = pipeline_on_rank(group, spec.pipeline, spec.model or None, spec.shape,
                                                  spec.device_type, spec.dtype, spec.allreduce, spec.engine_options,
                                                  placement=spec.placement)
        elif spec.shape is not None:
            model, tokenizer = random_model_on_rank(group, spec.shape, spec.device_type, spec.dtype, spec.allreduce,
                                                    spec.placement)
            engine = build_engine(model, tokenizer, **spec.engine_options)
        else:
            group, loaded = load_on_rank(group, spec.model, spec.device_type, spec.dtype, spec.allreduce,
                                         placement=spec.placement)
            engine = build_engine(loaded.model, loaded.tokenizer, **spec.engine_options)
        on = group_device(engine, spec.placement)
        feed = (RelayFeed if relay else QueueFeed)(commands, rank, world, timeout_s)
        peaks = gather_floats(group, peak_resident_mib(), on)
        if rank == 0:
            events.put(("ready", 0, {"device": str(spec.placement) if spec.placement else engine.device.type, "dtype": dtype_name(engine.dtype),
                                     "tp": world // spec.pp, "pp": spec.pp,
                                  "peak_host_mb_per_rank": peaks,
                                  "allreduce_plan": group.allreduce.describe() if group.allreduce else ""}))
        leftover: list = []
        while True:
            while not leftover:
                leftover = feed.take(block=True)
            command = leftover.pop(0)
            if command[0] == "stop":
                break
            if command[0] == "serve":  # step-level commands until LeaveLoop (ferry serve)
                engine.warm_up(engine.limits.max_running, every_bucket=True)  # no capture inside a request
                leftover = StepLoop(engine, feed, events, rank).run(leftover)
                continue
            _, request, prompts, params = command
            try:  # every rank reaches the same verdict before any collective, so a bad request costs nothing
                engine.check_prompts(prompts, params)
            except InvalidRequestError as exc:
                if rank == 0:
                    events.put(("rejected", request, str(exc)))
                continue
            on_token = (lambda e: events.put(("token", request, e))) if rank == 0 else None
            completions = generate_on_rank(group, engine, prompts, params, on_token, device=on)
            if rank == 0:
                events.put(("done", request, pickle.dumps(completions)))
        if hasattr(engine, "close"):  # the pipeline engine: its last sends complete before the groups go
            engine.close()
        torch.distributed.destroy_process_group()
    except FerryError as exc:
        _report(events, rank, str(exc))
        raise SystemExit(2) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.debug("rank %d failed:\n%s", rank, traceback.format_exc(limit=8))
        _report(events, rank, f"{type(exc).__name__}: {reason[:300]}")
        raise SystemExit(1) from None


def serve_torchrun_rank(spec: WorkerSpec, timeout_s: float, compression: str | None = None) -> None:
    """A rank other than 0 of `ferry serve` under torchrun: the engine's rank loop, its commands passed on by
    rank 0 (whose process runs the HTTP server and starts rank 0's engine beside it); returns at "stop"."""
    _serve_rank(torchrun_rank(), torchrun_world_size(), spec, "env://", timeout_s, compression, None, None,
                relay=True)


def _torchrun_signals() -> None:
    """torchrun's agent passes Ctrl-C or SIGTERM on to its workers' process groups. On rank 0's node the server
    drains and then stops every rank itself, so the ranks there wait for its word (the agent kills what is left
    after its 30 s); on another node the signal ends the rank at once, and the rest see a rank that stopped."""
    first_node = os.environ.get("GROUP_RANK", "0") == "0"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN if first_node else signal.SIG_DFL)


def _report(events, rank: int, reason: str) -> None:
    """To the driver; a torchrun rank without the driver's queue says it on its own stderr (torchrun shows it)."""
    if events is not None:
        events.put(("error", rank, reason))
    else:
        print(f"ferry: rank {rank} stopped: {reason}", file=sys.stderr, flush=True)


class TensorParallelWorkers:
    """`tp` ranks holding one model; `generate` / `stream` send them a request and return rank 0's answer."""

    def __init__(self, spec: WorkerSpec, tp: int, compression: str | None = None, timeout_s: float = 300.0,
                 torchrun: bool = False) -> None:
        """`torchrun`: this process is torchrun's rank 0; it starts the engine's rank 0 only, and the other ranks
        are torchrun's processes running `serve_torchrun_rank` (on this node or others)."""
        if spec.device_type not in BACKENDS:
            raise FerryError(f"no torch.distributed backend known for device type {spec.device_type!r}")
        ctx = mp.get_context("spawn")
        self.tp, self.timeout_s = tp, timeout_s
        world = spec.placement.world if spec.placement else tp * spec.pp  # pp stages of tp ranks each
        self._requests = 0
        self._events = ctx.Queue()
        if torchrun:  # the group's address and rank 0's place in it come from torchrun's environment
            world, started, init_method = torchrun_world_size(), 1, "env://"
        else:
            started, init_method = world, f"tcp://127.0.0.1:{free_port()}"
        self._commands = [ctx.Queue() for _ in range(started)]
        self._procs = [ctx.Process(target=_serve_rank, name=f"ferry-rank{r}", daemon=True,
                                   args=(r, world, spec, init_method, timeout_s, compression, self._commands[r],
                                         self._events, torchrun)) for r in range(started)]
        with sigint_ignored_by_children():
            for p in self._procs:
                p.start()
        # Runs at close() or when the driver drops this object / exits: the ranks never outlive it.
        self._finalizer = weakref.finalize(self, _stop_ranks, self._procs, self._commands)
        try:
            kind, _, self.info = self._next_event(deadline=time.monotonic() + timeout_s, waiting_for="loading")
        except BaseException:
            self.close()
            raise
        assert kind == "ready"
        log.info("%d ranks ready on %s (%s)", tp, spec.device_type, BACKENDS[spec.device_type])

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[TokenEvent | list[Completion]]:
        """Yield rank 0's token events, then (last) the list of completions."""
        if not self._finalizer.alive:
            raise FerryError("the tensor-parallel ranks were stopped")
        # Requests are numbered: events of one whose stream the caller abandoned are skipped, not taken for ours.
        self._requests += 1
        request = self._requests
        for q in self._commands:
            q.put(("generate", request, prompts, params))
        # A step that makes no token for this long means a stuck collective, which the ranks' own timeout ends.
        while True:
            kind, of, payload = self._next_event(deadline=time.monotonic() + self.timeout_s + 30,
                                                 waiting_for="a token")
            if of != request:
                continue
            if kind == "token":
                yield payload
            elif kind == "rejected":
                raise InvalidRequestError(payload)
            else:
                yield pickle.loads(payload)
                return

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[Completion]:
        for item in self.stream(prompts, params):
            if isinstance(item, list):
                return item
            if on_token:
                on_token(item)
        raise FerryError("the ranks ended a request without completions")

    def send(self, command) -> None:
        """Put `command` on every rank's queue (ferry serve's step-level commands; see step_loop.py)."""
        if not self._finalizer.alive:
            raise FerryError("the tensor-parallel ranks were stopped")
        for q in self._commands:
            q.put(command)

    def poll_event(self, timeout_s: float):
        """The next event from rank 0, or None after `timeout_s`; FerryError (ranks stopped) when one failed."""
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            if dead := describe_dead_rank(self._procs):
                self.close()
                raise FerryError(f"{dead}; stopped the other ranks") from None
            return None
        if event[0] == "error":
            _, rank, reason = event
            time.sleep(1.0)  # a peer's death usually surfaces first as this rank's collective error
            dead = describe_dead_rank(self._procs, exclude=rank)
            self.close()
            raise FerryError(f"{dead}; rank {rank} then failed: {reason}" if dead else f"rank {rank}: {reason}")
        return event

    def _next_event(self, deadline: float, waiting_for: str) -> tuple[str, int, object]:
        while (event := self.poll_event(0.2)) is None:
            if time.monotonic() > deadline:
                self.close()
                raise FerryError(f"tensor-parallel ranks sent nothing for {self.timeout_s:.0f} s while "
                                 f"{waiting_for}; stopped them") from None
        return event

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> TensorParallelWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_ranks(procs: list, commands: list) -> None:
    for q, p in zip(commands, procs, strict=True):
        if p.is_alive():
            try:
                q.put(("stop",))
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
