"""`ferry bench serve`, the load generator, against a stub OpenAI-compatible streaming server on loopback whose
delays and chunk counts are known: what it measures is what the stub did, errors are counted with their
messages, the schedules are what they claim, and the CLI writes its result files."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web

from ferry.bench.load_processes import run_level_here, run_level_processes
from ferry.bench.serve_load import (
    LoadRequest,
    RequestResult,
    find_knee,
    make_workload,
    poisson_offsets,
    run_level,
    schedule,
    summarize,
)
from ferry.bench.sse_client import HttpTarget

FIRST_DELAY_S = 0.10  # the stub's time to first token
TOKEN_DELAY_S = 0.02  # and between tokens
MODEL = "stub-model"


@dataclass
class Stub:
    """Streams one chunk of text per token after known delays. `max_tokens` picks a failure to act out:
    500 answers an OpenAI-shaped error, 499 stops the stream without `data: [DONE]`."""

    api_key: str | None = None
    first_delay_s: float = FIRST_DELAY_S
    token_delay_s: float = TOKEN_DELAY_S
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict] = field(default_factory=list)
    url: str = ""

    def refused(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
        return None

    async def models(self, request: web.Request) -> web.StreamResponse:
        return self.refused(request) or web.json_response({"object": "list", "data": [{"id": MODEL}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if refusal := self.refused(request):
            return refusal
        body = await request.json()
        self.bodies.append(body)
        if body["model"] != MODEL:
            return web.json_response({"error": {"message": f"no model {body['model']}"}}, status=404)
        n = body["max_tokens"]
        if n == 500:
            return web.json_response({"error": {"message": "engine exploded", "type": "server_error"}}, status=500)
        chat = request.path.endswith("chat/completions")
        prompt_tokens = len(body["messages"][0]["content"].split()) if chat else len(body["prompt"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if chat:  # a role-only opening delta, sent at once: not output
                await self.event(resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n if n != 499 else 3):
                await asyncio.sleep(self.first_delay_s if i == 0 else self.token_delay_s)
                finish = "length" if i == n - 1 else None
                choice = ({"delta": {"content": "x"}} if chat else {"text": "x"}) | {"index": 0,
                                                                                    "finish_reason": finish}
                await self.event(resp, {"object": "text_completion", "choices": [choice]})
            if n != 499:
                await self.event(resp, {"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                 "completion_tokens": n,
                                                                 "total_tokens": prompt_tokens + n}})
                await resp.write(b"data: [DONE]\n\n")
        finally:
            self.in_flight -= 1
        return resp

    @staticmethod
    async def event(resp: web.StreamResponse, doc: dict) -> None:
        await resp.write(b"data: " + json.dumps(doc).encode() + b"\n\n")


@pytest.fixture
def stub():
    """The stub serving on 127.0.0.1 (a free port) from its own thread and event loop."""
    server = Stub()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.completions)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    server.url = f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)}"
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def requests_of(lengths: list[tuple[int, int]]) -> list[LoadRequest]:
    return [LoadRequest(tuple(range(100, 100 + p)), o) for p, o in lengths]


def test_ttft_and_tpot_match_the_servers_delays_and_tokens_come_from_usage(stub):
    reqs = requests_of([(12, 10), (20, 8), (7, 12), (30, 10)])
    results = run_level_here(HttpTarget(stub.url, MODEL), reqs, None, 4)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [(r.prompt_tokens, r.output_tokens) for r in results] == [(12, 10), (20, 8), (7, 12), (30, 10)]
    assert [len(r.chunk_times) for r in results] == [10, 8, 12, 10]
    row = summarize(results, concurrency=4)
    assert 0.9 * FIRST_DELAY_S * 1000 <= row["ttft_ms_p50"] <= 2.5 * FIRST_DELAY_S * 1000
    assert 0.9 * TOKEN_DELAY_S * 1000 <= row["tpot_ms_p50"] <= 2.0 * TOKEN_DELAY_S * 1000
    assert 0.9 * TOKEN_DELAY_S * 1000 <= row["itl_ms_p50"] <= 2.0 * TOKEN_DELAY_S * 1000
    assert row["output_tokens"] == 40 and row["completed"] == 4 and row["failed"] == 0
    assert row["e2e_ms_p50"] >= (FIRST_DELAY_S + 7 * TOKEN_DELAY_S) * 1000
    assert stub.bodies[0]["prompt"] == list(range(100, 112))  # token ids, not text
    assert stub.bodies[0]["stream"] and stub.bodies[0]["stream_options"] == {"include_usage": True}
    assert stub.bodies[0]["ignore_eos"] and stub.bodies[0]["temperature"] == 0


def test_chat_ttft_counts_from_the_first_content_not_the_role_delta(stub):
    reqs = [LoadRequest((), 5, 0.0, "one two three")]
    [result] = run_level_here(HttpTarget(stub.url, MODEL, chat=True), reqs, None, 1)
    assert result.ok and result.prompt_tokens == 3 and len(result.chunk_times) == 5
    assert result.chunk_times[0] - result.start >= 0.9 * FIRST_DELAY_S
    assert stub.bodies[0]["messages"] == [{"role": "user", "content": "one two three"}]


def test_closed_loop_never_exceeds_its_concurrency(stub):
    stub.first_delay_s = 0.03
    results = run_level_here(HttpTarget(stub.url, MODEL), requests_of([(4, 3)] * 10), None, 3)
    assert all(r.ok for r in results)
    assert stub.max_in_flight == 3


def test_open_loop_sends_on_schedule(stub):
    reqs = schedule(requests_of([(4, 2)] * 12), rate=40.0, seed=3)
    results = run_level_here(HttpTarget(stub.url, MODEL), reqs, 40.0, None)
    assert all(r.ok for r in results)
    starts = np.array([r.start for r in results])
    offsets = np.array([r.arrival_s for r in reqs])
    assert np.abs((starts - starts[0]) - offsets).max() < 0.05  # each sent at its Poisson time
    assert summarize(results, rate=40.0)["max_send_lag_ms"] < 50


class FakeEngine:
    """A Target that is not HTTP (as the engine driven directly will be): a chunk per token, 5 ms apart."""

    def __init__(self) -> None:
        self.in_flight = self.max_in_flight = 0

    async def send(self, request: LoadRequest) -> RequestResult:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        result = RequestResult(start=time.perf_counter())
        for _ in range(request.max_tokens):
            await asyncio.sleep(0.005)
            result.chunk_times.append(time.perf_counter())
        result.prompt_tokens, result.output_tokens = len(request.prompt_ids), request.max_tokens
        result.end, result.ok = time.perf_counter(), True
        self.in_flight -= 1
        return result


def test_run_level_and_summarize_drive_any_target_not_only_http():
    engine = FakeEngine()
    results = asyncio.run(run_level(engine, requests_of([(3, 4)] * 6), concurrency=2))
    row = summarize(results, concurrency=2)
    assert engine.max_in_flight == 2 and row["completed"] == 6 and row["output_tokens"] == 24
    assert 4 <= row["tpot_ms_p50"] <= 15
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_level(engine, [], rate=1.0, concurrency=1))


def test_poisson_schedule_has_exponential_gaps_of_the_right_mean():
    offsets = poisson_offsets(20000, rate=50.0, seed=1)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: std = mean (uniform would be 0)
    assert np.array_equal(offsets, poisson_offsets(20000, 50.0, seed=1))
    assert not poisson_offsets(8, float("inf")).any()  # inf: all at once


def test_workload_lengths_and_ids_follow_the_spans_and_seed():
    reqs = make_workload(200, (8, 16), (4, 4), seed=5, max_token_id=1000)
    assert {len(r.prompt_ids) for r in reqs} == set(range(8, 17)) and {r.max_tokens for r in reqs} == {4}
    assert min(min(r.prompt_ids) for r in reqs) >= 100 and max(max(r.prompt_ids) for r in reqs) < 1000
    assert reqs == make_workload(200, (8, 16), (4, 4), seed=5, max_token_id=1000)


def test_a_500_and_a_stream_without_done_are_errors_with_their_messages(stub):
    results = run_level_here(HttpTarget(stub.url, MODEL), requests_of([(4, 3), (4, 500), (4, 499)]), None, 3)
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].error == "HTTP 500: engine exploded"
    assert results[2].error == "stream ended without data: [DONE]"
    row = summarize(results, concurrency=3)
    assert (row["completed"], row["failed"]) == (1, 2) and len(row["errors"]) == 2


def test_client_processes_share_the_level_and_return_results_in_order(stub):
    lengths = [(5 + i, 2) for i in range(8)]
    results = run_level_processes(HttpTarget(stub.url, MODEL), requests_of(lengths), None, 4, 2, timeout_s=30)
    assert [r.prompt_tokens for r in results] == [p for p, _ in lengths]
    assert stub.max_in_flight <= 4


def synthetic_open_loop(sends: np.ndarray, ends: np.ndarray) -> list[RequestResult]:
    return [RequestResult(ok=True, start=float(s), end=float(e), chunk_times=[float(s), float(e)], output_tokens=2)
            for s, e in zip(sends, ends)]


def test_achieved_rate_follows_the_sent_rate_until_the_target_falls_behind():
    rng = np.random.default_rng(0)
    sends = poisson_offsets(60, rate=4.0, seed=2)  # 15 s of arrivals; latencies of 1-5 s, all served
    kept_up = summarize(synthetic_open_loop(sends, sends + rng.uniform(1, 5, 60)), rate=4.0)
    assert kept_up["achieved_rate"] == pytest.approx(kept_up["scheduled_rate"], rel=0.1)
    served_at_2 = 1.0 + np.arange(60) / 2.0  # a target that finishes 2 requests/s whatever arrives
    behind = summarize(synthetic_open_loop(sends, np.maximum(served_at_2, sends + 1)), rate=4.0)
    assert behind["achieved_rate"] == pytest.approx(2.0, rel=0.1)
    assert find_knee([kept_up, behind])["rule"] == "achieved_rate"


def row(load: str, tok_s: float, tpot99: float, ttft99: float = 100.0, offered: float | None = None,
        achieved: float | None = None) -> dict:
    return {"load": load, "output_tokens_per_s": tok_s, "tpot_ms_p99": tpot99, "ttft_ms_p99": ttft99,
            "offered_rate": offered, "achieved_rate": achieved}


def test_knee_is_the_level_after_which_throughput_stalls_and_latency_doubles():
    rows = [row("c1", 100, 10), row("c2", 190, 11), row("c4", 370, 12), row("c8", 390, 30), row("c16", 400, 70)]
    assert find_knee(rows) | {"why": ""} == {"index": 2, "load": "c4", "rule": "latency", "why": ""}
    ttft_rows = [row("c1", 100, 10, 50), row("c2", 105, 10, 120)]
    assert find_knee(ttft_rows)["index"] == 0  # TTFT doubling counts too
    steady = [row("c1", 100, 10), row("c2", 200, 25), row("c4", 400, 60)]  # latency grows, but so does throughput
    assert find_knee(steady) is None


def test_knee_by_achieved_rate_falling_behind_the_offered_rate():
    rows = [row("r1", 100, 10, offered=1, achieved=0.99), row("r2", 200, 10, offered=2, achieved=1.98),
            row("r4", 220, 11, offered=4, achieved=3.0)]
    assert find_knee(rows)["index"] == 1 and find_knee(rows)["rule"] == "achieved_rate"


def test_sweep_plot_is_written_with_the_knee(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra's matplotlib")
    from ferry.bench.serve_load import plot_sweep

    rows = [row("c1", 100, 10) | {"ttft_ms_p50": 40.0, "tpot_ms_p50": 9.0},
            row("c2", 105, 30) | {"ttft_ms_p50": 60.0, "tpot_ms_p50": 25.0, "ttft_ms_p99": None}]
    plot_sweep(rows, find_knee(rows), tmp_path / "sweep.png", "stub")
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def invoke(*args: str):
    from typer.testing import CliRunner

    from ferry.cli import app

    return CliRunner().invoke(app, ["bench", "serve", *args])


def test_cli_writes_json_and_markdown_with_one_row_per_level(stub, tmp_path):
    stub.first_delay_s, stub.token_delay_s = 0.01, 0.002
    out = invoke("--url", stub.url, "--concurrency", "1,3", "--requests", "6", "--prompt-tokens", "8-16",
                 "--output-tokens", "4", "--warmup", "1", "--out", str(tmp_path), "--tag", "stub")
    assert out.exit_code == 0, out.output
    [path] = tmp_path.glob("*_serve_load_stub.json")
    doc = json.loads(path.read_text())
    assert [r["load"] for r in doc["results"]] == ["concurrency 1", "concurrency 3"]
    assert all(r["completed"] == 6 and r["output_tokens"] == 24 for r in doc["results"])
    assert doc["model"] == MODEL and doc["git_commit"] and doc["command"] and "knee" in doc
    assert path.with_suffix(".md").read_text().count("| concurrency ") == 2
    assert "ttft_ms_p99" in out.stdout and len(stub.bodies) == 1 + 1 + 12  # check, warm-up, two levels


def test_cli_wrong_key_is_one_clear_error_before_the_run(stub, tmp_path):
    stub.api_key = "right"
    out = invoke("--url", stub.url, "--rate", "1", "--requests", "2", "--api-key", "wrong", "--out", str(tmp_path))
    assert out.exit_code == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("ferry: error: ") and "refused the API key (401: bad key)" in out.stderr
    assert not stub.bodies and not list(tmp_path.iterdir())


def test_cli_unknown_model_and_unreachable_url_are_clear_errors(stub, tmp_path):
    out = invoke("--url", stub.url, "--model", "nope", "--concurrency", "1", "--out", str(tmp_path))
    assert out.exit_code == 2 and f"model 'nope' is not served at {stub.url}; it serves: {MODEL}" in out.stderr
    from ferry.parallel.launch import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    out = invoke("--url", dead, "--concurrency", "1", "--out", str(tmp_path))
    assert out.exit_code == 2 and out.stderr.startswith(f"ferry: error: cannot reach {dead}")


def test_cli_refuses_rate_and_concurrency_together(tmp_path):
    out = invoke("--rate", "1", "--concurrency", "1", "--out", str(tmp_path))
    assert out.exit_code == 2 and "not both" in out.stderr
