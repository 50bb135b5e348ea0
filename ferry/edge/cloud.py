"""The cloud side: serves layers K..L-1 and the LM head to many edge sessions.

One gRPC bidirectional stream is one session. The server never trusts a frame: a malformed, truncated or
out-of-order frame gets an ERROR frame and that stream is closed; other sessions keep running. Limits: frame
size (enforced by gRPC before Ferry sees the bytes), concurrent sessions, tokens per session, idle time, and
(batched path) the KV pool.

Two paths, chosen at start and logged: batched (default; cloud_batcher.py: every session's frame joins one
forward over a shared paged KV pool) and one by one (`batching=None`, `ferry cloud --no-batching`: each session
runs its frames alone on its own dense KV cache, as before the batcher; kept for comparison).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from ferry.edge.auth import token_matches
from ferry.edge.cloud_batcher import (
    DEFAULT_BATCHING,
    CloudBatcher,
    CloudBatching,
    CloudSequence,
    CloudStats,
    CloudStepError,
    KVPoolFullError,
)
from ferry.edge.codecs import Codec, CodecError
from ferry.edge.protocol import FLAG_NO_REPLY, SERVICE, Frame, Kind, ProtocolError, model_fingerprint
from ferry.engine.kv_cache import KVCache
from ferry.engine.sampling import Sampler, SamplingParams
from ferry.errors import FerryError
from ferry.model.loader import LoadedModel

log = logging.getLogger("ferry.cloud")


@dataclass
class EdgeLinkStats:
    """The edge link as the cloud sees it (`ferry cloud --metrics-port` exports it): frame bytes each way, and for
    every TOKEN or VERDICT the time until that session's next frame of the same request arrived, which is the link
    both ways plus the edge's own layers in between (the edge alone can tell them apart: its --json `link_s` is its
    wait less the compute the cloud reported)."""

    bytes_received: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    round_trips: int = 0  # replies answered by a next frame of the same request
    round_trip_s: float = 0.0

    def add(self, other: EdgeLinkStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class CloudLimits:
    max_frame_bytes: int = 16 * 1024 * 1024
    max_sessions: int = 64
    max_tokens_per_session: int = 8192
    idle_timeout_s: float = 120.0
    step_timeout_s: float = 120.0  # batched path: the longest a frame waits for its step


# REQUEST's sampling fields and the JSON types each may have (bool is an int to Python, so it is refused by name).
_SAMPLING_FIELDS = {"temperature": (int, float), "top_k": (int,), "top_p": (int, float), "seed": (int,)}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _sampling_params(raw: object) -> SamplingParams:
    """REQUEST's `sampling` object -> SamplingParams; anything else is a ProtocolError naming the field."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"bad sampling parameters: expected a JSON object, got {type(raw).__name__}")
    values = {}
    for name, types in _SAMPLING_FIELDS.items():
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == (int,) else "a number"
            raise ProtocolError(f"bad sampling parameters: {name} must be {kind}, got {value!r}")
        values[name] = value
    seed = values.get("seed")
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise ProtocolError(f"bad sampling parameters: seed {seed} is outside {_SEED_RANGE[0]}..{_SEED_RANGE[1]}")
    try:
        return SamplingParams(**values)
    except FerryError as exc:
        raise ProtocolError(f"bad sampling parameters: {exc}") from None


class _DenseKV:
    """The one-by-one path: the session's own dense KV cache, each frame run alone on its handler thread."""

    def __init__(self, server: CloudServer, split: int) -> None:
        self.server = server
        self.layers = range(split, server.loaded.config.num_layers)
        self.cache = KVCache.for_model(server.loaded.model, len(self.layers))

    def forward(self, hidden: torch.Tensor, start: int, logit_rows: tuple[int, ...]) -> torch.Tensor | None:
        tokens = hidden.shape[0]
        began = time.perf_counter()
        self.cache.grow_for(start + tokens, limit=self.server.limits.max_tokens_per_session)
        positions = torch.arange(start, start + tokens, device=self.server.device).unsqueeze(0)
        model = self.server.loaded.model
        x = model.run_layers(hidden.unsqueeze(0), positions, self.cache.layers, start + tokens, self.layers)[0]
        logits = model.logits(x[list(logit_rows)]) if logit_rows else None
        self.server.record_step(1, tokens, time.perf_counter() - began)
        return logits

    # Positions past the next frame's start are overwritten by it: nothing to give back.
    def begin_request(self) -> None:
        pass

    def end_request(self) -> None:
        pass

    def truncate(self, tokens: int) -> None:
        pass

    def close(self) -> None:
        pass


class _PagedKV:
    """The batched path: the session's KV in the shared pool, its frames run in the batcher's steps."""

    def __init__(self, server: CloudServer, batcher: CloudBatcher, split: int) -> None:
        self.batcher, self.timeout_s = batcher, server.limits.step_timeout_s
        self.seq: CloudSequence = batcher.open(split)

    def forward(self, hidden: torch.Tensor, start: int, logit_rows: tuple[int, ...]) -> torch.Tensor | None:
        return self.batcher.run(self.seq, hidden, start, logit_rows, self.timeout_s)

    def begin_request(self) -> None:
        self.batcher.begin_request(self.seq)

    def end_request(self) -> None:
        self.batcher.end_request(self.seq)

    def truncate(self, tokens: int) -> None:
        self.batcher.truncate(self.seq, tokens)

    def close(self) -> None:
        self.batcher.close(self.seq)


class _Session:
    """One edge's state: negotiated codec, KV for the cloud's layers (its own or the pool's), the current request's
    sampler."""

    def __init__(self, server: CloudServer, session_id: int, codec: Codec, split: int) -> None:
        self.server, self.id, self.codec = server, session_id, codec
        self.kv = _PagedKV(server, server.batcher, split) if server.batcher else _DenseKV(server, split)
        self.request: int | None = None
        self.sampler: Sampler | None = None
        self.next_position = 0

    def start_request(self, frame: Frame) -> None:
        params = _sampling_params(frame.meta.get("sampling", {}))
        try:  # inside the handled block: a seed the generator cannot take is the edge's error, not ours
            sampler = Sampler(params, self.server.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ProtocolError(f"bad sampling parameters: {exc}") from None
        self.request, self.sampler, self.next_position = frame.request, sampler, 0
        self.kv.begin_request()  # a new request starts at position 0: what the last one cached is dropped

    def end_request(self) -> None:
        self.request = None
        self.kv.end_request()

    def _run(self, frame: Frame, start: int, tokens: int, payload: bytes,
             logit_rows: tuple[int, ...]) -> torch.Tensor | None:
        """Decode and check this frame's hidden states, run them through the cloud's layers; fp32 logits of
        `logit_rows` (rows of this frame), None when none is asked for."""
        if frame.request != self.request or self.sampler is None:
            raise ProtocolError(f"{frame.kind.name} for request {frame.request}, but the open request is {self.request}")
        limit = self.server.limits.max_tokens_per_session
        if tokens < 1 or start != self.next_position or start + tokens > limit:
            raise ProtocolError(
                f"{frame.kind.name} covers positions [{start}, {start + tokens}); expected to start at "
                f"{self.next_position}, within the session limit of {limit} tokens"
            )
        config = self.server.loaded.config
        x = self.codec.decode(payload, tokens, config.hidden_size)
        x = x.to(self.server.device, self.server.dtype)
        logits = self.kv.forward(x, start, logit_rows)
        self.next_position = start + tokens
        return logits

    @torch.inference_mode()
    def hidden(self, frame: Frame) -> Frame | None:
        began = time.perf_counter()
        start, tokens, payload = frame.hidden_fields()
        reply = not frame.flags & FLAG_NO_REPLY
        logits = self._run(frame, start, tokens, payload, (tokens - 1,) if reply else ())
        if not reply:
            return None
        token = int(self.sampler(logits)[0])
        return Frame.token(self.id, frame.request, token, start + tokens - 1, (time.perf_counter() - began) * 1000)

    @torch.inference_mode()
    def verify(self, frame: Frame) -> Frame:
        """One forward over pending + drafted tokens; accept the drafts the target's greedy choice agrees with.

        KV entries past the accepted prefix are rolled back by moving `next_position` (the next frame starts
        there and overwrites them); the pool also gets back the whole blocks past it.
        """
        began = time.perf_counter()
        if self.sampler is None or not self.sampler.params.greedy:
            raise ProtocolError("speculative rounds need greedy sampling (temperature 0)")
        start, tokens, draft, payload = frame.verify_fields()
        pending = tokens - len(draft)
        choices = self._run(frame, start, tokens, payload, tuple(range(pending - 1, tokens))).argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and choices[accepted] == draft[accepted]:
            accepted += 1
        self.next_position = start + pending + accepted
        self.kv.truncate(self.next_position)
        return Frame.verdict(self.id, frame.request, accepted, choices[accepted], (time.perf_counter() - began) * 1000)


class CloudServer:
    """Serves any split K >= `min_split` (each session says its K in HELLO), so edges can choose K themselves."""

    def __init__(self, loaded: LoadedModel, min_split: int, token: str, limits: CloudLimits | None = None,
                 batching: CloudBatching | None = DEFAULT_BATCHING) -> None:
        """`batching=None`: the one-by-one path (each session alone, its own dense cache)."""
        layers = loaded.config.num_layers
        if not 0 < min_split < layers:
            raise FerryError(f"--split must be between 1 and {layers - 1} for this {layers}-layer model, got {min_split}")
        self.loaded, self.min_split, self.token = loaded, min_split, token
        self.limits = limits or CloudLimits()
        self.device = loaded.model.norm.weight.device
        self.dtype = loaded.model.norm.weight.dtype
        self.fingerprint = model_fingerprint(loaded.config)
        self.batcher = CloudBatcher(loaded, min_split, batching) if batching is not None else None
        self.path = self.batcher.description if self.batcher else "one session at a time, a dense KV cache each"
        self._dense_stats = CloudStats()  # the one-by-one path's (the batcher keeps its own)
        self._link = EdgeLinkStats()  # every session's, added as each frame passes (under _lock)
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # notified whenever a session's stream ends
        self._next_session = 1
        self._active = 0  # streams being served (admitted against max_sessions)
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self._profile = None  # measured on a PING (see compute_profile)
        self._profile_sessions = -1  # sessions served when it was measured
        self._profile_lock = threading.Lock()

    @property
    def stats(self) -> CloudStats:
        """Forwards of the cloud's layers and the frames they served (one frame per step one by one)."""
        return self.batcher.stats if self.batcher else self._dense_stats

    @property
    def link(self) -> EdgeLinkStats:
        """A copy of the edge link's counts so far, over every session."""
        with self._lock:
            return EdgeLinkStats(**vars(self._link))

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return self._active

    def _count(self, frame: EdgeLinkStats) -> None:
        with self._lock:
            self._link.add(frame)

    def record_step(self, frames: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self._dense_stats.record(frames, tokens, seconds)

    def kv_blocks_used(self) -> int:
        """Blocks of the shared pool held by sessions now (0 on the one-by-one path)."""
        if self.batcher is None:
            return 0
        return self.batcher.blocks.usable_blocks - self.batcher.blocks.free_blocks

    def wait_sessions_ended(self, timeout_s: float) -> bool:
        """True once no stream is being served (False after `timeout_s`): a closed edge's session has been torn
        down, its KV given back."""
        with self._ended:
            return self._ended.wait_for(lambda: self._active == 0, timeout_s)

    def compute_profile(self):
        """This cloud's per-layer times for a PONG, measured under the load it carries: re-measured whenever the
        number of sessions it serves has changed since, since a cloud busy with other edges is slower for a new one."""
        from ferry.edge.split_planner import measure_compute

        with self._lock:
            active = self._active
        with self._profile_lock:
            if self._profile is None or self._profile_sessions != active:
                self._profile, self._profile_sessions = measure_compute(self.loaded), active
            return self._profile

    # --- gRPC plumbing ---------------------------------------------------------------------------------

    def start(self, listen: str, tls: tuple[bytes, bytes] | None = None) -> int:
        """Start serving on HOST:PORT (port 0 picks one); returns the bound port. `tls`: (key PEM, cert PEM)."""
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Session": grpc.stream_stream_rpc_method_handler(self._session)}
        )
        size = self.limits.max_frame_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.limits.max_sessions + 4, thread_name_prefix="ferry-cloud"),
            handlers=[handler],
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
            # gRPC's own cap is the worker count; below it, _session refuses past max_sessions with a message.
            maximum_concurrent_rpcs=self.limits.max_sessions + 4,
        )
        if tls is not None:
            port = self._server.add_secure_port(listen, grpc.ssl_server_credentials([tls]))
        else:
            port = self._server.add_insecure_port(listen)
        if port == 0:
            raise FerryError(f"cannot listen on {listen!r}")
        if self.batcher is not None:
            self.batcher.start()
        self._server.start()
        self.port = port
        log.info("cloud serving splits %d..%d on port %d: %s", self.min_split, self.loaded.config.num_layers - 1,
                 port, self.path)
        return port

    def wait(self) -> None:
        assert self._server is not None
        self._server.wait_for_termination()

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait(grace + 5)
        if self.batcher is not None:
            self.batcher.stop()

    def _session(self, request_iterator, context: grpc.ServicerContext):
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if not token_matches(auth.removeprefix("Bearer "), self.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong shared token")
        with self._lock:
            admitted = self._active < self.limits.max_sessions
            if admitted:
                self._active += 1
        if not admitted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the cloud is at its limit of {self.limits.max_sessions} concurrent sessions; try later")
        inbox = _Inbox(request_iterator)
        session: _Session | None = None
        replied_at: float | None = None  # when the last TOKEN/VERDICT left, until the request's next frame

        def sent(reply: Frame) -> bytes:
            nonlocal replied_at
            data = reply.encode()
            self._count(EdgeLinkStats(bytes_sent=len(data), frames_sent=1))
            replied_at = time.perf_counter() if reply.kind in (Kind.TOKEN, Kind.VERDICT) else None
            return data

        try:
            while True:
                try:
                    if (raw := inbox.next(self.limits.idle_timeout_s)) is None:
                        return  # the edge closed its side
                    arrived = time.perf_counter()
                    self._count(EdgeLinkStats(bytes_received=len(raw), frames_received=1))
                    frame = Frame.decode(raw)
                    if replied_at is not None and frame.kind in (Kind.HIDDEN, Kind.VERIFY):
                        self._count(EdgeLinkStats(round_trips=1, round_trip_s=arrived - replied_at))
                    replied_at = None
                    if session is None and frame.kind == Kind.PING:
                        yield sent(self._pong(frame))
                    elif session is None:
                        session, reply = self._hello(frame)
                        yield sent(reply)
                    elif frame.kind == Kind.REQUEST:
                        session.start_request(frame)
                    elif frame.kind == Kind.HIDDEN:
                        if (reply := session.hidden(frame)) is not None:
                            yield sent(reply)
                    elif frame.kind == Kind.VERIFY:
                        yield sent(session.verify(frame))
                    elif frame.kind == Kind.END:
                        session.end_request()
                    else:
                        raise ProtocolError(f"unexpected {frame.kind.name} frame")
                except (ProtocolError, CodecError, KVPoolFullError, CloudStepError) as exc:
                    log.warning("closing session %s: %s", session.id if session else "?", exc)
                    yield sent(Frame.error(str(exc), session.id if session else 0))
                    return
        finally:
            inbox.close()
            if session is not None:
                session.kv.close()  # blocks back to the pool: ended, failed, idle or disconnected alike
            with self._lock:
                self._active -= 1
                self._ended.notify_all()

    def _hello(self, frame: Frame) -> tuple[_Session, Frame]:
        if frame.kind != Kind.HELLO:
            raise ProtocolError(f"a session must start with HELLO, got {frame.kind.name}")
        meta = frame.meta
        if meta.get("model") != self.fingerprint:
            raise ProtocolError(f"model mismatch: edge has {meta.get('model')}, cloud has {self.fingerprint}")
        split = meta.get("split")
        if not isinstance(split, int) or not self.min_split <= split < self.loaded.config.num_layers:
            raise ProtocolError(f"split {split!r} is not served here (this cloud serves {self.min_split}.."
                                f"{self.loaded.config.num_layers - 1})")
        try:
            codec = Codec.parse(str(meta.get("codec", "")))
        except CodecError as exc:
            raise ProtocolError(str(exc)) from None
        with self._lock:
            session_id, self._next_session = self._next_session, self._next_session + 1
        welcome = Frame(Kind.WELCOME, session_id, meta={
            "codec": codec.name, "max_tokens_per_session": self.limits.max_tokens_per_session,
            "max_frame_bytes": self.limits.max_frame_bytes,
        })
        return _Session(self, session_id, codec, split), welcome

    def _pong(self, frame: Frame) -> Frame:
        profile = self.compute_profile()
        return Frame(Kind.PONG, meta={"received": len(frame.body), "layer_s": profile.layer_s,
                                      "head_s": profile.head_s, "prefill_layer_s": profile.prefill_layer_s,
                                      "min_split": self.min_split,
                                      "num_layers": self.loaded.config.num_layers})


_END = object()


class _Inbox:
    """Reads a stream's frames on a thread of its own, so the handler can wait for the next one with a deadline:
    an edge that sends nothing for the idle limit gets an ERROR frame saying so, and its worker is freed."""

    def __init__(self, requests) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # small: the reader waits for the handler (flow control)
        self._closed = threading.Event()
        threading.Thread(target=self._read, args=(requests,), daemon=True, name="ferry-cloud-inbox").start()

    def _read(self, requests) -> None:
        try:
            for raw in requests:
                if not self._put(raw):
                    return
        except grpc.RpcError:
            pass  # the edge cancelled or the call ended under us: the handler sees the end below
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._closed.is_set():  # the handler may have returned: never block on a queue nobody reads
            try:
                self._queue.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def next(self, timeout_s: float) -> bytes | None:
        """The next frame's bytes, or None once the stream ended; ProtocolError after `timeout_s` of silence."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise ProtocolError(f"session idle for {timeout_s:g} s (the cloud's --idle-timeout); closed") from None
        return None if item is _END else item

    def close(self) -> None:
        self._closed.set()
