"""The link emulator adds the delay and bandwidth cap it is asked for, keeps bytes intact, and resets on demand."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ferry.edge.linkem import LinkEmulator, LinkProfile, parse_duration, parse_rate
from ferry.errors import FerryError


def test_durations_and_rates_parse():
    assert parse_duration("50ms") == pytest.approx(0.05) and parse_duration("2s") == 2.0
    assert parse_rate("20mbit") == 20e6 and parse_rate("1gbit") == 1e9
    for bad in ("fast", "-3ms"):
        with pytest.raises(FerryError):
            parse_duration(bad)
    with pytest.raises(FerryError):
        parse_rate("20 furlongs")


@pytest.fixture
def echo_server():
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _through(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        start = time.perf_counter()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(65536)
        return got, time.perf_counter() - start


def test_rtt_and_bandwidth_cap_are_applied_and_bytes_arrive_intact(echo_server):
    emulator = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", echo_server), LinkProfile(rtt_s=0.1, rate_bps=8e6))
    port = emulator.start_in_thread()
    try:
        small, t_small = _through(port, b"ping")
        assert small == b"ping" and 0.1 <= t_small < 0.5  # one round trip: the 100 ms RTT (each way crossed once)
        payload = bytes(range(256)) * 2048  # 512 KiB: 0.52 s at 8 Mbit/s in each direction
        big, t_big = _through(port, payload)
        assert big == payload and t_big >= 0.5
    finally:
        emulator.stop()


def test_reset_all_drops_open_connections(echo_server):
    emulator = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", echo_server), LinkProfile())
    port = emulator.start_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            emulator.reset_all()
            s.settimeout(5)
            try:
                data = s.recv(10)
            except OSError:  # reset by peer
                data = b""
            assert data == b"", "connection still open after reset_all()"
    finally:
        emulator.stop()

