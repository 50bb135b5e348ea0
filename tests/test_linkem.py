"""The link emulator adds the delay and bandwidth cap it is asked for, keeps bytes intact, and resets on demand."""

from __future__ import annotations

import random
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



def test_jitter_moves_each_one_way_delay_by_the_seeded_draw(echo_server):
    rtt, jitter, seed, pings = 0.04, 0.015, 11, 16
    emulator = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", echo_server),
                            LinkProfile(rtt_s=rtt, jitter_s=jitter, seed=seed))
    port = emulator.start_in_thread()
    try:
        measured = [_through(port, b"ping")[1] for _ in range(pings)]
    finally:
        emulator.stop()
    # The emulator draws one uniform(-jitter, jitter) per chunk from its seeded generator, in order: a ping's
    # request, then its echo. Each way is rtt/2 + its draw (never below zero).
    draws = random.Random(seed)
    expected = [sum(max(0.0, rtt / 2 + draws.uniform(-jitter, jitter)) for _ in range(2)) for _ in range(pings)]
    assert max(expected) - min(expected) > jitter  # the draws spread the round trips, so the check below can fail
    for want, got in zip(expected, measured):
        assert want - 0.002 <= got <= want + 0.05, (want, got)  # upper slack: a loaded test machine


def test_reset_probability_drops_exactly_the_connections_its_seeded_draws_pick(echo_server):
    probability, seed, connections = 0.3, 5, 12
    emulator = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", echo_server),
                            LinkProfile(reset_prob=probability, seed=seed))
    port = emulator.start_in_thread()
    survived = []
    try:
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"ping")
                try:
                    survived.append(s.recv(10) == b"ping")
                except OSError:  # reset by peer
                    survived.append(False)
    finally:
        emulator.stop()
    # One draw per chunk, in order: the request (a reset there sends nothing on), then the echo.
    draws = random.Random(seed)
    expected = []
    for _ in range(connections):
        expected.append(draws.random() >= probability and draws.random() >= probability)
    assert 0 < sum(expected) < connections  # this seed both keeps and drops some connections
    assert survived == expected
    assert emulator.resets == expected.count(False)
