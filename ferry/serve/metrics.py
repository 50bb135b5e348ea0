"""`GET /metrics`: Prometheus text for requests, the engine's queue and KV cache, latency and the links crossed.

Request-level series are observed here as requests end; engine-level ones are read from the gauges rank 0 sends
with every step (Engine.gauges) when Prometheus scrapes. Link bytes are exact counts of what each step
moved: the packed step inputs and KV swap-ins host -> device, sampled tokens and swap-outs device -> host, and
with tensor parallelism the all-reduce and logits all-gather messages. Link seconds are the time those transfers
took, measured where that costs no sync and estimated where it cannot be measured (ferry/comm/link_time.py): the
help text says which, so a dashboard never shows an estimate as a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ferry.serve.engine_client import RequestStream

# Seconds; TTFT spans a queued request's wait, TPOT a decode step at small and large batches.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

_GAUGES = {  # engine gauge -> (metric, help)
    "waiting": ("ferry_requests_waiting", "Requests queued, not yet admitted"),
    "running": ("ferry_requests_running", "Requests in the running batch"),
    "swapped": ("ferry_requests_swapped", "Requests whose KV blocks are swapped out to host memory"),
    "kv_blocks_used": ("ferry_kv_blocks_used", "KV cache blocks held by requests"),
    "kv_blocks_total": ("ferry_kv_blocks_total", "KV cache blocks in the pool"),
}
_COUNTERS = {
    "steps": ("ferry_engine_steps", "Engine steps run"),
    "graph_steps": ("ferry_engine_graph_steps", "Decode steps replayed from a CUDA graph"),
    "prefill_graph_steps": ("ferry_engine_prefill_graph_steps",
                            "Small steps with prefill chunks replayed from a CUDA graph"),
    "prefill_tokens": ("ferry_engine_prefill_tokens", "Prompt tokens computed (cached prefixes excluded)"),
    "decode_tokens": ("ferry_engine_decode_tokens", "Decode tokens computed"),
    "prefix_hit_tokens": ("ferry_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
    "preemptions": ("ferry_preemptions", "Sequences preempted (swapped out or dropped for recompute)"),
}
_LINKS = {"pcie_h2d_bytes": "pcie_h2d", "pcie_d2h_bytes": "pcie_d2h", "allreduce_bytes": "allreduce",
          "allgather_bytes": "allgather",
          # rank 0's: stage 0 sends hidden states to stage 1 (the token bytes are the last stage's, so 0 here)
          "pipeline_hidden_bytes": "pipeline_hidden", "pipeline_token_bytes": "pipeline_tokens"}
# Only the links the engine reports a time for appear (pipeline hops have none yet; allgather none on CUDA).
_LINK_SECONDS = {"pcie_h2d_seconds": "pcie_h2d", "pcie_d2h_seconds": "pcie_d2h",
                 "allreduce_seconds": "allreduce", "allgather_seconds": "allgather"}
LINK_SECONDS_HELP = (
    "Seconds each link's transfers took. pcie_h2d, pcie_d2h: measured, CUDA events around each copy read once "
    "passed (host clock without CUDA). allreduce on CUDA: an ESTIMATE, not a measurement: calls x the start-up "
    "calibration's in-graph time for each message size (CUDA-graph replays cannot be timed per call); on CPU: "
    "measured wall time of the calls, as is allgather")


class _EngineCollector:
    def __init__(self, gauges: Callable[[], dict], in_flight: Callable[[], int]) -> None:
        self.gauges, self.in_flight = gauges, in_flight

    def collect(self):
        g = self.gauges()
        for key, (name, text) in _GAUGES.items():
            yield GaugeMetricFamily(name, text, value=g.get(key, 0))
        yield GaugeMetricFamily("ferry_requests_in_flight", "Requests the server is answering", value=self.in_flight())
        for key, (name, text) in _COUNTERS.items():
            yield CounterMetricFamily(name, text, value=g.get(key, 0))
        links = CounterMetricFamily("ferry_link_bytes", "Bytes moved over each link by the engine's steps",
                                    labels=["link"])
        for key, link in _LINKS.items():
            links.add_metric([link], g.get(key, 0))
        yield links
        seconds = CounterMetricFamily("ferry_link_seconds", LINK_SECONDS_HELP, labels=["link"])
        for key, link in _LINK_SECONDS.items():
            if key in g:
                seconds.add_metric([link], g[key])
        yield seconds


class ServerMetrics:
    def __init__(self, gauges: Callable[[], dict], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ferry_requests", "Requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("ferry_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("ferry_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("ferry_time_to_first_token_seconds", "Arrival to first token", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("ferry_time_per_output_token_seconds", "Mean time between a request's tokens after "
                              "the first", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("ferry_e2e_request_latency_seconds", "Arrival to last token", buckets=_E2E_BUCKETS,
                             registry=r)
        r.register(_EngineCollector(gauges, in_flight))

    def observe(self, endpoint: str, outcome: str, streams: list[RequestStream]) -> None:
        self.requests.labels(endpoint, outcome).inc()
        for s in streams:
            self.prompt_tokens.inc(s.prompt_tokens)
            self.generation_tokens.inc(s.output_tokens)
            if s.first_token_at is None:
                continue
            self.ttft.observe(s.first_token_at - s.arrival)
            if s.output_tokens > 1:
                self.tpot.observe((s.last_token_at - s.first_token_at) / (s.output_tokens - 1))
            if outcome == "ok":
                self.e2e.observe(s.last_token_at - s.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
