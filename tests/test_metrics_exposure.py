"""Secret Sharer exposure: hand cases for the rank version, known distributions for the fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import skewnorm

from fedsecure.metrics import MetricInputError, SkewNormalFit, exposure_by_rank, exposure_skew_normal

CANDIDATES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # |R| = 8 with the canary


def test_rank_exposure_hand_cases():
    # canary strictly most likely (lowest log-perplexity): rank 1 -> log2 8 = 3 bits (the maximum)
    assert exposure_by_rank(canary_score=0.5, candidate_scores=CANDIDATES) == 3.0
    # canary least likely: rank 8 -> 0 bits
    assert exposure_by_rank(canary_score=10.0, candidate_scores=CANDIDATES) == 0.0
    # three candidates at or below 3.5 -> rank 4 -> 3 - 2 = 1 bit
    assert exposure_by_rank(canary_score=3.5, candidate_scores=CANDIDATES) == 1.0
    # a tie counts against the canary (the paper's <=): rank 2 -> 3 - 1 = 2 bits
    assert exposure_by_rank(canary_score=1.0, candidate_scores=CANDIDATES) == 2.0
    # one candidate: |R| = 2
    assert exposure_by_rank(canary_score=0.0, candidate_scores=[1.0]) == 1.0


def test_rank_exposure_direction_is_log_perplexity_lower_is_more_likely():
    low = exposure_by_rank(canary_score=-5.0, candidate_scores=CANDIDATES)
    high = exposure_by_rank(canary_score=50.0, candidate_scores=CANDIDATES)
    assert low > high  # a canary the model finds *more* likely (lower perplexity) is more exposed


@settings(max_examples=100, deadline=None)
@given(
    canary=st.floats(-10, 10),
    candidates=st.lists(st.floats(-10, 10), min_size=1, max_size=50),
)
def test_rank_exposure_range_and_formula(canary, candidates):
    e = exposure_by_rank(canary_score=canary, candidate_scores=candidates)
    size = len(candidates) + 1
    assert 0.0 <= e <= math.log2(size) + 1e-12
    rank = 1 + sum(c <= canary for c in candidates)
    assert e == pytest.approx(math.log2(size / rank))


@pytest.mark.parametrize("shape", [0.0, 4.0, -4.0])
@pytest.mark.parametrize("quantile", [0.5, 1e-2, 1e-4, 1e-8])
def test_skew_normal_exposure_recovers_known_tail(shape, quantile):
    rng = np.random.default_rng(11)
    candidates = skewnorm.rvs(shape, loc=3.0, scale=0.5, size=5000, random_state=rng)
    canary = skewnorm.ppf(quantile, shape, loc=3.0, scale=0.5)
    got = exposure_skew_normal(canary_score=canary, candidate_scores=candidates)
    expected = -math.log2(quantile)
    # within 10% (+0.25 bit): the fit is estimated from 5000 candidates, the deepest case
    # extrapolates to 1e-8, far beyond what the rank version can see (log2 5001 = 12.3 bits)
    assert abs(got - expected) <= 0.1 * expected + 0.25


def test_skew_normal_agrees_with_rank_inside_the_sample_and_extends_beyond():
    rng = np.random.default_rng(5)
    candidates = rng.normal(4.0, 1.0, 4000)
    mid = 2.0  # about the 2.3% quantile: well inside the sample
    assert exposure_skew_normal(canary_score=mid, candidate_scores=candidates) == pytest.approx(
        exposure_by_rank(canary_score=mid, candidate_scores=candidates), abs=0.3
    )
    far = -3.0  # beyond every candidate: rank exposure saturates at log2 |R|
    assert exposure_by_rank(canary_score=far, candidate_scores=candidates) == pytest.approx(math.log2(4001))
    assert exposure_skew_normal(canary_score=far, candidate_scores=candidates) > 30.0


def test_skew_normal_deep_tail_stays_finite_and_monotone():
    rng = np.random.default_rng(2)
    fit_input = skewnorm.rvs(3.0, loc=0.0, scale=1.0, size=3000, random_state=rng)
    values = [exposure_skew_normal(canary_score=x, candidate_scores=fit_input) for x in (-5.0, -20.0, -60.0)]
    # scipy's logcdf underflows to -inf there; the quad fallback does not
    assert all(math.isfinite(v) for v in values)
    assert values[0] < values[1] < values[2]
    fit = SkewNormalFit(candidate_scores=fit_input)
    assert fit.scale > 0


def test_exposure_bad_input():
    with pytest.raises(MetricInputError, match="candidate_scores"):
        exposure_by_rank(canary_score=1.0, candidate_scores=[])
    with pytest.raises(MetricInputError, match="canary_score"):
        exposure_by_rank(canary_score=float("nan"), candidate_scores=[1.0])
    with pytest.raises(MetricInputError, match="at least 20"):
        exposure_skew_normal(canary_score=1.0, candidate_scores=[1.0, 2.0, 3.0])
    with pytest.raises(MetricInputError, match="same score"):
        exposure_skew_normal(canary_score=1.0, candidate_scores=[2.0] * 50)
