"""The edge side: keeps the text and layers 0..K-1, sends hidden states to the cloud, gets tokens back.

The edge reads only what it runs: decoder layers 0..K-1 of a partial model (loader.open_partial), whose
embedding looks its rows up in the checkpoint; the whole model only with `fallback="local"`. Weights are read
after the cloud has accepted the session (token, model, split and codec), so a mistake costs a round trip.

Every wait has a timeout. When the link breaks, the edge reconnects (to the same or the next address) and
resumes by replaying its token history in one HIDDEN frame, which rebuilds the new cloud session's KV cache;
with `fallback="local"` it instead finishes the answer on its own copy of the whole model. A refused or reset
connection fails in milliseconds, so reconnects wait a short bounded backoff, not the reply timeout.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import grpc
import torch

from ferry.edge.codecs import Codec
from ferry.edge.linkem import parse_address
from ferry.edge.protocol import METHOD, Frame, Kind, ProtocolError, model_fingerprint
from ferry.edge.speculative import Drafter, GammaController, timed
from ferry.engine.engine import Completion, Engine
from ferry.engine.sampling import SamplingParams
from ferry.engine.sequence import Sequence, stop_token_ids
from ferry.engine.sequence_runner import SequenceRunner
from ferry.errors import FerryError
from ferry.memory import peak_resident_mib, resident_mib
from ferry.model.loader import LoadedModel, load_layers

log = logging.getLogger("ferry.edge")
_CLOSED = object()
# Before reconnect n: min(0.1 * 2^(n-1), 1) s. A dead cloud refuses in ~1 ms, so this (not the reply timeout)
# decides how soon the edge gives up or falls back: 0.3 s in all for the default 2 reconnects.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 1.0


def reconnect_delay(attempt: int) -> float:
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


def check_cloud_address(text: str) -> str:
    """A --cloud address checked by its form (HOST:PORT, port 1..65535); names are resolved only on connecting."""
    _host, port = parse_address(text)
    if port == 0:
        raise FerryError(f"bad cloud address {text!r}: port 0 is not a port to connect to")
    return text.strip()


class LinkError(FerryError):
    """The cloud could not be reached, refused us, or stopped answering."""


@dataclass
class LinkStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    wait_s: float = 0.0  # time blocked on the cloud's replies
    cloud_compute_s: float = 0.0  # what the cloud reported spending on them
    reconnects: int = 0
    fallback_tokens: int = 0  # tokens finished locally after the link broke
    total_s: float = 0.0  # the whole request, as the edge saw it
    drafted: int = 0  # speculative rounds: tokens the edge proposed
    accepted: int = 0  # ... and the cloud agreed with
    rss_mib: float | None = None  # the edge process's resident memory when the request finished
    peak_rss_mib: float | None = None  # ... and the most it has held so far
    draft_rounds: int = 0  # speculative rounds (one VERIFY each)
    undrafted_steps: int = 0  # plain steps while drafting was paused (its expected gain was below 1)

    @property
    def link_s(self) -> float:
        return max(0.0, self.wait_s - self.cloud_compute_s)

    def as_dict(self, tokens: int) -> dict:
        total_s = self.total_s
        out = asdict(self)
        per = max(tokens, 1)
        out |= {
            "bytes_sent_per_token": round(self.bytes_sent / per, 1),
            "bytes_received_per_token": round(self.bytes_received / per, 1),
            "link_s": round(self.link_s, 4),
            "link_time_share": round(self.link_s / total_s, 3) if total_s > 0 else 0.0,
            "acceptance_rate": round(self.accepted / self.drafted, 3) if self.drafted else None,
            "rss_mib": round(self.rss_mib, 1) if self.rss_mib is not None else None,
            "peak_rss_mib": round(self.peak_rss_mib, 1) if self.peak_rss_mib is not None else None,
        }
        return out


class _Link:
    """One gRPC stream to one cloud address: frames out through a queue, frames in through a reader thread."""

    def __init__(self, target: str, token: str, max_frame_bytes: int, timeout_s: float, tls_ca: bytes | None) -> None:
        self.target, self.timeout_s = target, timeout_s
        options = [("grpc.max_receive_message_length", max_frame_bytes), ("grpc.max_send_message_length", max_frame_bytes)]
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca), options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.outgoing: queue.Queue = queue.Queue()
        self.incoming: queue.Queue = queue.Queue()
        call = self.channel.stream_stream(METHOD)
        self.call = call(iter(self.outgoing.get, _CLOSED), metadata=[("authorization", f"Bearer {token}")])
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.incoming.put(raw)
            self.incoming.put(LinkError(f"cloud at {self.target} closed the session"))
        except grpc.RpcError as exc:
            self.incoming.put(LinkError(describe_rpc_error(self.target, exc)))

    def send(self, data: bytes) -> None:
        self.outgoing.put(data)

    def receive(self) -> bytes:
        try:
            item = self.incoming.get(timeout=self.timeout_s)
        except queue.Empty:
            raise LinkError(f"cloud at {self.target} did not answer within {self.timeout_s:.0f} s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.outgoing.put(_CLOSED)
        self.call.cancel()
        self.channel.close()


# What gRPC's details say for the failures a user must tell apart, in words.
_CAUSES = (("connection refused", "refused the connection"), ("reset by peer", "reset the connection"),
           ("dns resolution failed", "could not be resolved"), ("deadline exceeded", "did not answer in time"))


def describe_rpc_error(target: str, exc: grpc.RpcError) -> str:
    details = exc.details() or ""
    for needle, words in _CAUSES:
        if needle in details.lower():
            return f"cloud at {target} {words} ({exc.code().name}: {details})"
    return f"cloud at {target}: {exc.code().name}: {details}"


class EdgeClient:
    def __init__(
        self,
        loaded: LoadedModel,
        clouds: list[str],
        split: int | None,
        token: str,
        codec: str = "fp32",
        timeout_s: float = 30.0,
        reconnects: int = 2,
        fallback: str | None = None,
        max_frame_bytes: int = 16 * 1024 * 1024,
        drafter: Drafter | None = None,
        gamma_max: int = 8,
        min_edge_layers: int = 1,
        tls_ca: bytes | None = None,
        compile: bool | None = None,
    ) -> None:
        """`split=None` chooses K on the first connection from measurements (see split_planner). `compile`: the
        edge's one-token steps through the compiled CPU step (SequenceRunner; None: unless FERRY_COMPILE=0).

        `loaded` may be partial (loader.open_partial): the client reads layers 0..K-1 once the cloud has accepted
        the session, or the whole model when `fallback="local"`. A whole model is used as it is.
        """
        layers = loaded.config.num_layers
        if split is not None and not 0 < split < layers:
            raise FerryError(f"--split must be between 1 and {layers - 1} for this {layers}-layer model, got {split}")
        if not 0 < min_edge_layers < layers:
            raise FerryError(f"--min-edge-layers must be between 1 and {layers - 1}, got {min_edge_layers}")
        if fallback not in (None, "local"):
            raise FerryError(f"unknown fallback {fallback!r} (only 'local')")
        if not clouds:
            raise FerryError("no cloud address given (--cloud HOST:PORT)")
        clouds = [check_cloud_address(c) for c in clouds]
        if reconnects < 0:
            raise FerryError(f"--reconnects must be 0 or more, got {reconnects}")
        if not timeout_s > 0:
            raise FerryError(f"--timeout must be a positive number of seconds, got {timeout_s}")
        if gamma_max < 1:
            raise FerryError(f"--gamma-max must be 1 or more, got {gamma_max}")
        self.loaded, self.clouds, self.split, self.token = loaded, clouds, split, token
        self.codec = Codec.parse(codec)
        self.timeout_s, self.reconnects, self.fallback = timeout_s, reconnects, fallback
        self.max_frame_bytes = max_frame_bytes
        self.tls_ca = tls_ca  # PEM of the CA that signed the cloud's certificate; None: plaintext (loopback, tunnels)
        model = loaded.model
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.min_edge_layers = min_edge_layers
        self.split_table: list[dict] = []  # the --split auto predictions, best first
        self._plan_request: tuple[list[int], int] = ([], 1)  # the prompt and max_tokens --split auto plans for
        self.compile = compile
        self.runner: SequenceRunner | None = None
        if split is not None:
            self._use_split(split)
        self.link: _Link | None = None
        self.session = 0
        self.tokens_per_frame = 1
        self.drafter, self.gamma_max = drafter, gamma_max
        self.gamma = GammaController(gamma_max) if drafter else None
        self._next_request = 1

    # --- connection -------------------------------------------------------------------------------------

    def _use_split(self, split: int) -> None:
        self.split = split
        self.runner = SequenceRunner(self.loaded.model, split, self.compile)
        log.info("edge layers 0..%d: %s", split - 1, self.runner.path)

    def _read_weights(self) -> None:
        """Layers 0..K-1, or the whole model for a local fallback (read now: reading it once the link has broken
        would stall the answer for the whole load)."""
        assert self.split is not None
        load_layers(self.loaded, None if self.fallback == "local" else self.split)

    def _choose_split(self) -> None:
        """Probe the link and both sides' compute, predict time per token for every K, take the best."""
        from ferry.edge.split_planner import (
            ComputeProfile,
            LinkProfile,
            Workload,
            measure_compute,
            measure_wire_bytes,
            predict,
        )

        assert self.link is not None
        def ping(size: int) -> tuple[float, dict]:
            began = time.perf_counter()
            self.link.send(Frame(Kind.PING, body=bytes(size)).encode())
            reply = self._frame(self.link.receive())
            if reply.kind != Kind.PONG:
                raise ProtocolError(f"expected PONG, got {reply.kind.name}")
            return time.perf_counter() - began, reply.meta

        _, meta = ping(1)  # the cloud profiles itself on the first PING
        rtt = statistics.median(ping(1)[0] for _ in range(3))
        big = min(256 * 1024, self.max_frame_bytes // 2)
        t_big = statistics.median(ping(big)[0] for _ in range(2))
        bandwidth = big / max(t_big - rtt, 1e-6)
        sample = torch.randn(1, self.loaded.config.hidden_size)
        began = time.perf_counter()
        for _ in range(20):
            encoded = self.codec.encode(sample)
            self.codec.decode(encoded, 1, sample.shape[1])
        codec_s = (time.perf_counter() - began) / 20
        load_layers(self.loaded, self.min_edge_layers)  # a partial model: time the layers it will run anyway
        edge = measure_compute(self.loaded, first_layers=self.loaded.layers_read)
        prefill = meta.get("prefill_layer_s")
        cloud = ComputeProfile(float(meta["layer_s"]), float(meta["head_s"]), None if prefill is None else float(prefill))
        prompt_ids, max_tokens = self._plan_request
        # Per K (compressing codecs differ with depth), over the layers read so far; deeper K take the last size.
        wire = measure_wire_bytes(self.loaded, self.codec, prompt_ids, layers=self.loaded.layers_read)
        self.split_table = predict(self.loaded.config.num_layers, edge, cloud, LinkProfile(rtt, bandwidth), wire,
                                   codec_s, self.min_edge_layers, int(meta.get("min_split", 1)),
                                   Workload(len(prompt_ids), max_tokens))
        if not self.split_table:
            raise LinkError("no split point satisfies --min-edge-layers and the cloud's range")
        best = self.split_table[0]
        log.info("split auto: K=%d predicted %.1f ms/token (rtt %.1f ms, %.1f MB/s)", best["split"],
                 best["predicted_s"] * 1e3, rtt * 1e3, bandwidth / 1e6)
        self._use_split(best["split"])

    def connect(self, attempt: int = 0) -> None:
        """Open a session (HELLO -> WELCOME: token, model, split and codec accepted), then read the weights this
        edge still lacks. On failure the link is closed and LinkError/ProtocolError says why."""
        target = self.clouds[attempt % len(self.clouds)]
        self.close()
        self.link = _Link(target, self.token, self.max_frame_bytes, self.timeout_s, self.tls_ca)
        try:
            if self.runner is None:
                self._choose_split()
            hello = Frame(Kind.HELLO, meta={"model": model_fingerprint(self.loaded.config), "split": self.split,
                                             "codec": self.codec.name})
            self.link.send(hello.encode())
            reply = self._frame(self.link.receive())
            if reply.kind != Kind.WELCOME:
                raise LinkError(f"cloud at {target} answered HELLO with {reply.kind.name}")
        except BaseException:
            self.close()
            raise
        self.session = reply.session
        self._read_weights()
        self.runner.warm_up()
        # Prefill is cut into frames that fit the cloud's limit (sized for fp32, the largest codec).
        limit = int(reply.meta.get("max_frame_bytes", self.max_frame_bytes))
        self.tokens_per_frame = max(1, (min(limit, self.max_frame_bytes) - 4096) // (4 * self.loaded.config.hidden_size + 64))
        log.info("session %d with %s (codec %s, split %d)", self.session, target, self.codec.name, self.split)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    @staticmethod
    def _frame(raw: bytes) -> Frame:
        frame = Frame.decode(raw)
        if frame.kind == Kind.ERROR:
            raise LinkError(f"cloud refused: {frame.meta.get('error', 'unknown error')}")
        return frame

    # --- generation -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _local_hidden(self, ids: list[int], start: int) -> torch.Tensor:
        """Layers 0..K-1 over tokens at positions [start, start + len(ids)); returns [tokens, hidden]."""
        assert self.runner is not None
        return self.runner.run(self.loaded.model.embed_tokens(torch.tensor(ids, device=self.device)), start)

    def _exchange(self, frames: list[bytes], stats: LinkStats) -> Frame:
        """Send frames, wait for the one reply they ask for; count bytes, round trips and time blocked."""
        assert self.link is not None
        began = time.perf_counter()
        for data in frames:
            stats.bytes_sent += len(data)
            self.link.send(data)
        raw = self.link.receive()
        stats.wait_s += time.perf_counter() - began
        stats.bytes_received += len(raw)
        stats.round_trips += 1
        return self._frame(raw)

    def _step(self, request: int, hidden: torch.Tensor, start: int, stats: LinkStats, prelude: list[bytes]) -> int:
        """Send `hidden` (positions start..) in frames that fit the limit; wait for the token after the last."""
        frames = list(prelude)
        for offset in range(0, hidden.shape[0], self.tokens_per_frame):
            chunk = hidden[offset : offset + self.tokens_per_frame]
            last = offset + chunk.shape[0] == hidden.shape[0]
            frames.append(Frame.hidden(self.session, request, start + offset, chunk.shape[0],
                                       self.codec.encode(chunk), reply=last).encode())
        reply = self._exchange(frames, stats)
        if reply.kind != Kind.TOKEN or reply.request != request:
            raise ProtocolError(f"expected TOKEN for request {request}, got {reply.kind.name} for {reply.request}")
        token, _position, cloud_ms = reply.token_fields()
        stats.cloud_compute_s += cloud_ms / 1000
        return token

    def _speculative_round(self, request: int, seq: Sequence, start: int, stats: LinkStats, remaining: int) -> list[int]:
        """Draft gamma tokens, send pending + drafts in one VERIFY, return the accepted drafts + the cloud's token."""
        assert self.drafter is not None and self.gamma is not None
        history = seq.prompt_ids + seq.output_ids
        pending = history[start:]
        if (gamma := self.gamma.choose()) == 0:  # paused, or measuring plain steps: timed for the controller
            began = time.perf_counter()
            token = self._step(request, self._local_hidden(pending, start), start, stats, [])
            self.gamma.plain_step(time.perf_counter() - began)
            stats.undrafted_steps += 1
            return [token]
        gamma = max(1, min(gamma, remaining - 1, self.tokens_per_frame - 1))
        self.drafter.catch_up(history)
        draft, draft_s = timed(self.drafter.draft, history, gamma)
        began = time.perf_counter()  # the round's overhead: edge layers, link and verify, as a plain step's
        hidden = self._local_hidden(pending + draft, start)
        frame = Frame.verify(self.session, request, start, len(pending) + gamma, draft, self.codec.encode(hidden))
        reply = self._exchange([frame.encode()], stats)
        if reply.kind != Kind.VERDICT or reply.request != request:
            raise ProtocolError(f"expected VERDICT for request {request}, got {reply.kind.name}")
        accepted, token, cloud_ms = reply.verdict_fields()
        if accepted > gamma:
            raise ProtocolError(f"cloud accepted {accepted} of {gamma} drafts")
        stats.cloud_compute_s += cloud_ms / 1000
        stats.drafted += gamma
        stats.draft_rounds += 1
        stats.accepted += accepted
        self.drafter.rollback(len(history) + min(accepted, gamma - 1))
        self.gamma.update(gamma, accepted, time.perf_counter() - began, draft_s)
        return draft[:accepted] + [token]

    def use_drafter(self, drafter: Drafter) -> None:
        """Speculative rounds from now on (the CLI loads the draft only after the cloud accepted the session)."""
        self.drafter, self.gamma = drafter, GammaController(self.gamma_max)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, drafting: bool | None = None) -> None:
        """What generate() would refuse, checked without the link or the weights (the CLI runs it first).
        `drafting`: whether speculative rounds will run (default: whether a drafter is set)."""
        config = self.loaded.config
        if not prompt_ids:
            raise FerryError("empty prompt")
        if len(prompt_ids) + params.max_tokens > config.max_context:
            raise FerryError(f"prompt of {len(prompt_ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                             f"context of {config.max_context}")
        if (self.drafter is not None if drafting is None else drafting) and not params.greedy:
            raise FerryError("speculative rounds need greedy sampling (--temperature 0)")

    def _reconnect(self, cause: Exception, stats: LinkStats, budget: list[int]) -> None:
        """A fresh session after `cause` broke the link: each address in turn, a bounded backoff before each try,
        at most `budget[0]` tries for the whole request (taken from it). LinkError naming the last failure (and
        the first) when none succeeds."""
        last: Exception = cause
        while budget[0] > 0:
            budget[0] -= 1
            stats.reconnects += 1
            time.sleep(reconnect_delay(stats.reconnects))
            try:
                self.connect(stats.reconnects)
                return
            except (LinkError, ProtocolError) as exc:
                log.warning("reconnect %d of %d failed (%s)", stats.reconnects, self.reconnects, exc)
                last = exc
        first = "" if last is cause else f" (the link first broke: {cause})"
        raise LinkError(f"{last}; gave up after {self.reconnects} reconnect(s){first}")

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_token=None) -> tuple[Completion, LinkStats]:
        self.check_request(prompt_ids, params)
        stats, seq = LinkStats(), Sequence(list(prompt_ids))
        eos = stop_token_ids(params, self.loaded.tokenizer)
        started = time.perf_counter()
        self._plan_request = (list(prompt_ids), params.max_tokens)
        if self.link is None:
            try:
                self.connect()
            except (LinkError, ProtocolError):
                if self.fallback != "local":
                    raise
                return self._finish_locally(seq, params, stats, started, on_token)
        request = self._next_request
        self._next_request += 1
        sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed}
        prelude = [Frame(Kind.REQUEST, self.session, request, meta={"sampling": sampling}).encode()]
        if self.drafter is not None:
            self.drafter.reset()
        pending_ids, start = list(prompt_ids), 0
        budget = [self.reconnects]  # reconnects left for this request
        while not seq.finished:
            try:
                if self.drafter is not None and start > 0:
                    remaining = params.max_tokens - len(seq.output_ids)
                    new_tokens = self._speculative_round(request, seq, start, stats, remaining)
                else:
                    new_tokens = [self._step(request, self._local_hidden(pending_ids, start), start, stats, prelude)]
            except (LinkError, ProtocolError) as exc:
                log.warning("link failed (%s)", exc)
                try:
                    self._reconnect(exc, stats, budget)
                except LinkError:
                    if self.fallback == "local":
                        return self._finish_locally(seq, params, stats, started, on_token)
                    raise
                # Resume on a fresh session: replay the whole history so the cloud rebuilds its KV cache.
                request = self._next_request
                self._next_request += 1
                history = seq.prompt_ids + seq.output_ids
                prelude = [Frame(Kind.REQUEST, self.session, request, meta={"sampling": sampling}).encode()]
                pending_ids, start = history, 0
                continue
            prelude = []
            for token in new_tokens:
                delta = seq.append(token, self.loaded.tokenizer, eos, params.stop, params.max_tokens)
                if on_token:
                    on_token(token, delta)
                if seq.finished:
                    break
            # The newest token is the one neither side has run yet.
            pending_ids, start = [seq.output_ids[-1]], len(seq.prompt_ids) + len(seq.output_ids) - 1
        if self.link is not None:
            self.link.send(Frame(Kind.END, self.session, request).encode())
        return self._completion(seq, started, stats), stats

    def _finish_locally(self, seq: Sequence, params: SamplingParams, stats: LinkStats, started: float, on_token):
        log.warning("finishing the answer locally (%d tokens so far)", len(seq.output_ids))
        self.close()
        load_layers(self.loaded, None)  # already whole unless the cloud never accepted a session
        # Eager: compiling the whole model now would stall the answer for seconds (minutes on a cold cache).
        engine = Engine(self.loaded.model, self.loaded.tokenizer, cuda_graphs=False, compile=False)
        remaining = params.max_tokens - len(seq.output_ids)
        history = seq.prompt_ids + seq.output_ids
        eos = stop_token_ids(params, self.loaded.tokenizer)
        local = SamplingParams(**{**params.__dict__, "max_tokens": remaining})
        for event in engine.stream([history], local):
            stats.fallback_tokens += 1
            delta = seq.append(event.token_id, self.loaded.tokenizer, eos, params.stop, params.max_tokens)
            if on_token:
                on_token(event.token_id, delta)
            if seq.finished:
                break
        return self._completion(seq, started, stats), stats

    @staticmethod
    def _completion(seq: Sequence, started: float, stats: LinkStats) -> Completion:
        stats.total_s = time.perf_counter() - started
        stats.rss_mib = resident_mib()
        stats.peak_rss_mib = max(peak_resident_mib(), stats.rss_mib or 0.0)  # two clocks: never below now
        return Completion.from_sequence(seq, started)
