"""The cloud side of an edge/cloud split counts the edge link (frame bytes both ways, round trips and their time)
and serves them with its steps as Prometheus text (`ferry cloud --metrics-port`)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from ferry.edge.cloud_metrics import serve_cloud_metrics
from ferry.edge.edge import EdgeClient
from ferry.engine.sampling import SamplingParams

TOKEN = "metrics-token-" + os.urandom(4).hex()
SPLIT = 10
TOKENS = 6


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_the_cloud_counts_edge_link_bytes_and_round_trips_and_serves_them(ferry_smollm, start_cloud):
    server = start_cloud(SPLIT, TOKEN)
    metrics = serve_cloud_metrics(server, "127.0.0.1", 0)
    try:
        before = _scrape(metrics.port)
        assert before['ferry_link_bytes_total{link="edge_received"}'] == 0
        client = EdgeClient(ferry_smollm, [f"127.0.0.1:{server.port}"], SPLIT, TOKEN, timeout_s=60)
        try:
            client.connect()
            _, edge = client.generate(ferry_smollm.tokenizer.encode("The sky is"),
                                      SamplingParams(max_tokens=TOKENS, ignore_eos=True))
        finally:
            client.close()
        assert server.wait_sessions_ended(30)
        after = _scrape(metrics.port)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/other", timeout=10)
        assert missing.value.code == 404
    finally:
        metrics.close()
    link = server.link
    # The request's frames as the edge counted them, plus the HELLO / WELCOME before it (not in its stats).
    assert edge.bytes_sent < link.bytes_received < edge.bytes_sent + 4096
    assert edge.bytes_received < link.bytes_sent < edge.bytes_received + 4096
    assert after['ferry_link_bytes_total{link="edge_received"}'] == link.bytes_received
    assert after['ferry_link_bytes_total{link="edge_sent"}'] == link.bytes_sent
    # One prefill frame answered by the first token, then a frame per token after it: each reply but the last
    # (no frame of the request follows it) is a round trip.
    assert link.round_trips == after["ferry_edge_round_trips_total"] == TOKENS - 1
    assert 0 < after['ferry_link_seconds_total{link="edge_round_trip"}'] == pytest.approx(link.round_trip_s)
    assert link.round_trip_s < edge.total_s  # round trips happen inside the request the edge timed
    assert after["ferry_cloud_frames_total"] == TOKENS and after["ferry_cloud_sessions"] == 0


@pytest.mark.slow
def test_ferry_cloud_metrics_port_serves_the_counts_until_it_stops():
    """The command as a user runs it: `--metrics-port 0` picks a port and prints the address."""
    import re
    import signal
    import subprocess
    import sys

    env = {**os.environ, "FERRY_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "cloud", "--split", "4", "--listen", "127.0.0.1:0",
                             "--device", "cpu", "--dtype", "fp32", "--metrics-port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # the process prints the address once the metrics server listens
            lines.append(line)
            if m := re.search(r"cloud metrics on http://127\.0\.0\.1:(\d+)/metrics", line):
                break
        else:
            pytest.fail("ferry cloud exited without serving metrics:\n" + "".join(lines[-20:]))
        values = _scrape(int(m.group(1)))
        assert values['ferry_link_bytes_total{link="edge_sent"}'] == 0 and values["ferry_cloud_sessions"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
