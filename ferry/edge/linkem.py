"""A link emulator: a TCP proxy adding delay, jitter, a bandwidth cap and connection resets.

Kernel traffic shaping is not available everywhere Ferry is tested, so this emulates a WAN link in user space:
each direction serialises bytes at `rate` (a chunk occupies the link for len*8/rate seconds), then delivers them
one-way-delay (rtt/2, +- jitter) later, never reordering. `reset_prob` aborts a connection per chunk with that
probability (seeded), and `reset_all()` aborts every open one, to test reconnects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import threading
import time
from dataclasses import dataclass

from ferry.errors import FerryError

log = logging.getLogger("ferry.linkem")
CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkProfile:
    rtt_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float = 0.0  # 0 = unlimited
    reset_prob: float = 0.0
    seed: int = 0


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", text)
    if not m:
        raise FerryError(f"bad duration {text!r} (e.g. 50ms, 0.2s)")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]


def parse_rate(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(bit|kbit|mbit|gbit)?\s*(?:/s|ps)?\s*", text.lower())
    if not m:
        raise FerryError(f"bad rate {text!r} (e.g. 20mbit, 1gbit)")
    return float(m.group(1)) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, None: 1}[m.group(2)]


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (HOST an IPv4 address, [IPv6] or a host name) checked by its form alone: nothing is resolved
    here, so a typo fails in microseconds instead of waiting on a name server."""
    host, _, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ipaddress.ip_address(host)
        valid_host = bracketed or ":" not in host
    except ValueError:
        valid_host = not bracketed and _HOSTNAME.fullmatch(host) is not None
    if not valid_host or not port.isdigit() or int(port) > 65535:
        raise FerryError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7070, [::1]:7070 or "
                         "cloud.example.org:7070")
    return host, int(port)


class _Direction:
    """One way of one connection: a serialising, delaying, order-keeping pipe."""

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile, self.rng = profile, rng
        self.busy_until = 0.0
        self.last_delivery = 0.0

    def delivery_time(self, size: int) -> float:
        now = time.monotonic()
        p = self.profile
        sent = max(now, self.busy_until) + (size * 8 / p.rate_bps if p.rate_bps else 0.0)
        self.busy_until = sent
        delay = p.rtt_s / 2 + (self.rng.uniform(-p.jitter_s, p.jitter_s) if p.jitter_s else 0.0)
        self.last_delivery = max(self.last_delivery, sent + max(0.0, delay))
        return self.last_delivery


class LinkEmulator:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], profile: LinkProfile) -> None:
        self.listen, self.target, self.profile = listen, target, profile
        self.rng = random.Random(profile.seed)
        self.port: int | None = None
        self.bytes_forwarded = 0
        self.resets = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: asyncio.StreamWriter) -> None:
        direction = _Direction(self.profile, self.rng)
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                if self.profile.reset_prob and self.rng.random() < self.profile.reset_prob:
                    self.resets += 1
                    writer.transport.abort()
                    peer.transport.abort()
                    break
                queue.put_nowait((direction.delivery_time(len(data)), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot reach %s:%d: %s", *self.target, exc)
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, client_writer),
                self._pipe(upstream_reader, client_writer, upstream_writer),
            )
        except asyncio.CancelledError:
            pass  # the emulator is stopping
        finally:
            self._writers -= {client_writer, upstream_writer}

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("link emulator %s:%d -> %s:%d (%s)", self.listen[0], self.port, *self.target, self.profile)
        async with self._server:
            await self._server.serve_forever()

    def start_in_thread(self) -> int:
        """Run in a daemon thread (tests, benchmarks); returns the listening port."""
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                task = asyncio.create_task(self.serve())
                while self.port is None and not task.done():
                    await asyncio.sleep(0.01)
                ready.set()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True, name="ferry-linkem")
        self._thread.start()
        if not ready.wait(10) or self.port is None:
            raise FerryError(f"link emulator could not listen on {self.listen[0]}:{self.listen[1]}")
        return self.port

    def reset_all(self) -> None:
        """Abort every open connection (as a link drop would)."""
        if self._loop is not None:
            def abort() -> None:
                for w in list(self._writers):
                    w.transport.abort()
                self.resets += 1

            self._loop.call_soon_threadsafe(abort)

    def stop(self) -> None:
        """Close the listener and every connection; the thread ends with its event loop."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(self._loop)])
        if self._thread is not None:
            self._thread.join(5)
