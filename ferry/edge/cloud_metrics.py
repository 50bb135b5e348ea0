"""`ferry cloud --metrics-port`: the cloud's counts as Prometheus text, in the families `ferry serve` uses.

The edge link appears as `ferry_link_bytes_total{link="edge_received"|"edge_sent"}` (every frame's bytes, both
ways) and `ferry_link_seconds_total{link="edge_round_trip"}`; the steps, frames and tokens the cloud's layers ran
and its busy time come from CloudServer.stats. A small threaded HTTP server with a socket timeout answers
`GET /metrics`: a scraper that stalls holds one thread for at most that long.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ferry.errors import FerryError

log = logging.getLogger("ferry.cloud")

ROUND_TRIP_HELP = ("Seconds from each TOKEN or VERDICT the cloud sent to the same session's next frame of that "
                   "request: the link both ways plus the edge's own work in between (its layers, a draft), so an "
                   "upper bound on the link's time; round trips are ferry_edge_round_trips_total")
SOCKET_TIMEOUT_S = 10.0


class CloudCollector:
    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        s, link, stats = self.server, self.server.link, self.server.stats
        yield GaugeMetricFamily("ferry_cloud_sessions", "Edge sessions being served", value=s.active_sessions)
        yield GaugeMetricFamily("ferry_kv_blocks_used", "Blocks of the shared KV pool held by sessions (0 one by one)",
                                value=s.kv_blocks_used())
        yield CounterMetricFamily("ferry_cloud_steps", "Forwards of the cloud's layers", value=stats.steps)
        yield CounterMetricFamily("ferry_cloud_frames", "Frames those forwards served", value=stats.frames)
        yield CounterMetricFamily("ferry_cloud_tokens", "Positions those forwards computed", value=stats.tokens)
        yield CounterMetricFamily("ferry_cloud_busy_seconds", "Time in the cloud's forwards and LM head",
                                  value=stats.busy_s)
        links = CounterMetricFamily("ferry_link_bytes", "Bytes of the frames that crossed each link", labels=["link"])
        links.add_metric(["edge_received"], link.bytes_received)
        links.add_metric(["edge_sent"], link.bytes_sent)
        yield links
        frames = CounterMetricFamily("ferry_link_frames", "Frames that crossed each link", labels=["link"])
        frames.add_metric(["edge_received"], link.frames_received)
        frames.add_metric(["edge_sent"], link.frames_sent)
        yield frames
        seconds = CounterMetricFamily("ferry_link_seconds", ROUND_TRIP_HELP, labels=["link"])
        seconds.add_metric(["edge_round_trip"], link.round_trip_s)
        yield seconds
        yield CounterMetricFamily("ferry_edge_round_trips", "Replies answered by the session's next frame",
                                  value=link.round_trips)


class MetricsServer:
    """Serves `GET /metrics` for `registry` on HOST:PORT (port 0 picks one) from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT_S  # on the connection's socket: a silent client is dropped

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("metrics: " + fmt, *args)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise FerryError(f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="ferry-cloud-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def serve_cloud_metrics(server, host: str, port: int) -> MetricsServer:
    registry = CollectorRegistry()
    registry.register(CloudCollector(server))
    return MetricsServer(registry, host, port)
