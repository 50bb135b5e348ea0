"""Sequences that outgrow their first allocation: a KV cache grown mid-sequence keeps what it held (the way edge,
cloud and draft sessions grow theirs), and decode that crosses the 256-token context bucket stays exact."""

from __future__ import annotations

import pytest
import torch

from ferry.bench.edge_codecs import eval_text
from ferry.engine.cuda_graphs import MIN_CONTEXT_BUCKET, context_bucket
from ferry.engine.engine import Engine
from ferry.engine.kv_cache import KVCache
from ferry.engine.sampling import SamplingParams

# Prefill up to just below the first bucket's end, then decode across it.
PREFILL, TOTAL = 244, 272


@pytest.fixture(scope="module")
def long_ids(ferry_smollm) -> list[int]:
    ids = ferry_smollm.tokenizer.encode(eval_text())
    assert len(ids) >= TOTAL
    return ids[:TOTAL]


def test_ensure_with_keep_copies_what_the_cache_held_into_the_larger_tensors():
    cache = KVCache(num_layers=2, kv_heads=3, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.ensure(2, 256)
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    assert not cache.ensure(2, 200, keep=True)  # fits: nothing reallocated
    assert cache.ensure(3, 600, keep=True)
    assert (cache.max_batch, cache.max_len) == (3, 600)
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert k.shape == v.shape == (3, 600, 3, 4)
        assert torch.equal(k[:2, :256], k0) and torch.equal(v[:2, :256], v0)
        assert not k[2:].any() and not k[:, 256:].any() and not v[2:].any() and not v[:, 256:].any()
    assert cache.ensure(3, 700)  # without keep the old contents are dropped
    assert not any(k.any() or v.any() for k, v in cache.layers)


def _decode_with_growth(model, ids: list[int], keep: bool) -> torch.Tensor:
    """Prefill PREFILL tokens into a 256-token cache, then decode the rest one token at a time, growing the cache
    the way a split session does (to twice what it needs) when a step would not fit. Logits of every decode step."""
    cache = KVCache.for_model(model)
    cache.ensure(1, MIN_CONTEXT_BUCKET)
    x = torch.tensor([ids])
    steps = []
    with torch.inference_mode():
        model(x[:, :PREFILL], torch.arange(PREFILL)[None], cache.layers, PREFILL)
        for pos in range(PREFILL, len(ids)):
            if pos + 1 > cache.max_len:
                cache.ensure(1, 2 * (pos + 1), keep=keep)
            steps.append(model(x[:, pos : pos + 1], torch.tensor([[pos]]), cache.layers, pos + 1))
    assert cache.max_len > MIN_CONTEXT_BUCKET  # the cache really grew mid-sequence
    return torch.cat(steps)


@pytest.mark.slow
def test_a_sequence_continues_exactly_after_its_cache_grows_past_256_tokens(ferry_smollm, long_ids):
    model = ferry_smollm.model
    cache = KVCache.for_model(model)
    cache.ensure(1, TOTAL)
    with torch.inference_mode():
        reference = model.full_logits(torch.tensor([long_ids]), cache.layers)[0, PREFILL:]
    grown = _decode_with_growth(model, long_ids, keep=True)
    assert float((grown - reference).abs().max()) < 1e-3  # fp32: only summation order differs
    # The check can fail: a cache that forgets its contents when it grows gives different logits after 256.
    before_growth = MIN_CONTEXT_BUCKET - PREFILL
    forgotten = _decode_with_growth(model, long_ids[: MIN_CONTEXT_BUCKET + 4], keep=False)
    assert float((forgotten[:before_growth] - reference[:before_growth]).abs().max()) < 1e-3
    assert float((forgotten[before_growth:] - reference[before_growth : len(forgotten)]).abs().max()) > 1.0


@pytest.mark.slow  # loads transformers' model
def test_greedy_decode_across_the_256_token_context_bucket_matches_transformers(ferry_smollm, hf_smollm,
                                                                               hf_greedy_choices, long_ids):
    """On CPU the engine decodes without graphs; needed context goes from 245 to 272, across the first bucket."""
    prompt, new = long_ids[:PREFILL], TOTAL - PREFILL
    assert context_bucket(PREFILL + 1, 4096) == MIN_CONTEXT_BUCKET < context_bucket(TOTAL, 4096)
    engine = Engine(ferry_smollm.model, ferry_smollm.tokenizer)
    assert engine.decode_path.startswith("eager")
    [c] = engine.generate([prompt], SamplingParams(max_tokens=new, ignore_eos=True))
    assert c.token_ids == hf_greedy_choices(hf_smollm, prompt, c.token_ids)
