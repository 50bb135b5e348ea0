"""`ferry serve` end to end: the official OpenAI client against a server on 127.0.0.1 with the default model.

One server answers most tests (its start, a model load in a spawned engine process, is the slow part); a second,
with tight limits, covers the queue bound, the request timeout and SIGTERM under load.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import pytest
from serve_process import ServeProcess, check_ranks_stay_in_step

openai = pytest.importorskip("openai", reason="the serve tests drive the server with the official OpenAI client")

pytestmark = pytest.mark.slow
KEY = "test-key-123"
PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "1, 2, 3, 4,", "def fibonacci(n):",
           "The quick brown fox"]


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess("--served-model-name", "smollm", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _answers(loaded):
    """Greedy answers of Ferry's engine run in this process: what a server on the same model must reproduce token
    for token."""
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams

    engine = Engine(loaded.model, loaded.tokenizer, kv_memory="0.25GiB")
    tok = loaded.tokenizer

    def answer(prompt: str, max_tokens: int, chat: bool = False, stop: tuple[str, ...] = ()) -> tuple[str, int]:
        ids = tok.encode_chat(prompt) if chat else tok.encode(prompt)
        [c] = engine.generate([ids], SamplingParams(max_tokens=max_tokens, stop=stop))
        return c.text, len(c.token_ids)

    return answer


@pytest.fixture(scope="module")
def reference():
    """On the model as a one-rank server loads it (the CPU default's precision, loader.resolve_precision)."""
    import torch

    from ferry.model.loader import load_model, resolve_precision

    cpu = torch.device("cpu")
    dtype, weights = resolve_precision(None, "auto", None, cpu)
    return _answers(load_model(None, cpu, dtype, show_progress=False, weights=weights))


@pytest.fixture(scope="module")
def exact_reference(ferry_smollm):
    """On the fp32 model, exact: what CPU tensor-parallel ranks run."""
    return _answers(ferry_smollm)


def test_completion_equals_ferry_generate_for_the_same_greedy_request(client, reference):
    out = client.completions.create(model="smollm", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    text, tokens = reference(PROMPTS[0], 16)
    assert out.choices[0].text == text
    assert out.usage.completion_tokens == tokens and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason in ("length", "stop")


def test_prompt_as_token_ids_and_a_batch_of_prompts(client, reference, ferry_smollm):
    ids = ferry_smollm.tokenizer.encode(PROMPTS[1])
    out = client.completions.create(model="smollm", prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == reference(PROMPTS[1], 8)[0]
    batch = client.completions.create(model="smollm", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [reference(p, 6)[0] for p in PROMPTS[:3]]


def test_chat_completion_streamed_and_whole_agree_with_the_chat_template(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == reference(messages[0]["content"], 12, chat=True)[0]
    chunks = list(client.chat.completions.create(model="smollm", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_stop_string_ends_the_text_before_it(client, reference):
    out = client.completions.create(model="smollm", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == reference("1, 2, 3, 4,", 30, stop=(" 7",))[0]
    assert " 7" not in out.choices[0].text and out.choices[0].text.strip()


def test_same_seed_same_text_and_another_seed_another_text(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="smollm", prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                         top_p=0.95, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text  # no early-EOS ties

    # The first request computes the whole prompt; every later one copies its cached K/V and computes the last
    # token alone, which rounds differently in the last bits (other kernels' blocking), enough to move a sampled
    # token at a near-tie. The seed's promise is for one compute path: the cached one, from the second request on.
    sample(7)
    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9))


def test_fifty_concurrent_streaming_clients_all_get_complete_correct_answers(server, reference):
    expected = {p: reference(p, 10)[0] for p in PROMPTS}

    async def one(aclient, prompt: str) -> tuple[str, str, bool]:
        stream = await aclient.completions.create(model="smollm", prompt=prompt, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            usage = chunk.usage or usage
        return prompt, "".join(parts), usage is not None and usage.completion_tokens == 10

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as ac:
            return await asyncio.gather(*(one(ac, PROMPTS[i % len(PROMPTS)]) for i in range(50)))

    results = asyncio.run(run())
    assert len(results) == 50
    for prompt, text, usage_ok in results:
        assert text == expected[prompt]
        assert usage_ok
    assert server.metric("ferry_kv_blocks_used") == 0


@pytest.mark.parametrize("case", ["malformed_json", "unknown_model", "prompt_over_context", "negative_max_tokens",
                                  "wrong_key", "no_key", "unsupported_n", "unknown_route", "token_out_of_vocab"])
def test_bad_requests_get_the_right_status_and_an_openai_error_body(server, case):
    long_prompt = list(range(100, 100 + 8200))
    calls = {
        "malformed_json": (400, dict(body=b'{"prompt": "hi", "max_tokens": ')),
        "unknown_model": (404, dict(body={"model": "gpt-5", "prompt": "hi"})),
        "prompt_over_context": (413, dict(body={"prompt": long_prompt, "max_tokens": 4})),
        "negative_max_tokens": (422, dict(body={"prompt": "hi", "max_tokens": -3})),
        "wrong_key": (401, dict(body={"prompt": "hi"}, key="not-the-key")),
        "no_key": (401, dict(body={"prompt": "hi"}, key=None)),
        "unsupported_n": (400, dict(body={"prompt": "hi", "n": 3})),
        "unknown_route": (404, dict(path="/v1/embeddings", body={"input": "hi"})),
        "token_out_of_vocab": (400, dict(body={"prompt": [1, 2, 10**7]})),
    }
    want, call = calls[case]
    status, _, body = server.request("POST", call.get("path", "/v1/completions"), call["body"],
                                     key=call.get("key", "default"))
    assert status == want, body
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if case == "negative_max_tokens":
        assert body["error"]["param"] == "max_tokens"
    if case == "unknown_model":
        assert body["error"]["code"] == "model_not_found"


def test_a_client_killed_mid_stream_frees_its_blocks(server):
    aborted_before = _metric_or_zero(server, 'ferry_requests_total{endpoint="completions",outcome="aborted"}')
    body = json.dumps({"prompt": "Tell me a long story about a dragon.", "max_tokens": 400, "stream": True,
                       # the stream must outlive the client: a sampled EOS as the first token ended it early in CI
                       "temperature": 0, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 3:  # a few tokens in: the request holds blocks now
            data = sock.recv(65536)
            assert data, f"the server closed the stream early: {received!r}"
            received += data
        server.wait_for(lambda: server.metric("ferry_kv_blocks_used") > 0, what="blocks in use")
    # The socket is closed: the next token's write fails, the request is aborted and its blocks freed.
    server.wait_for(lambda: server.metric("ferry_kv_blocks_used") == 0 and server.metric("ferry_requests_running") == 0,
                    what="the aborted request's blocks to be freed")
    server.wait_for(lambda: _metric_or_zero(server, 'ferry_requests_total{endpoint="completions",outcome="aborted"}')
                    == aborted_before + 1, what="the abort to be counted")


def test_models_health_and_metrics(server, client):
    client.completions.create(model="smollm", prompt="Hi", max_tokens=2)
    assert [m.id for m in client.models.list().data] == ["smollm"]
    assert server.request("GET", "/health")[0] == 200
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("ferry_requests_waiting", "ferry_kv_blocks_total", "ferry_time_to_first_token_seconds_bucket",
                 "ferry_time_per_output_token_seconds_bucket", "ferry_e2e_request_latency_seconds_bucket",
                 'ferry_link_bytes_total{link="pcie_h2d"}', "ferry_generation_tokens_total"):
        assert name in body["text"], name
    assert server.metric('ferry_link_bytes_total{link="pcie_h2d"}') > 0  # every step uploads its inputs
    assert server.metric('ferry_link_seconds_total{link="pcie_h2d"}') > 0  # ... and those copies took time
    assert server.metric('ferry_link_seconds_total{link="pcie_d2h"}') > 0
    assert 'ferry_link_seconds_total{link="allreduce"}' not in body["text"]  # one rank: no such link, no zero


def _metric_or_zero(server, name: str) -> float:
    try:
        return server.metric(name)
    except KeyError:
        return 0.0


def test_a_tp2_server_keeps_its_ranks_in_step_across_joining_and_aborted_requests(exact_reference):
    """--tp 2 on CPU (gloo): requests that join at different steps, an abort and unseeded sampling all go through
    the ranks' step-boundary agreement; greedy answers still equal one rank's."""
    server = ServeProcess("--tp", "2", "--device", "cpu", "--served-model-name", "smollm")
    try:
        check_ranks_stay_in_step(server, PROMPTS, {i: exact_reference(PROMPTS[i], 8)[0] for i in range(4)})
        for link in ("allreduce", "allgather"):  # gloo: the calls' wall time, so more than nothing
            assert server.metric(f'ferry_link_seconds_total{{link="{link}"}}') > 0, link
    finally:
        assert server.stop() == 0


# -- a second server with tight limits --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_server():
    proc = ServeProcess("--served-model-name", "smollm", "--max-waiting", "2", "--request-timeout-s", "6", "--drain-timeout-s", "3")
    yield proc
    proc.stop()


def test_a_full_queue_answers_429_with_retry_after(tight_server):
    results = []

    def call():
        results.append(tight_server.request("POST", "/v1/completions", {"prompt": "Count:", "max_tokens": 4}))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(s for s, _, _ in results)
    assert 429 in statuses and 200 in statuses, str(statuses)
    for status, headers, body in results:
        if status == 429:
            retry_after = {k.lower(): v for k, v in headers.items()}["retry-after"]
            assert retry_after == "1" and body["error"]["type"] == "rate_limit_error"
    tight_server.wait_for(lambda: tight_server.metric("ferry_kv_blocks_used") == 0, what="blocks freed")


def test_a_request_past_its_time_limit_gets_504_and_is_ended(tight_server):
    started = time.monotonic()
    status, _, body = tight_server.request("POST", "/v1/completions",
                                           {"prompt": "Tell a story:", "max_tokens": 4000, "ignore_eos": True})
    assert status == 504 and body["error"]["code"] == "timeout"
    assert time.monotonic() - started < 30
    tight_server.wait_for(lambda: tight_server.metric("ferry_requests_running") == 0, what="the request to end")


def test_sigterm_during_load_finishes_or_cleanly_ends_requests_and_exits_0(tight_server):
    outcomes = []

    def stream(max_tokens: int):
        c = openai.OpenAI(base_url=tight_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            parts = [ch.choices[0].text for ch in c.completions.create(
                model="smollm", prompt="Write about rivers:", max_tokens=max_tokens, stream=True,
                extra_body={"ignore_eos": True}) if ch.choices]
            outcomes.append(("done", len(parts)))
        except openai.APIError as exc:  # an error event in the stream, or a 503 during the drain
            outcomes.append(("error", str(exc)))

    threads = [threading.Thread(target=stream, args=(n,)) for n in (3, 3, 2000)]
    for t in threads:
        t.start()
    tight_server.wait_for(lambda: tight_server.metric("ferry_requests_running") >= 1, what="requests running")
    signalled = time.monotonic()
    tight_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert tight_server.proc.wait(30) == 0
    assert time.monotonic() - signalled < 3 + 5  # the drain limit, then a prompt exit (engine ranks included)
    assert len(outcomes) == 3
    assert sum(1 for kind, _ in outcomes if kind == "done") >= 1  # the short ones finish within the drain
    long_outcome = [o for o in outcomes if o[0] == "error" or o[1] > 3]
    assert long_outcome and long_outcome[0][0] == "error"  # the long one is ended with an error, not cut silently
