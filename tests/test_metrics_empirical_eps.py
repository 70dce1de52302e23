"""Empirical epsilon lower bound audited against Gaussian mechanisms of known (eps, delta)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from scipy.stats import beta

from fedsecure.metrics import (
    MetricInputError,
    clopper_pearson_upper,
    empirical_epsilon,
    epsilon_lower_bound,
    gaussian_epsilon,
)
from fedsecure.metrics.empirical_eps import _eps_from_rates


def test_gaussian_epsilon_solves_the_balle_wang_curve():
    for mu, delta in ((0.5, 0.1), (1.0, 1e-5), (3.0, 1e-5), (2.0, 0.01)):
        eps = gaussian_epsilon(mu=mu, delta=delta)
        back = special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)
        assert back == pytest.approx(delta, rel=1e-6)
    # delta at eps = 0 is the total variation Phi(mu/2) - Phi(-mu/2): beyond it epsilon is 0
    assert gaussian_epsilon(mu=1.0, delta=0.5) == 0.0
    assert gaussian_epsilon(mu=1.0, delta=1e-5) > gaussian_epsilon(mu=1.0, delta=1e-3) > 0


def test_clopper_pearson_upper_hand_values():
    # k = 0: closed form 1 - alpha^(1/n)
    assert float(clopper_pearson_upper(errors=0, trials=100, alpha=0.05)) == pytest.approx(
        1 - 0.05 ** (1 / 100)
    )
    assert float(clopper_pearson_upper(errors=100, trials=100, alpha=0.05)) == 1.0
    got = clopper_pearson_upper(errors=[3, 10], trials=50, alpha=0.025)
    np.testing.assert_allclose(got, [beta.ppf(0.975, 4, 47), beta.ppf(0.975, 11, 40)])
    with pytest.raises(MetricInputError, match="errors"):
        clopper_pearson_upper(errors=51, trials=50, alpha=0.05)


def _draw(mu, n, rng):
    return rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n)


def _naive_max_over_thresholds(members, nonmembers, delta):
    """Point estimates, best threshold picked on the same data: what the bound must NOT do."""
    t = np.unique(np.r_[members, nonmembers])
    fpr = (nonmembers[None, :] >= t[:, None]).mean(axis=1)
    fnr = (members[None, :] < t[:, None]).mean(axis=1)
    return float(_eps_from_rates(np.maximum(fpr, 1e-300), np.maximum(fnr, 1e-300), delta).max())


@pytest.mark.parametrize(("mu", "delta"), [(3.0, 1e-5), (5.0, 1e-5)])
def test_bound_below_true_epsilon_and_positive_when_separated(mu, delta):
    true_eps = gaussian_epsilon(mu=mu, delta=delta)
    members, nonmembers = _draw(mu, 5000, np.random.default_rng(0))
    res = empirical_epsilon(scores_members=members, scores_nonmembers=nonmembers, delta=delta, seed=0)
    assert 0.0 < res.epsilon < true_eps
    assert res.epsilon > 3.0  # large separation is detected (measured: ~5 at mu=3, ~6 at mu=5)
    assert res.num_eval_members == 2500 and res.num_eval_nonmembers == 2500
    # the reported bound is reproducible from the reported counts
    fpr_hi = float(clopper_pearson_upper(errors=res.false_positives, trials=2500, alpha=0.025))
    fnr_hi = float(clopper_pearson_upper(errors=res.false_negatives, trials=2500, alpha=0.025))
    assert (res.fpr_upper, res.fnr_upper) == (fpr_hi, fnr_hi)
    assert res.epsilon == pytest.approx(
        max(math.log((1 - delta - fnr_hi) / fpr_hi), math.log((1 - delta - fpr_hi) / fnr_hi), 0.0)
    )


def test_bound_is_valid_in_the_near_tight_regime_where_naive_estimates_overshoot():
    # mu = 1, delta = 0.1: true eps = 1.16, reachable by threshold tests with 2000 samples.
    mu, delta = 1.0, 0.1
    true_eps = gaussian_epsilon(mu=mu, delta=delta)
    rng = np.random.default_rng(42)
    reps, violations, naive_violations, bounds = 40, 0, 0, []
    for r in range(reps):
        members, nonmembers = _draw(mu, 2000, rng)
        eps = epsilon_lower_bound(scores_members=members, scores_nonmembers=nonmembers, delta=delta, seed=r)
        bounds.append(eps)
        violations += eps > true_eps
        naive_violations += _naive_max_over_thresholds(members, nonmembers, delta) > true_eps
    assert naive_violations >= reps // 2  # the check has teeth: without CIs the bound overshoots
    assert violations <= 6  # nominal <= 5% of 40 = 2; P(Binomial(40, 0.05) > 6) < 0.02
    assert np.mean(bounds) > 0.4 * true_eps  # and it is not vacuous


def test_identical_distributions_give_zero_most_of_the_time():
    rng = np.random.default_rng(9)
    positives = 0
    for r in range(30):
        members, nonmembers = _draw(0.0, 1000, rng)
        positives += (
            epsilon_lower_bound(scores_members=members, scores_nonmembers=nonmembers, delta=1e-5, seed=r) > 0
        )
    assert positives <= 5  # true eps is 0: any positive bound is a (rare) coverage failure


def test_bound_properties():
    members, nonmembers = _draw(4.0, 3000, np.random.default_rng(1))
    kw = {"scores_members": members, "scores_nonmembers": nonmembers, "seed": 3}
    # larger delta -> smaller bound (the audited guarantee is weaker); perfect separation is capped by n
    assert epsilon_lower_bound(delta=0.1, **kw) <= epsilon_lower_bound(delta=1e-5, **kw)
    perfect = epsilon_lower_bound(
        scores_members=np.ones(1000) * 5, scores_nonmembers=np.zeros(1000), delta=0.0
    )
    # at best FPR_hi = 1 - 0.025^(1/500) with 500 evaluation non-members: eps <= log(1 / that)
    assert perfect == pytest.approx(math.log((1 - (1 - 0.025 ** (1 / 500))) / (1 - 0.025 ** (1 / 500))))
    # bounds are invariant to a monotone transform of the scores
    assert epsilon_lower_bound(delta=1e-5, **kw) == epsilon_lower_bound(
        scores_members=np.exp(members / 4), scores_nonmembers=np.exp(nonmembers / 4), delta=1e-5, seed=3
    )
    # reversed scores (attack with the wrong sign): the complementary test is selected
    rev = empirical_epsilon(scores_members=-members, scores_nonmembers=-nonmembers, delta=1e-5, seed=3)
    fwd = empirical_epsilon(delta=1e-5, **kw)
    assert (rev.direction, fwd.direction) == ("lower", "higher")
    assert rev.epsilon > 3 and rev.epsilon == pytest.approx(fwd.epsilon, abs=0.5)


def test_bad_input():
    with pytest.raises(MetricInputError, match="delta"):
        epsilon_lower_bound(scores_members=[1.0, 2.0], scores_nonmembers=[0.0, 1.0], delta=1.0)
    with pytest.raises(MetricInputError, match="at least 2"):
        epsilon_lower_bound(scores_members=[1.0], scores_nonmembers=[0.0, 1.0], delta=1e-5)
    with pytest.raises(MetricInputError, match="confidence"):
        epsilon_lower_bound(scores_members=[1.0, 2.0], scores_nonmembers=[0.0, 1.0], delta=1e-5, confidence=0)
    with pytest.raises(MetricInputError, match="mu"):
        gaussian_epsilon(mu=0.0, delta=1e-5)
