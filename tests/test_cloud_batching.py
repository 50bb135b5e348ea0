"""The cloud's batched path: concurrent sessions share forwards over one paged KV pool and each still gets exactly
its own tokens; speculative rounds verify alongside plain steps; blocks come back on every way a session ends; a
session the pool cannot hold gets an ERROR frame while the others finish."""

from __future__ import annotations

import os
import threading

import grpc
import pytest
import torch

from ferry.edge.cloud_batcher import CloudBatching
from ferry.edge.edge import EdgeClient, LinkError
from ferry.edge.protocol import METHOD, Frame, Kind, model_fingerprint
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams

TOKEN = "batch-token-" + os.urandom(4).hex()
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
PROMPTS = ["What is the capital of France?", "Write a short poem about rivers.", "List three prime numbers.",
           "Why is the sky blue?"]
SPLIT = 10


@pytest.fixture(scope="module")
def prompt_ids(ferry_smollm) -> list[list[int]]:
    return [ferry_smollm.tokenizer.encode_chat(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(ferry_smollm, prompt_ids) -> list[list[int]]:
    """What `ferry generate` produces for each prompt alone (greedy)."""
    engine = Engine(ferry_smollm.model, ferry_smollm.tokenizer)
    return [engine.generate([ids], PARAMS)[0].token_ids for ids in prompt_ids]


def _edge(loaded, server, split: int = SPLIT, **kw) -> EdgeClient:
    return EdgeClient(loaded, [f"127.0.0.1:{server.port}"], split, TOKEN, timeout_s=kw.pop("timeout_s", 60), **kw)


def _concurrently(server, jobs: list, gate: bool = True) -> list:
    """Run each job(client) on its own edge client and thread; with `gate`, the cloud takes no step until every
    job's first frame is queued, so the first step holds all of them. Results (or exceptions) in job order."""
    results: list = [None] * len(jobs)

    def run(i: int, job, client: EdgeClient) -> None:
        try:
            results[i] = job(client)
        except Exception as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            results[i] = exc
        finally:
            client.close()

    clients = [job_client() for job_client, _ in jobs]
    threads = [threading.Thread(target=run, args=(i, job, c)) for i, ((_, job), c) in enumerate(zip(jobs, clients))]
    if gate:
        with server.batcher.pause():
            for t in threads:
                t.start()
            assert server.batcher.wait_queued(len(jobs), 60), "the sessions' first frames never queued up"
    else:
        for t in threads:
            t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a session hung"
    return results


def _no_blocks_held(server) -> None:
    assert server.wait_sessions_ended(30), "a session was never torn down"
    assert server.batcher.wait_idle(30), "a step never finished"
    assert server.kv_blocks_used() == 0
    server.batcher.blocks.check_no_leaks()


def test_concurrent_sessions_get_the_tokens_of_ferry_generate_from_fewer_forwards_than_frames(
        ferry_smollm, start_cloud, prompt_ids, reference):
    server = start_cloud(SPLIT, TOKEN)
    jobs = [(lambda: _edge(ferry_smollm, server), lambda c, ids=ids: c.generate(ids, PARAMS)[0].token_ids)
            for ids in prompt_ids]
    results = _concurrently(server, jobs)
    assert results == reference
    stats = server.stats
    assert stats.frames == len(PROMPTS) * PARAMS.max_tokens  # one prefill frame, then one frame per decode token
    assert stats.max_frames_per_step == len(PROMPTS)  # the gated first step ran all four prefills at once
    assert stats.steps < stats.frames
    _no_blocks_held(server)


def test_sessions_at_different_split_points_share_steps_each_running_its_own_layers(ferry_smollm, start_cloud,
                                                                                    prompt_ids, reference):
    server = start_cloud(SPLIT, TOKEN)  # serves K >= 10; the pool holds layers 10..29
    splits = [SPLIT, 20, 29]
    jobs = [(lambda k=k: _edge(ferry_smollm, server, k), lambda c, ids=ids: c.generate(ids, PARAMS)[0].token_ids)
            for k, ids in zip(splits, prompt_ids, strict=False)]
    assert _concurrently(server, jobs) == reference[: len(splits)]
    assert server.stats.max_frames_per_step == len(splits)
    _no_blocks_held(server)


def test_the_one_by_one_path_runs_a_forward_per_frame_and_gives_the_same_tokens(ferry_smollm, start_cloud,
                                                                               prompt_ids, reference):
    server = start_cloud(SPLIT, TOKEN, batching=None)
    assert server.batcher is None and "one session at a time" in server.path
    jobs = [(lambda: _edge(ferry_smollm, server), lambda c, ids=ids: c.generate(ids, PARAMS)[0].token_ids)
            for ids in prompt_ids[:2]]
    assert _concurrently(server, jobs, gate=False) == reference[:2]
    assert server.stats.steps == server.stats.frames == 2 * PARAMS.max_tokens


def test_seeded_sampling_sessions_sample_the_same_tokens_batched_as_one_by_one(ferry_smollm, start_cloud, prompt_ids):
    sampled = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True) for seed in (3, 4)]

    def tokens(server, gate: bool) -> list:
        jobs = [(lambda: _edge(ferry_smollm, server), lambda c, i=i: c.generate(prompt_ids[i], sampled[i])[0].token_ids)
                for i in range(2)]
        return _concurrently(server, jobs, gate)

    batched = tokens(start_cloud(SPLIT, TOKEN), gate=True)
    assert all(isinstance(t, list) for t in batched), batched
    assert batched == tokens(start_cloud(SPLIT, TOKEN, batching=None), gate=False)


@pytest.fixture(scope="module")
def int8_draft():
    from ferry.model.loader import load_model

    return load_model(None, torch.device("cpu"), torch.bfloat16, show_progress=False, weights="int8")


def test_speculative_sessions_verify_exactly_alongside_plain_ones(ferry_smollm, start_cloud, prompt_ids, reference,
                                                                int8_draft, monkeypatch):
    """Two sessions draft 1..4 tokens a round in turn (whatever the controller would pick), two take plain steps;
    all share the cloud's steps, and rejected drafts' blocks go back to the pool."""
    from ferry.edge.speculative import Drafter, GammaController

    gammas = iter(range(10_000))
    monkeypatch.setattr(GammaController, "choose", lambda self: 1 + next(gammas) % 4)
    server = start_cloud(SPLIT, TOKEN)

    def plain():
        return _edge(ferry_smollm, server)

    def drafting():
        return _edge(ferry_smollm, server, drafter=Drafter(int8_draft), gamma_max=4)

    def run(c, ids):
        completion, stats = c.generate(ids, PARAMS)
        return completion.token_ids, stats.draft_rounds

    jobs = [(drafting if i % 2 else plain, lambda c, ids=ids: run(c, ids)) for i, ids in enumerate(prompt_ids)]
    results = _concurrently(server, jobs)
    assert [r[0] for r in results if isinstance(r, tuple)] == reference, results
    assert [rounds > 0 for _, rounds in results] == [False, True, False, True]
    assert server.stats.max_frames_per_step == len(PROMPTS) and server.stats.steps < server.stats.frames
    _no_blocks_held(server)


class _RawSession:
    """A stream driven frame by frame (the way a misbehaving or vanishing edge would): send, read, cancel."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._out: list = []
        self._ready = threading.Condition()
        self.call = self.channel.stream_stream(METHOD)(self._frames(), metadata=[("authorization", f"Bearer {TOKEN}")],
                                                       timeout=60)

    def _frames(self):
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._out, 60):
                    return
                frame = self._out.pop(0)
            if frame is None:
                return
            yield frame

    def send(self, frame: Frame | None) -> None:
        with self._ready:
            self._out.append(frame.encode() if frame is not None else None)
            self._ready.notify_all()

    def receive(self) -> Frame:
        return Frame.decode(next(self.call))

    def cancel(self) -> None:
        self.call.cancel()
        self.channel.close()


def _open(server, config, prompt_tokens: int) -> tuple[_RawSession, Frame]:
    """A raw session with a request open and `prompt_tokens` positions prefilled (its KV in the pool)."""
    raw = _RawSession(server.port)
    raw.send(Frame(Kind.HELLO, meta={"model": model_fingerprint(config), "split": SPLIT, "codec": "fp32"}))
    welcome = raw.receive()
    assert welcome.kind == Kind.WELCOME
    raw.send(Frame(Kind.REQUEST, welcome.session, 1, meta={"sampling": {"temperature": 0}}))
    hidden = torch.randn(prompt_tokens, config.hidden_size, generator=torch.Generator().manual_seed(0))
    raw.send(Frame.hidden(welcome.session, 1, 0, prompt_tokens, hidden.numpy().tobytes()))
    return raw, welcome


def test_a_session_that_disconnects_gives_its_blocks_back_even_with_a_frame_in_the_step(ferry_smollm, start_cloud):
    server = start_cloud(SPLIT, TOKEN)
    config = ferry_smollm.config
    raw, _ = _open(server, config, 40)
    assert raw.receive().kind == Kind.TOKEN
    assert server.kv_blocks_used() == 3  # 40 positions in blocks of 16, held while the request is open
    raw.cancel()
    _no_blocks_held(server)

    # Gone while its next frame waits for a step: the step still runs it, then the blocks come back.
    with server.batcher.pause():
        raw, _ = _open(server, config, 20)
        assert server.batcher.wait_queued(1, 30)
        raw.cancel()
    _no_blocks_held(server)


def test_a_new_request_with_or_without_end_gives_the_old_requests_blocks_back(ferry_smollm, start_cloud):
    server = start_cloud(SPLIT, TOKEN)
    config = ferry_smollm.config
    raw, welcome = _open(server, config, 40)
    assert raw.receive().kind == Kind.TOKEN and server.kv_blocks_used() == 3
    one = torch.zeros(1, config.hidden_size).numpy().tobytes()
    for request, end_first in ((2, True), (3, False)):
        if end_first:
            raw.send(Frame(Kind.END, welcome.session, request - 1))
        raw.send(Frame(Kind.REQUEST, welcome.session, request, meta={"sampling": {"temperature": 0}}))
        raw.send(Frame.hidden(welcome.session, request, 0, 1, one))  # starts at position 0 again
        assert raw.receive().kind == Kind.TOKEN
        assert server.kv_blocks_used() == 1  # the new request's one position; the old 40 are gone
    raw.cancel()
    _no_blocks_held(server)


def test_a_session_the_pool_cannot_hold_gets_an_error_frame_while_the_others_finish(ferry_smollm, start_cloud,
                                                                                   prompt_ids, reference):
    usable = 5  # 80 positions
    server = start_cloud(SPLIT, TOKEN, batching=CloudBatching(num_blocks=usable + 1))
    holder, _ = _open(server, ferry_smollm.config, 40)  # 3 blocks, held until it ends
    assert holder.receive().kind == Kind.TOKEN
    needs = len(prompt_ids[0]) + PARAMS.max_tokens
    assert 2 * 16 < needs <= usable * 16  # fits the pool, not the 2 blocks left
    refused = _edge(ferry_smollm, server, reconnects=0)
    with pytest.raises(LinkError, match=r"cloud refused: the cloud's KV pool is full: .* 2 of 5 are free"):
        refused.generate(prompt_ids[0], PARAMS)
    refused.close()
    assert server.kv_blocks_used() == 3  # the refused session took nothing; the holder kept what it had
    holder.cancel()
    assert server.wait_sessions_ended(30)
    admitted = _edge(ferry_smollm, server)
    try:
        assert admitted.generate(prompt_ids[0], PARAMS)[0].token_ids == reference[0]
    finally:
        admitted.close()
    _no_blocks_held(server)


def test_a_step_waits_only_for_sessions_with_an_open_request(ferry_smollm, start_cloud, prompt_ids, reference):
    """A 10-minute window would time the edge out (20 s) if a step waited for anyone but the sessions in a request:
    here the lone session's frames run at once, with an idle session (no request) connected beside it."""
    server = start_cloud(SPLIT, TOKEN, batching=CloudBatching(window_ms=600_000))
    idle = _RawSession(server.port)
    idle.send(Frame(Kind.HELLO, meta={"model": model_fingerprint(ferry_smollm.config), "split": SPLIT, "codec": "fp32"}))
    assert idle.receive().kind == Kind.WELCOME
    client = _edge(ferry_smollm, server, timeout_s=20, reconnects=0)
    try:
        assert client.generate(prompt_ids[1], PARAMS)[0].token_ids == reference[1]
    finally:
        client.close()
        idle.cancel()
    _no_blocks_held(server)


def test_a_frame_whose_step_outlasts_the_step_timeout_gets_an_error_and_its_blocks_come_back_after_the_step(
        ferry_smollm, start_cloud, monkeypatch):
    server = start_cloud(SPLIT, TOKEN, step_timeout_s=2.0)
    entered, release = threading.Event(), threading.Event()
    forward = server.batcher._forward

    def stuck_forward(split, group):  # a step that takes longer than the session waits
        entered.set()
        release.wait(60)
        return forward(split, group)

    monkeypatch.setattr(server.batcher, "_forward", stuck_forward)
    raw, _ = _open(server, ferry_smollm.config, 40)
    try:
        reply = raw.receive()
        assert reply.kind == Kind.ERROR and "did not finish within 2 s" in reply.meta["error"]
        assert entered.is_set()  # the session was closed while its frame was in the running step ...
        assert server.kv_blocks_used() == 3  # ... whose writes land in its blocks: they stay until the step ends
    finally:
        release.set()
        raw.cancel()
    _no_blocks_held(server)
