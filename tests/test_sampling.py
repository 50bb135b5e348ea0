"""Which tokens top-k and top-p keep, on fixed logits: the filtered distribution, and what the sampler draws from it."""

from __future__ import annotations

import math

import pytest
import torch

from ferry.engine.sampling import Sampler, SamplingParams, filtered_probs

# Probabilities 0.5, 0.25, 0.15, 0.07, 0.03 placed out of order, so a filter that keeps positions instead of
# the largest values fails.
PROBS = {3: 0.5, 0: 0.25, 4: 0.15, 1: 0.07, 2: 0.03}
LOGITS = torch.tensor([[math.log(PROBS[i]) for i in range(5)]])


def _kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs[0]).flatten().tolist())


def _renormalised(kept: set[int], temperature: float = 1.0) -> torch.Tensor:
    """The reference: softmax(logits / T) restricted to `kept`, scaled back to sum 1."""
    weights = torch.tensor([PROBS[i] ** (1 / temperature) if i in kept else 0.0 for i in range(5)])
    return (weights / weights.sum()).unsqueeze(0)


@pytest.mark.parametrize("k, kept", [(1, {3}), (2, {3, 0}), (3, {3, 0, 4}), (5, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_largest_logits_renormalised(k, kept):
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=k))
    assert _kept(probs) == kept
    torch.testing.assert_close(probs, _renormalised(kept))


def test_top_k_keeps_every_token_tied_with_the_kth_logit():
    probs = filtered_probs(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), SamplingParams(temperature=1.0, top_k=2))
    assert _kept(probs) == {0, 1, 2}


@pytest.mark.parametrize(
    "p, kept",
    [(0.05, {3}),  # the most likely token always stays, even when it alone exceeds p
     (0.45, {3}),  # the first token's mass (0.5) already reaches p
     (0.6, {3, 0}), (0.74, {3, 0}), (0.8, {3, 0, 4}), (0.95, {3, 0, 4, 1}), (0.98, {3, 0, 4, 1, 2})],
)
def test_top_p_keeps_the_smallest_most_likely_set_whose_mass_reaches_p(p, kept):
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=p))
    assert _kept(probs) == kept
    torch.testing.assert_close(probs, _renormalised(kept))


def test_temperature_flattens_before_top_p_so_more_tokens_stay():
    cold = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.72))
    hot = filtered_probs(LOGITS, SamplingParams(temperature=4.0, top_p=0.72))
    assert _kept(cold) == {3, 0}
    assert _kept(hot) == {3, 0, 4, 1}  # at T=4 the masses are 0.27, 0.23, 0.20, 0.17, 0.13
    torch.testing.assert_close(hot, _renormalised({3, 0, 4, 1}, temperature=4.0))


def test_top_k_then_top_p_apply_in_that_order():
    # top_k=3 leaves 0.5, 0.25, 0.15 -> renormalised 0.556, 0.278, 0.167; top_p=0.8 then drops the third
    # (mass before it 0.833 >= 0.8), whereas top_p on the unfiltered distribution would have kept it.
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    assert _kept(probs) == {3, 0}
    torch.testing.assert_close(probs, _renormalised({3, 0}))


def test_rows_of_a_batch_are_filtered_independently():
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(torch.nonzero(probs[0]).flatten().tolist()) == {3, 0}
    assert set(torch.nonzero(probs[1]).flatten().tolist()) == {1, 4}


def test_top_k_one_leaves_only_the_argmax_so_the_greedy_shortcut_is_exact():
    params = SamplingParams(temperature=0.7, top_k=1)
    assert params.greedy  # the sampler takes the argmax without drawing ...
    assert _kept(filtered_probs(LOGITS, params)) == {3}  # ... which is exactly what the filter would leave
    assert Sampler(params, torch.device("cpu"))(LOGITS).tolist() == [3]


def test_sampler_draws_only_kept_tokens_with_the_filtered_frequencies():
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.9, seed=3)
    expected = _renormalised({3, 0, 4})  # top-4: 0.515, 0.258, 0.155, 0.072; top-p 0.9 cuts the 4th
    draws = Sampler(params, torch.device("cpu"))(LOGITS.expand(20000, -1))
    counts = torch.bincount(draws, minlength=5).double() / len(draws)
    assert set(torch.nonzero(counts).flatten().tolist()) == {3, 0, 4}
    # 20000 draws: the standard error of each frequency is below 0.004.
    torch.testing.assert_close(counts.unsqueeze(0), expected.double(), atol=0.015, rtol=0)
