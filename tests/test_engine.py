"""Engine behaviour on the real default model: sampling, stops, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import InvalidRequestError


@pytest.fixture(scope="module")
def engine(ferry_smollm) -> Engine:
    return Engine(ferry_smollm.model, ferry_smollm.tokenizer)


@pytest.fixture(scope="module")
def prompts(ferry_smollm) -> list[list[int]]:
    tok = ferry_smollm.tokenizer
    return [tok.encode_chat("Write a haiku about the sea."), tok.encode("The three primary colours are")]


@pytest.mark.slow
def test_same_seed_gives_same_text_and_other_seed_differs(engine, prompts):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    first = [c.token_ids for c in engine.generate(prompts, params)]
    again = [c.token_ids for c in engine.generate(prompts, params)]
    other = [c.token_ids for c in engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 99}))]
    assert first == again
    assert first != other


def _teacher_forced_logits(ferry_smollm, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The model's logits before each generated token, from one full forward over prompt + generated."""
    from ferry.engine.kv_cache import KVCache

    ids = torch.tensor([prompt + generated])
    cache = KVCache.for_model(ferry_smollm.model)
    cache.ensure(1, ids.shape[1])
    with torch.inference_mode():
        logits = ferry_smollm.model.full_logits(ids, cache.layers)[0]
    return logits[len(prompt) - 1 : -1]


@pytest.mark.slow
def test_sampled_tokens_lie_within_the_models_top_k(engine, prompts, ferry_smollm):
    # Temperature 3 flattens the distribution: without the cut, draws from outside the top 3 of a 49k vocabulary
    # would be all but certain over 2 x 16 tokens.
    params = SamplingParams(max_tokens=16, temperature=3.0, top_k=3, seed=5, ignore_eos=True)
    for prompt, c in zip(prompts, engine.generate(prompts, params)):
        logits = _teacher_forced_logits(ferry_smollm, prompt, c.token_ids)
        rank = (logits > logits.gather(-1, torch.tensor(c.token_ids)[:, None])).sum(-1)
        assert rank.max() < 3, rank.tolist()
        assert len(set(rank.tolist())) > 1  # not the greedy path in disguise: lower-ranked tokens were drawn


@pytest.mark.slow
def test_sampled_tokens_lie_within_the_models_top_p_nucleus(engine, prompts, ferry_smollm):
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.6, seed=8, ignore_eos=True)
    for prompt, c in zip(prompts, engine.generate(prompts, params)):
        probs = (_teacher_forced_logits(ferry_smollm, prompt, c.token_ids) / 1.5).softmax(-1)
        chosen = probs.gather(-1, torch.tensor(c.token_ids)[:, None])
        mass_before = torch.where(probs > chosen, probs, 0).sum(-1)  # mass of the tokens ranked above the draw
        assert mass_before.max() < 0.6, mass_before.tolist()


def test_stop_string_truncates_text_and_reports_stop(engine, ferry_smollm):
    ids = ferry_smollm.tokenizer.encode("1, 2, 3, 4, 5, 6, 7,")
    free = engine.generate([ids], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert " 9" in free.text, free.text  # the model counts on; the stop below must cut it there
    stopped = engine.generate([ids], SamplingParams(max_tokens=16, stop=(" 9",), ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" 9")]
    assert len(stopped.token_ids) < len(free.token_ids)


def test_eos_ends_a_chat_answer_with_stop(engine, ferry_smollm):
    [c] = engine.generate([ferry_smollm.tokenizer.encode_chat("Say hi.")], SamplingParams(max_tokens=64))
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] in ferry_smollm.tokenizer.eos_token_ids


def test_max_tokens_ends_with_length(engine, prompts):
    completions = engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in completions)


@pytest.mark.slow
def test_streamed_events_rebuild_the_generated_completions(engine, prompts):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    texts, ids = ["", ""], [[], []]
    for event in engine.stream(prompts, params):
        texts[event.index] += event.text
        ids[event.index].append(event.token_id)
    completions = engine.generate(prompts, params)
    assert ids == [c.token_ids for c in completions]
    assert texts == [c.text for c in completions]


def test_prompt_longer_than_context_is_refused(engine, ferry_smollm):
    too_long = [1] * ferry_smollm.config.max_context
    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        engine.generate([too_long], SamplingParams(max_tokens=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")],
)
def test_invalid_sampling_values_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("source", ["text", "random"])
def test_incremental_detokenization_equals_decoding_everything(ferry_smollm, source):
    from ferry.engine.sequence import Sequence

    tok = ferry_smollm.tokenizer
    if source == "text":
        ids = tok.encode("Ünïcode: 東京タワー 🚀🎉 naïve café — “quotes”\n\tdef f(x):  return x**2  # ok " * 3)
    else:
        ids = torch.randint(0, ferry_smollm.config.vocab_size, (300,), generator=torch.Generator().manual_seed(9)).tolist()
    seq = Sequence([1])
    streamed = "".join(seq.append(t, tok, frozenset(), (), max_tokens=len(ids)) for t in ids)
    assert seq.text == streamed == tok.decode(ids)


def test_stop_string_spanning_several_tokens_is_found_once_it_completes(ferry_smollm):
    from ferry.engine.sequence import Sequence

    tok = ferry_smollm.tokenizer
    ids = tok.encode("alpha beta gamma delta epsilon")
    seq = Sequence([1])
    streamed = ""
    for t in ids:
        streamed += seq.append(t, tok, frozenset(), ("a delt", "zeta"), max_tokens=100)
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == streamed == "alpha beta gamm"


def test_text_held_back_for_a_possible_stop_string_is_flushed_at_eos(ferry_smollm):
    from ferry.engine.sequence import Sequence

    tok = ferry_smollm.tokenizer
    seq = Sequence([1])
    streamed = "".join(seq.append(t, tok, frozenset({0}), ("a delt",), max_tokens=100)
                       for t in tok.encode("alpha beta gamma"))
    assert streamed == "alpha beta gamm"  # the final "a" might start "a delt"
    streamed += seq.append(0, tok, frozenset({0}), ("a delt",), max_tokens=100)
    assert seq.finish_reason == "stop" and streamed == seq.text == "alpha beta gamma"
