"""The serving engine (issue 13): continuous batching over the paged KV cache, on the default model, fp32 CPU.

The reference for every schedule is the same prompt decoded alone with nothing else in the engine: joining late,
sharing a prefix, being chunked or preempted must not change a single greedy token. Every test ends with the
block allocator holding nothing.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.engine.scheduler import QueueFullError
from ferry.errors import FerryError, InvalidRequestError

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(ferry_smollm) -> list[list[int]]:
    tok = ferry_smollm.tokenizer
    texts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
             "In 1905 Albert Einstein published four papers that"]
    return [tok.encode_chat(t) for t in texts]


@pytest.fixture(scope="module")
def alone(ferry_smollm, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens, decoded alone."""
    engine = Engine(ferry_smollm.model, None, prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def _engine(ferry_smollm, **kw) -> Engine:
    return Engine(ferry_smollm.model, None, **kw)


def _drain(engine: Engine, out: dict[int, list[int]], steps: int | None = None) -> None:
    n = 0
    while engine.has_unfinished() and (steps is None or n < steps):
        for e in engine.step():
            out.setdefault(e.index, []).append(e.token_id)
        n += 1


def test_requests_joining_at_different_steps_decode_as_if_alone(ferry_smollm, prompts, alone):
    engine = _engine(ferry_smollm, prefix_caching=False)
    out: dict[int, list[int]] = {}
    ids = [engine.add_request(prompts[0], GREEDY)]
    _drain(engine, out, steps=3)
    ids.append(engine.add_request(prompts[1], GREEDY))
    _drain(engine, out, steps=2)
    ids += [engine.add_request(p, GREEDY) for p in prompts[2:]]
    _drain(engine, out)
    assert [out[i] for i in ids] == alone
    engine.check_no_leaks()


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_keep_decoding(ferry_smollm, prompts, alone):
    engine = _engine(ferry_smollm, max_batched_tokens=16, max_running=4, prefix_caching=False)
    long_prompt = prompts[3] * 4  # ~140 tokens: nine chunks of at most 16 tokens
    short = engine.add_request(prompts[0], SamplingParams(max_tokens=40, ignore_eos=True))
    out: dict[int, list[int]] = {}
    _drain(engine, out, steps=3)
    late = engine.add_request(long_prompt, GREEDY)
    chunks = 0
    while late not in out:  # until the long prompt's first token is back
        before = len(out.get(short, []))
        _drain(engine, out, steps=1)
        assert len(out[short]) == before + 1  # the short request got its token in every step of the long prefill
        chunks += 1
    assert chunks >= len(long_prompt) // 15
    _drain(engine, out)
    assert out[short][:10] == alone[0]
    assert out[late] == _engine(ferry_smollm, prefix_caching=False).generate([long_prompt], GREEDY)[0].token_ids
    engine.check_no_leaks()


def test_an_aborted_request_frees_its_blocks_and_the_others_finish(ferry_smollm, prompts, alone):
    engine = _engine(ferry_smollm, prefix_caching=False)
    free = engine.blocks.free_blocks
    keep, drop = engine.add_request(prompts[0], GREEDY), engine.add_request(prompts[1], GREEDY)
    out: dict[int, list[int]] = {}
    _drain(engine, out, steps=4)
    held = free - engine.blocks.free_blocks
    engine.abort(drop)
    assert free - engine.blocks.free_blocks < held  # the aborted request's blocks came back at once
    _drain(engine, out)
    assert out[keep] == alone[0] and len(out[drop]) < GREEDY.max_tokens
    engine.check_no_leaks()


def test_leaving_a_stream_early_aborts_its_requests(ferry_smollm, prompts):
    engine = _engine(ferry_smollm)
    for event in engine.stream(prompts[:2], GREEDY):
        if event.index == 1:
            break
    engine.check_no_leaks()


PREEMPTED = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def roomy(ferry_smollm, prompts) -> list:
    """The four prompts' completions from an engine with room for all of them: no preemption."""
    return _engine(ferry_smollm, prefix_caching=False).generate(prompts, PREEMPTED)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_by_swap_or_recompute_gives_the_tokens_of_no_preemption(ferry_smollm, prompts, roomy, mode):
    # 14 usable blocks of 16 tokens: the four requests need 4 x 3-4 blocks as they grow, so someone is preempted.
    tight = _engine(ferry_smollm, num_blocks=15, prefix_caching=False, preemption=mode)
    done = tight.generate(prompts, PREEMPTED)
    assert [c.token_ids for c in done] == [c.token_ids for c in roomy]
    stats = tight.swap.stats
    assert (stats.swapped_out if mode == "swap" else stats.recomputed) >= 1
    if mode == "swap":
        assert stats.swapped_in == stats.swapped_out
    tight.check_no_leaks()


def test_automatic_preemption_measures_both_costs_and_says_which_it_chose(ferry_smollm, prompts, roomy, caplog):
    engine = _engine(ferry_smollm, num_blocks=15, prefix_caching=False)
    with caplog.at_level(logging.INFO, logger="ferry.preempt"):
        done = engine.generate(prompts, PREEMPTED)
    assert [c.token_ids for c in done] == [c.token_ids for c in roomy]
    assert engine.swap.link_bytes_per_s > 0 and engine.swap.prefill_tokens_per_s > 0
    assert any("swap" in r.message and "recompute" in r.message and "->" in r.message for r in caplog.records)
    engine.check_no_leaks()


def test_a_shared_prefix_is_prefilled_once_and_gives_the_same_tokens(ferry_smollm, prompts):
    tok = ferry_smollm.tokenizer
    system = tok.encode("You are a careful assistant who answers in one short sentence. " * 3)
    first, second = system + prompts[0], system + prompts[1]
    plain = _engine(ferry_smollm, prefix_caching=False).generate([first, second], GREEDY)
    engine = _engine(ferry_smollm)
    a = engine.generate([first], GREEDY)[0]
    prefilled_before = engine.stats.prefill_tokens
    b = engine.generate([second], GREEDY)[0]
    shared = len(system) // 16 * 16
    assert [a.token_ids, b.token_ids] == [c.token_ids for c in plain]
    assert engine.blocks.stats.prefix_hit_tokens >= shared
    assert engine.stats.prefill_tokens - prefilled_before <= len(second) - shared  # fewer tokens prefilled (counted)
    engine.check_no_leaks()


def test_a_prefix_that_parts_inside_a_block_copies_that_block_and_matches(ferry_smollm):
    tok = ferry_smollm.tokenizer
    base = tok.encode("Once upon a time in a small village by the river there lived an old fisherman and his wife, "
                      "who mended nets all day and told stories to the children every evening by the fire.")
    assert len(base) > 32  # its second block is full, so it is cached
    cut = 16 + 9  # share one full block and 9 tokens of the next
    other = base[:cut] + tok.encode(" who sang every morning to the birds")
    engine = _engine(ferry_smollm)
    engine.generate([base], GREEDY)
    b = engine.generate([other], GREEDY)[0]
    assert engine.blocks.stats.copied_blocks == 1
    assert engine.blocks.stats.prefix_hit_tokens == cut
    assert b.token_ids == _engine(ferry_smollm, prefix_caching=False).generate([other], GREEDY)[0].token_ids
    engine.check_no_leaks()


def test_requests_in_one_batch_keep_their_own_sampling_limits_and_stops(ferry_smollm, prompts, alone):
    engine = _engine(ferry_smollm)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    ids = [engine.add_request(prompts[0], GREEDY), engine.add_request(prompts[1], sampled),
           engine.add_request(prompts[2], SamplingParams(max_tokens=3, ignore_eos=True))]
    out: dict[int, list[int]] = {}
    _drain(engine, out)
    assert out[ids[0]] == alone[0] and len(out[ids[2]]) == 3 and out[ids[2]] == alone[2][:3]
    again = _engine(ferry_smollm).generate([prompts[1]], sampled)[0].token_ids
    assert out[ids[1]] == again  # its own seeded generator: the batch around it does not change its draws
    engine.check_no_leaks()


def test_an_oversized_request_is_a_clear_error_and_the_others_finish(ferry_smollm, prompts, alone):
    engine = _engine(ferry_smollm, num_blocks=12)
    first = engine.add_request(prompts[0], GREEDY)
    with pytest.raises(InvalidRequestError, match="needs 13 KV blocks .* the cache holds 11"):
        engine.add_request(prompts[1], SamplingParams(max_tokens=200 - len(prompts[1])))
    out: dict[int, list[int]] = {}
    _drain(engine, out)
    assert out == {first: alone[0]}
    engine.check_no_leaks()


def test_the_waiting_queue_is_bounded(ferry_smollm, prompts):
    engine = _engine(ferry_smollm, max_waiting=2)
    engine.add_request(prompts[0], GREEDY)
    engine.add_request(prompts[1], GREEDY)
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        engine.add_request(prompts[2], GREEDY)


def test_kv_memory_is_a_fraction_on_gpus_or_a_size(ferry_smollm):
    from ferry.engine.paged_cache import KVMemory

    assert KVMemory.parse("0.5") == KVMemory(fraction=0.5) and KVMemory.parse("6GiB") == KVMemory(gib=6.0)
    for bad in ("1.5", "-1", "lots"):
        with pytest.raises(FerryError, match="--kv-memory"):
            KVMemory.parse(bad)
    with pytest.raises(FerryError, match="needs a GPU"):
        _engine(ferry_smollm, kv_memory="0.5")
    engine = _engine(ferry_smollm, kv_memory="0.01GiB")
    assert engine.kv_report["blocks"] == int(0.01 * (1 << 30)) // engine.cache.bytes_per_token // 16
    assert torch.equal(torch.tensor(engine.kv_report["tokens"]), torch.tensor((engine.kv_report["blocks"] - 1) * 16))


def test_a_request_swapped_out_while_prefilling_resumes_with_a_chunk_its_blocks_hold():
    """Six prompts sharing a 40-token prefix in a 15-block pool, 16-token budget: requests are swapped out in the
    middle of their prefill and come back to finish it (random weights: this is about bookkeeping, fast)."""
    from ferry.bench.shapes import TINY, random_model

    model = random_model(TINY, torch.device("cpu"), torch.float32, seed=5)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(10, 8000, (40,), generator=gen).tolist()
    prompts = [prefix + torch.randint(10, 8000, (7 + 11 * i,), generator=gen).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = Engine(model, None, prefix_caching=False).generate(prompts, params)
    tight = Engine(model, None, num_blocks=16, preemption="swap")
    assert [c.token_ids for c in tight.generate(prompts, params)] == [c.token_ids for c in roomy]
    assert tight.swap.stats.swapped_out >= 1 and tight.swap.stats.swapped_in == tight.swap.stats.swapped_out
    tight.check_no_leaks()
