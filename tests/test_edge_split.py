"""Split inference on loopback: exact tokens for several split points, isolation between sessions, auth,
hostile frames, and what the edge does when the cloud dies (error, reconnect + replay, local fallback)."""

from __future__ import annotations

import os
import random
import re
import struct
import threading

import grpc
import pytest

from ferry.edge.cloud import CloudServer
from ferry.edge.edge import EdgeClient, LinkError
from ferry.edge.linkem import LinkEmulator, LinkProfile
from ferry.edge.protocol import METHOD, Frame, Kind, model_fingerprint
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams

TOKEN = "test-token-" + os.urandom(4).hex()
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
PROMPTS = ["What is the capital of France?", "Write a short poem about rivers.", "List three prime numbers."]


@pytest.fixture(scope="module")
def prompt_ids(ferry_smollm) -> list[list[int]]:
    return [ferry_smollm.tokenizer.encode_chat(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(ferry_smollm, prompt_ids) -> list[list[int]]:
    """What `ferry generate` produces for the same prompts (one by one, greedy)."""
    engine = Engine(ferry_smollm.model, ferry_smollm.tokenizer)
    return [engine.generate([ids], GREEDY)[0].token_ids for ids in prompt_ids]


@pytest.fixture
def cloud_factory(start_cloud):
    return lambda split, **limits: start_cloud(split, TOKEN, **limits)


def _edge(loaded, server_or_targets, split, **kw) -> EdgeClient:
    targets = server_or_targets if isinstance(server_or_targets, list) else [f"127.0.0.1:{server_or_targets.port}"]
    return EdgeClient(loaded, targets, split, kw.pop("token", TOKEN), timeout_s=kw.pop("timeout_s", 20), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 15, 29])
def test_fp32_split_gives_exactly_the_tokens_of_local_generation(ferry_smollm, cloud_factory, prompt_ids, reference, split):
    client = _edge(ferry_smollm, cloud_factory(split), split, codec="fp32")
    try:
        got = [client.generate(ids, GREEDY)[0].token_ids for ids in prompt_ids]
    finally:
        client.close()
    assert got == reference


def test_two_edges_at_once_do_not_disturb_each_other(ferry_smollm, cloud_factory, prompt_ids, reference):
    server = cloud_factory(10)
    results: dict[int, list[int]] = {}
    errors = []

    def run(i: int) -> None:
        client = _edge(ferry_smollm, server, 10)
        try:
            results[i] = client.generate(prompt_ids[i], GREEDY)[0].token_ids
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == {0: reference[0], 1: reference[1]}


def test_int8_codec_keeps_greedy_tokens_and_reports_link_figures(ferry_smollm, cloud_factory, prompt_ids, reference):
    client = _edge(ferry_smollm, cloud_factory(15), 15, codec="int8")
    try:
        completion, stats = client.generate(prompt_ids[0], GREEDY)
    finally:
        client.close()
    assert completion.token_ids == reference[0]
    figures = stats.as_dict(len(completion.token_ids))
    assert figures["round_trips"] == GREEDY.max_tokens
    assert 0 < figures["bytes_sent_per_token"] and 0 <= figures["link_time_share"] <= 1


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_cloud_refuses_a_missing_or_wrong_token(ferry_smollm, cloud_factory, prompt_ids, token):
    server = cloud_factory(5)
    client = _edge(ferry_smollm, server, 5, token=token or "")
    with pytest.raises(LinkError, match="UNAUTHENTICATED"):
        client.generate(prompt_ids[0], GREEDY)
    client.close()


def _raw_session(port: int, frames: list[bytes], token: str = TOKEN) -> list[bytes]:
    """Send raw byte frames on one stream; return what came back (stops at the stream's end)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD)(iter(frames), metadata=[("authorization", f"Bearer {token}")], timeout=10)
        try:
            return list(call)
        except grpc.RpcError as exc:
            return [exc.code()]


def _hostile_cases(config, rng: random.Random) -> list[tuple[str, list[bytes], object]]:
    """(what, frames, expected): expected is the grpc.StatusCode the transport answers with, a regex the ERROR
    frame's message must match (after a WELCOME where the frames open with HELLO), or VERDICT for a
    well-formed round the cloud must answer normally."""
    hello = Frame(Kind.HELLO, meta={"model": model_fingerprint(config), "split": 8, "codec": "fp32"}).encode()

    def request(sampling) -> bytes:
        return Frame(Kind.REQUEST, 1, 1, meta={"sampling": sampling}).encode()

    greedy = request({"temperature": 0})
    row = 4 * config.hidden_size  # one fp32 hidden state

    def verify(start: int, tokens: int, draft: list[int], payload_rows: int | None = None) -> bytes:
        rows = tokens if payload_rows is None else payload_rows
        return Frame.verify(1, 1, start, tokens, draft, b"\x00" * (row * rows)).encode()

    def raw_verify(body: bytes) -> bytes:
        return Frame(Kind.VERIFY, 1, 1, body=body).encode()

    cases = [
        ("garbage", [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))], r"header|magic"),
        ("truncated HELLO", [hello[: rng.randrange(1, len(hello))]], r"shorter than|do not match"),
        ("oversized frame", [b"\x00" * (64 * 1024 + 1)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("HIDDEN before REQUEST", [hello, Frame.hidden(1, 1, 0, 2, b"\x00" * 10).encode()], r"open request is None"),
        ("HIDDEN before HELLO", [Frame.hidden(0, 0, 0, 1, b"").encode()], r"must start with HELLO"),
        ("top_p out of range", [hello, request({"top_p": 7})], r"bad sampling parameters: top_p"),
        ("seed that is a string", [hello, request({"temperature": 1, "seed": "x"})], r"seed must be an integer"),
        ("seed past 64 bits", [hello, request({"temperature": 1, "seed": 2**70})], r"seed .* is outside"),
        ("sampling that is a list", [hello, request([1, 2])], r"expected a JSON object"),
        ("VERIFY with no drafts", [hello, greedy, verify(0, 2, [], payload_rows=0)], r"VERIFY frame with 0 drafts"),
        ("VERIFY drafting every token", [hello, greedy, verify(0, 2, [5, 6], payload_rows=0)], r"VERIFY frame with 2 drafts"),
        ("VERIFY with too many drafts", [hello, greedy, verify(0, 80, list(range(70)), payload_rows=0)], r"VERIFY frame with 70"),
        ("VERIFY cut inside its draft list", [hello, greedy, raw_verify(struct.pack("<III", 0, 3, 2) + b"\x01")],
         r"VERIFY frame with 2 drafts"),
        ("VERIFY with no draft count", [hello, greedy, raw_verify(struct.pack("<II", 0, 3))], r"VERIFY frame too short"),
        ("VERIFY payload of the wrong size", [hello, greedy, verify(0, 3, [5], payload_rows=2)], r"fp32: payload"),
        ("VERIFY out of order", [hello, greedy, verify(4, 3, [5])], r"expected to start at 0"),
        ("VERIFY while sampling", [hello, request({"temperature": 0.7, "seed": 1}), verify(0, 3, [5])], r"greedy"),
        ("VERDICT sent to the cloud", [hello, greedy, Frame.verdict(1, 1, 0, 5, 0.0).encode()],
         r"unexpected VERDICT"),
        ("TOKEN sent to the cloud", [hello, greedy, Frame.token(1, 1, 5, 0, 0.0).encode()], r"unexpected TOKEN"),
        ("VERIFY drafting impossible token ids", [hello, greedy, verify(0, 3, [-1, 10**9])], Kind.VERDICT),
    ]
    return cases


@pytest.mark.slow
def test_every_hostile_frame_gets_an_error_frame_or_a_named_transport_status(ferry_smollm, cloud_factory, prompt_ids,
                                                                            reference):
    server = cloud_factory(8, max_frame_bytes=64 * 1024)
    rng = random.Random(7)
    for _ in range(12):  # the random cases (garbage, truncation points) differ each time round
        for what, frames, expected in _hostile_cases(ferry_smollm.config, rng):
            replies = _raw_session(server.port, frames)
            if isinstance(expected, grpc.StatusCode):
                assert replies == [expected], what
                continue
            assert all(isinstance(r, bytes) for r in replies), (what, replies)  # e.g. UNKNOWN: an unhandled error
            decoded = [Frame.decode(r) for r in replies]
            opened = 1 if len(frames) > 1 else 0  # the multi-frame cases open with a valid HELLO
            assert [f.kind for f in decoded[:opened]] == [Kind.WELCOME] * opened, what
            assert len(decoded) == opened + 1, (what, [f.kind for f in decoded])
            last = decoded[-1]
            if expected is Kind.VERDICT:
                assert last.kind == Kind.VERDICT and last.verdict_fields()[0] == 0, what
            else:
                assert last.kind == Kind.ERROR and re.search(expected, last.meta["error"]), (what, last.meta)
    client = _edge(ferry_smollm, server, 8)
    try:
        assert client.generate(prompt_ids[0], GREEDY)[0].token_ids == reference[0]
    finally:
        client.close()


def test_a_session_past_its_token_limit_is_closed_with_that_limit_named(ferry_smollm, cloud_factory, prompt_ids):
    server = cloud_factory(4, max_tokens_per_session=len(prompt_ids[0]) + 4)
    client = _edge(ferry_smollm, server, 4, reconnects=0)
    with pytest.raises(LinkError, match="within the session limit of"):
        client.generate(prompt_ids[0], GREEDY)
    client.close()


def _held_session(port: int, frames: list[bytes], release: threading.Event):
    """A stream that sends `frames` and then stays open, silent, until `release` (at most 30 s)."""

    def outgoing():
        yield from frames
        release.wait(30)

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_stream(METHOD)(outgoing(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    return channel, call


def test_a_session_past_max_sessions_is_refused_by_name_and_admitted_once_one_ends(ferry_smollm, cloud_factory,
                                                                                  prompt_ids, reference):
    server = cloud_factory(4, max_sessions=1)
    hello = Frame(Kind.HELLO, meta={"model": model_fingerprint(ferry_smollm.config), "split": 4, "codec": "fp32"})
    release = threading.Event()
    channel, call = _held_session(server.port, [hello.encode()], release)
    try:
        assert Frame.decode(next(call)).kind == Kind.WELCOME  # the one allowed session is open
        refused = _edge(ferry_smollm, server, 4, reconnects=0)
        with pytest.raises(LinkError, match=r"RESOURCE_EXHAUSTED: the cloud is at its limit of 1 concurrent sessions"):
            refused.generate(prompt_ids[0], GREEDY)
        refused.close()
    finally:
        release.set()
    assert list(call) == []  # the held session ends normally once its edge closes its side
    channel.close()
    admitted = _edge(ferry_smollm, server, 4)
    try:
        short = SamplingParams(max_tokens=4, ignore_eos=True)
        assert admitted.generate(prompt_ids[0], short)[0].token_ids == reference[0][:4]
    finally:
        admitted.close()


def test_an_idle_session_gets_an_error_frame_naming_the_idle_limit(ferry_smollm, cloud_factory):
    server = cloud_factory(4, idle_timeout_s=0.5)
    hello = Frame(Kind.HELLO, meta={"model": model_fingerprint(ferry_smollm.config), "split": 4, "codec": "fp32"})
    release = threading.Event()
    channel, call = _held_session(server.port, [hello.encode()], release)
    try:
        replies = [Frame.decode(raw) for raw in call]  # ends when the cloud closes the stream
    finally:
        release.set()
        channel.close()
    assert [f.kind for f in replies] == [Kind.WELCOME, Kind.ERROR]
    assert re.search(r"session idle for 0.5 s \(the cloud's --idle-timeout\)", replies[1].meta["error"])


def _stop_after(server: CloudServer, n: int):
    seen = []

    def on_token(token, text):
        seen.append(token)
        if len(seen) == n:
            server.stop(0)

    return on_token


def test_edge_exits_with_a_clear_error_when_the_cloud_dies(ferry_smollm, cloud_factory, prompt_ids):
    server = cloud_factory(12)
    client = _edge(ferry_smollm, server, 12, reconnects=0, timeout_s=5)
    with pytest.raises(LinkError, match="gave up"):
        client.generate(prompt_ids[0], GREEDY, on_token=_stop_after(server, 5))
    client.close()


def test_local_fallback_finishes_the_answer_exactly(ferry_smollm, cloud_factory, prompt_ids, reference):
    server = cloud_factory(12)
    client = _edge(ferry_smollm, server, 12, reconnects=0, timeout_s=5, fallback="local")
    completion, stats = client.generate(prompt_ids[1], GREEDY, on_token=_stop_after(server, 5))
    client.close()
    assert completion.token_ids == reference[1]
    assert stats.fallback_tokens == GREEDY.max_tokens - 5


def test_reconnect_replays_history_to_another_cloud(ferry_smollm, cloud_factory, prompt_ids, reference):
    first, second = cloud_factory(12), cloud_factory(12)
    targets = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
    client = _edge(ferry_smollm, targets, 12, reconnects=2, timeout_s=5)
    completion, stats = client.generate(prompt_ids[2], GREEDY, on_token=_stop_after(first, 7))
    client.close()
    assert completion.token_ids == reference[2]
    assert stats.reconnects >= 1


def test_split_through_the_link_emulator_is_exact_and_pays_the_rtt(ferry_smollm, cloud_factory, prompt_ids, reference):
    server = cloud_factory(20)
    emulator = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", server.port), LinkProfile(rtt_s=0.02, rate_bps=50e6))
    port = emulator.start_in_thread()
    client = _edge(ferry_smollm, [f"127.0.0.1:{port}"], 20, codec="int8+zstd")
    try:
        completion, stats = client.generate(prompt_ids[0], SamplingParams(max_tokens=8, ignore_eos=True))
    finally:
        client.close()
        emulator.stop()
    assert completion.token_ids == reference[0][:8]
    assert stats.wait_s >= 8 * 0.02  # every round trip crossed the emulated 20 ms RTT


@pytest.fixture(scope="module")
def int8_draft():
    import torch

    from ferry.model.loader import load_model

    return load_model(None, torch.device("cpu"), torch.bfloat16, show_progress=False, weights="int8")


@pytest.mark.slow
def test_speculative_rounds_give_exactly_the_tokens_of_plain_split(ferry_smollm, cloud_factory, prompt_ids, reference,
                                                                  int8_draft, monkeypatch):
    """Every step a round of 1..6 drafts in turn: whatever gamma the controller would pick (its choice rests on
    timings, which a shared CPU makes noisy; its decisions are tested on their own), rounds are exact."""
    from ferry.edge.speculative import Drafter, GammaController

    gammas = iter(range(10_000))
    monkeypatch.setattr(GammaController, "choose", lambda self: 1 + next(gammas) % 6)

    server = cloud_factory(15)
    client = _edge(ferry_smollm, server, 15, codec="int8", drafter=Drafter(int8_draft), gamma_max=6)
    try:
        results = [client.generate(ids, GREEDY) for ids in prompt_ids]
    finally:
        client.close()
    assert [c.token_ids for c, _ in results] == reference
    for _, stats in results:
        assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
        assert stats.round_trips < GREEDY.max_tokens  # rounds carried more than one token each


def test_speculative_rounds_refuse_sampling(ferry_smollm, cloud_factory, prompt_ids, int8_draft):
    from ferry.edge.speculative import Drafter
    from ferry.errors import FerryError

    client = _edge(ferry_smollm, cloud_factory(15), 15, drafter=Drafter(int8_draft))
    with pytest.raises(FerryError, match="greedy"):
        client.generate(prompt_ids[0], SamplingParams(max_tokens=4, temperature=0.8, seed=1))
    client.close()


def _settled(overhead_s: float, accepted: int, gamma: int = 4, draft_s: float = 0.04, rounds: int = 30):
    """A controller after `rounds` identical rounds (the smoothed estimates have converged on them)."""
    from ferry.edge.speculative import GammaController

    controller = GammaController(gamma_max=12)
    controller.plain_step(overhead_s)  # a plain step costs what a round costs before its drafts
    for _ in range(rounds):
        controller.update(gamma=gamma, accepted=accepted, overhead_s=overhead_s, draft_s=draft_s)
    return controller


def test_gamma_grows_with_acceptance():
    sure, unsure = _settled(0.1, accepted=4), _settled(0.1, accepted=1)
    assert sure.choose() > unsure.choose() >= 1


def test_gamma_grows_with_the_round_trip_and_drafting_stops_where_the_link_is_too_fast_to_pay():
    # acceptance 3/4 per token, 10 ms per draft step; round overhead (RTT + verify) from 2 ms to 2 s
    choices = [_settled(overhead, accepted=3).choose() for overhead in (0.002, 0.02, 0.2, 2.0)]
    assert all(a < b for a, b in zip(choices, choices[1:])), choices
    assert choices[0] == 0  # at 2 ms a round cannot win back its 10 ms draft step: plain steps
    assert choices[-1] == 12  # at 2 s every extra draft is nearly free


def test_the_first_step_is_plain_the_first_round_short_and_a_slow_draft_is_paused_after_it():
    from ferry.edge.speculative import GammaController

    controller = GammaController(gamma_max=12)
    assert controller.choose() == 0
    controller.plain_step(0.02)
    assert controller.choose() == 2  # no round measured yet: a short one finds out what rounds cost
    # both drafts accepted, but each draft step took 100 ms against a 20 ms plain step: plain steps are faster
    controller.update(gamma=2, accepted=2, overhead_s=0.02, draft_s=0.2)
    assert controller.choose() == 0 and controller.paused


def test_verify_positions_that_cost_as_much_as_a_plain_step_make_drafting_not_pay():
    from ferry.edge.speculative import GammaController

    controller = GammaController(gamma_max=12)
    controller.plain_step(0.1)
    # every draft accepted and drafting is nearly free, but the round took 0.1 s more per drafted position
    controller.update(gamma=2, accepted=2, overhead_s=0.3, draft_s=0.002)
    assert controller.per_draft_s == pytest.approx(0.1)
    assert controller.choose() == 0  # a round of g drafts costs (1 + g) plain steps for at most 1 + g tokens


def test_drafting_pauses_when_its_expected_gain_is_below_one_and_probes_again_later():
    from ferry.edge.speculative import GammaController

    controller = GammaController(gamma_max=8, pause=4, max_pause=16)
    assert controller.choose() == 0  # the first decode step is plain: it measures what drafting has to beat
    controller.plain_step(0.02)
    rounds = 0
    while controller.choose() > 0:  # a draft that is never accepted, at a round overhead of 20 ms
        controller.update(gamma=controller.choose(), accepted=0, overhead_s=0.02, draft_s=0.01)
        rounds += 1
        assert rounds < 10, "drafting never paused"
    assert controller.gain(controller.best_gamma()) < 1
    pauses = []
    for _ in range(3):  # each losing probe doubles the pause: 4, 8, 16
        plain = 0
        while controller.choose() == 0:
            controller.plain_step(0.02)
            plain += 1
        pauses.append(plain)
        controller.update(gamma=controller.choose(), accepted=0, overhead_s=0.02, draft_s=0.01)  # the probe
    assert pauses == [4, 8, 16]
    for _ in range(16):
        controller.plain_step(0.02)
    for _ in range(100):  # the text turned predictable: probes win, and drafting resumes for good
        gamma = controller.choose()
        if gamma == 0:
            controller.plain_step(0.02)
            continue
        controller.update(gamma=gamma, accepted=gamma, overhead_s=0.02, draft_s=0.001 * gamma)
    assert controller.choose() > 1 and not controller.paused
    assert controller.acceptance > 0.99


@pytest.mark.slow
def test_an_always_wrong_draft_is_switched_off_and_split_stays_exact(ferry_smollm, cloud_factory, prompt_ids, reference,
                                                                     int8_draft):
    from ferry.bench.poor_draft import WrongDrafter

    server = cloud_factory(15)
    client = _edge(ferry_smollm, server, 15, codec="int8", drafter=WrongDrafter(int8_draft), gamma_max=6)
    try:
        completion, stats = client.generate(prompt_ids[1], GREEDY)
    finally:
        client.close()
    assert completion.token_ids == reference[1]
    assert stats.accepted <= 1 and stats.draft_rounds >= 1
    # drafting paused after a few losing rounds; the rest are plain steps with a probe round now and then
    assert stats.undrafted_steps >= GREEDY.max_tokens // 2, stats
    assert stats.draft_rounds + stats.undrafted_steps + 1 == stats.round_trips  # + 1: the prefill step


def test_session_caches_grow_only_when_full_to_twice_the_need_keeping_their_contents():
    import torch

    from ferry.engine.kv_cache import KVCache

    cache = KVCache(1, 1, 2, torch.float32, torch.device("cpu"))
    assert cache.grow_for(10) and cache.max_len == 256  # the floor
    cache.layers[0][0][0, :10] = 1.0
    assert not any(cache.grow_for(n) for n in range(11, 257))  # room enough: never reallocated
    assert cache.grow_for(257) and cache.max_len == 514
    assert cache.layers[0][0][0, :10].eq(1.0).all() and cache.layers[0][0][0, 10:].eq(0.0).all()
    assert cache.grow_for(600, limit=700) and cache.max_len == 700  # capped by the session limit


@pytest.mark.slow
def test_a_cloud_session_cache_grows_past_256_positions_keeping_what_it_holds(ferry_smollm, cloud_factory,
                                                                              int8_draft, monkeypatch):
    """A cloud session's dense cache starts at 256 positions; a longer answer grows it mid-sequence (ensure
    keep=True). The cloud runs its one-by-one path here, the one with a dense cache per session (the batched path's
    pool holds any length from the start). On a CPU the edge's and the draft's paged pools hold the whole context
    from the start (untouched pages cost no memory; their growth elsewhere: tests/test_sequence_runner.py)."""
    from ferry.edge.speculative import Drafter, GammaController
    from ferry.engine.kv_cache import KVCache

    grown: list[tuple[int, int, int]] = []  # (cache layers, positions before, after)
    ensure = KVCache.ensure

    def spy(cache, batch, length, keep=False):
        before = cache.max_len
        if ensure(cache, batch, length, keep) and before and keep:
            grown.append((cache.num_layers, before, cache.max_len))
            return True
        return False

    monkeypatch.setattr(KVCache, "ensure", spy)
    # every step a 4-token round, so the draft's cache crosses 256 positions too (the controller could pause it)
    monkeypatch.setattr(GammaController, "choose", lambda self: 4)
    # 128 prompt tokens: the first request is for 256 positions, so a 140-token answer has to grow every cache
    prompt = ferry_smollm.tokenizer.encode("A long story about a lighthouse keeper and a storm at sea. " * 20)[:128]
    params = SamplingParams(max_tokens=140, ignore_eos=True)
    reference = Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate([prompt], params)[0].token_ids
    client = _edge(ferry_smollm, cloud_factory(10, batching=None), 10, drafter=Drafter(int8_draft), gamma_max=6)
    try:
        completion, stats = client.generate(prompt, params)
    finally:
        client.close()
    assert completion.token_ids == reference
    layers = ferry_smollm.config.num_layers
    # the cloud session's 20 layers grew once, from 256, while holding data
    assert [n for n, before, after in grown if before == 256 and after > 256] == [layers - 10]
    assert len(grown) == 1, grown
    assert client.runner.capacity >= ferry_smollm.config.max_context
    assert client.drafter.runner.capacity >= ferry_smollm.config.max_context
    assert stats.draft_rounds > 0


@pytest.mark.slow
def test_split_auto_measures_and_picks_a_feasible_k(ferry_smollm, cloud_factory, prompt_ids, reference):
    server = cloud_factory(3)
    client = _edge(ferry_smollm, server, None, min_edge_layers=6)
    try:
        completion, _ = client.generate(prompt_ids[0], GREEDY)
    finally:
        client.close()
    assert completion.token_ids == reference[0]
    table = client.split_table
    assert [r["split"] for r in table] and min(r["split"] for r in table) == 6
    assert client.split == table[0]["split"] and all(r["predicted_s"] > 0 for r in table)


def test_planner_keeps_slow_compute_on_the_fast_side():
    from ferry.edge.split_planner import ComputeProfile, LinkProfile, predict

    link = LinkProfile(rtt_s=0.05, bandwidth_Bps=2.5e6)
    slow_edge = predict(30, ComputeProfile(0.010, 0.0), ComputeProfile(0.001, 0.002), link, 600, 1e-5)
    slow_cloud = predict(30, ComputeProfile(0.001, 0.0), ComputeProfile(0.010, 0.002), link, 600, 1e-5)
    assert slow_edge[0]["split"] == 1 and slow_cloud[0]["split"] == 29
    limited = predict(30, ComputeProfile(0.010, 0.0), ComputeProfile(0.001, 0.002), link, 600, 1e-5, min_edge_layers=8)
    assert limited[0]["split"] == 8


def test_planner_picks_an_interior_k_where_the_hidden_state_is_cheapest_on_the_wire():
    from ferry.edge.split_planner import ComputeProfile, LinkProfile, WireBytes, predict

    same = ComputeProfile(0.002, 0.002)
    slow_link = LinkProfile(rtt_s=0.05, bandwidth_Bps=1e5)  # 100 kB/s: 1 kB more per token costs 10 ms
    sizes = {k: 2000 - 1000 * (k == 11) for k in range(30)}  # a compressing codec that does best after layer 10
    rows = predict(30, same, same, slow_link, WireBytes(sizes, sizes), 1e-5)
    assert rows[0]["split"] == 11
    # a slightly slower edge (2 layers' worth of 0.5 ms) does not outweigh the 10 ms the wire saves at K=11
    rows = predict(30, ComputeProfile(0.0025, 0.002), same, slow_link, WireBytes(sizes, sizes), 1e-5)
    assert rows[0]["split"] == 11


def test_planner_counts_the_prefill_compute_and_the_prompt_on_the_wire():
    from ferry.edge.split_planner import ComputeProfile, LinkProfile, WireBytes, Workload, predict

    link = LinkProfile(rtt_s=0.05, bandwidth_Bps=1e6)
    # decode: the edge is faster per layer; prefill: the cloud batches far better (an accelerator)
    edge, cloud = ComputeProfile(0.001, 0.0, prefill_layer_s=0.001), ComputeProfile(0.002, 0.002, prefill_layer_s=2e-5)
    decode_only = predict(30, edge, cloud, link, 2000, 1e-5, workload=Workload(0, 16))
    long_prompt = predict(30, edge, cloud, link, 2000, 1e-5, workload=Workload(2000, 16))
    assert decode_only[0]["split"] == 29 and long_prompt[0]["split"] == 1
    assert long_prompt[0]["prefill_s"] > 2000 * 2000 / 1e6  # 2000 prompt tokens x 2 kB crossed the link once
    # equal compute: only the prompt's bytes per K decide, and they are cheapest after layer 20
    same = ComputeProfile(0.002, 0.002)
    prefill_bytes = {k: 2000 - 500 * (k == 20) for k in range(30)}
    wire = WireBytes(dict.fromkeys(range(30), 2000), prefill_bytes)
    assert predict(30, same, same, link, wire, 1e-5, workload=Workload(1000, 16))[0]["split"] == 20


# Per-layer times as a CPU measures them for this model (decode layer, head, prefill layer per token). The tests
# below inject them: edge and cloud share this machine and its other work, so their own measurements, taken at
# different moments, can differ by more than the effects under test.
BASE = (0.0015, 0.01, 0.0003)


def _measures(monkeypatch, edge_factor: float, cloud_factor):
    """measure_compute replaced: the edge (this thread) measures BASE x edge_factor; the cloud's threads measure
    BASE x cloud_factor() at the moment they measure; every call is recorded."""
    from ferry.edge import split_planner

    calls = []

    def measure(loaded, **kw):
        side = "cloud" if threading.current_thread().name.startswith("ferry-cloud") else "edge"
        factor = cloud_factor() if side == "cloud" else edge_factor
        calls.append((side, factor))
        return split_planner.ComputeProfile(*(t * factor for t in BASE))

    monkeypatch.setattr(split_planner, "measure_compute", measure)
    return calls


def test_split_auto_keeps_layers_off_an_edge_held_to_a_quarter_of_the_clouds_speed(ferry_smollm, cloud_factory,
                                                                                   prompt_ids, reference, monkeypatch):
    calls = _measures(monkeypatch, edge_factor=4.0, cloud_factor=lambda: 1.0)
    client = _edge(ferry_smollm, cloud_factory(3), None)
    try:
        completion, _ = client.generate(prompt_ids[0], SamplingParams(max_tokens=8, ignore_eos=True))
    finally:
        client.close()
    assert sorted(side for side, _ in calls) == ["cloud", "edge"]
    assert client.split == 3  # the fewest layers this cloud lets the edge keep
    assert completion.token_ids == reference[0][:8]


def test_split_auto_moves_layers_to_the_edge_when_the_cloud_is_busy_with_other_sessions(ferry_smollm, cloud_factory,
                                                                                        prompt_ids, reference,
                                                                                        monkeypatch):
    server = cloud_factory(1)
    # A cloud time-shares its device between the sessions it serves: measured while serving n, it is n times slower.
    calls = _measures(monkeypatch, edge_factor=1.0, cloud_factor=lambda: float(server._active))
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def auto_split() -> int:
        client = _edge(ferry_smollm, server, None)
        try:
            assert client.generate(prompt_ids[0], params)[0].token_ids == reference[0][:4]
        finally:
            client.close()
        return client.split

    # idle: both sides measure the same; no K is better, and the planner keeps its first (the fewest edge layers)
    assert auto_split() == 1
    hello = Frame(Kind.HELLO, meta={"model": model_fingerprint(ferry_smollm.config), "split": 1, "codec": "fp32"})
    release = threading.Event()
    held = [_held_session(server.port, [hello.encode()], release) for _ in range(3)]
    try:
        for _, call in held:
            assert Frame.decode(next(call)).kind == Kind.WELCOME
        busy = auto_split()  # the cloud measures itself again: it now serves 4 sessions
    finally:
        release.set()
        for channel, call in held:
            list(call)
            channel.close()
    assert [factor for side, factor in calls if side == "cloud"] == [1.0, 4.0]
    assert busy == 29  # every layer it may keep runs on the edge


def test_tls_session_is_exact_and_plaintext_clients_are_refused(ferry_smollm, prompt_ids, reference, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server = CloudServer(ferry_smollm, 10, TOKEN)
    port = server.start("127.0.0.1:0", tls=(key.read_bytes(), cert.read_bytes()))
    try:
        client = EdgeClient(ferry_smollm, [f"localhost:{port}"], 10, TOKEN, tls_ca=cert.read_bytes(), timeout_s=20)
        try:
            assert client.generate(prompt_ids[0], GREEDY)[0].token_ids == reference[0]
        finally:
            client.close()
        plain = EdgeClient(ferry_smollm, [f"127.0.0.1:{port}"], 10, TOKEN, timeout_s=5, reconnects=0)
        with pytest.raises(LinkError):
            plain.generate(prompt_ids[0], GREEDY)
        plain.close()
    finally:
        server.stop(0)
