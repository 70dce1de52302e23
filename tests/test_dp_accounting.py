"""Accounting: ε equals Opacus' own accountants, matches the exact Gaussian-DP curve at q = 1,
calibration meets its target, and invalid parameters give clear errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedsecure.defenses.dp.accounting import (
    DPConfigError,
    calibrate_noise_multiplier,
    check_delta,
    check_epsilon,
    default_delta,
    epsilon_of,
    history_to_json,
    make_accountant,
)


def _opacus_eps(kind: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 0.01, 200), (0.8, 0.125, 40), (2.0, 1.0, 5)])
def test_epsilon_equals_opacus_accountant(kind: str, sigma: float, q: float, steps: int) -> None:
    delta = 1e-5
    ours = epsilon_of([[sigma, q, steps]], delta=delta, accountant=kind)
    assert ours == pytest.approx(_opacus_eps(kind, sigma, q, steps, delta), rel=1e-9)


def _exact_gaussian_eps(sigma: float, steps: int, delta: float) -> float:
    """Full-batch Gaussian mechanism composed `steps` times is mu-GDP, mu = sqrt(steps)/sigma (Dong et al.)."""
    mu = math.sqrt(steps) / sigma

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda e: delta_of(e) - delta, 0.0, 200.0)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 4), (3.0, 50), (0.7, 1)])
def test_full_batch_matches_exact_gdp_curve(sigma: float, steps: int) -> None:
    delta = 1e-5
    exact = _exact_gaussian_eps(sigma, steps, delta)
    prv = epsilon_of([[sigma, 1.0, steps]], delta=delta, accountant="prv")
    rdp = epsilon_of([[sigma, 1.0, steps]], delta=delta, accountant="rdp")
    # PRV reports the upper end of its error interval (eps_error = 0.01): a valid, tight upper bound
    assert exact - 1e-6 <= prv <= exact + 0.03
    # RDP is an upper bound, looser
    assert rdp >= exact - 1e-6


def test_heterogeneous_history_composes() -> None:
    delta = 1e-5
    a = epsilon_of([[1.0, 0.05, 30]], delta=delta, accountant="rdp")
    ab = epsilon_of([[1.0, 0.05, 30], [2.0, 0.1, 30]], delta=delta, accountant="rdp")
    acc = RDPAccountant()
    acc.history = [(1.0, 0.05, 30), (2.0, 0.1, 30)]
    assert ab == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    assert ab > a


def test_edge_histories() -> None:
    assert epsilon_of([], delta=1e-5, accountant="prv") == 0.0
    assert epsilon_of([[0.0, 0.1, 3]], delta=1e-5, accountant="prv") == math.inf
    assert epsilon_of([[1.0, 0.1, 0]], delta=1e-5, accountant="rdp") == 0.0


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibration_meets_target_tightly(kind: str) -> None:
    target, delta, q, steps = 3.0, 1e-5, 0.02, 150
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant=kind
    )
    eps = epsilon_of([[sigma, q, steps]], delta=delta, accountant=kind)
    assert eps <= target
    assert eps >= target - 0.05  # Opacus' bisection tolerance is 0.01 in ε
    # 5% less noise would overshoot: the σ is not wastefully large
    assert epsilon_of([[sigma * 0.95, q, steps]], delta=delta, accountant=kind) > target


def test_calibration_inf_means_no_noise() -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=math.inf, target_delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp"
    )
    assert sigma == 0.0


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(0.001, 0.5),
    steps=st.integers(1, 300),
)
def test_more_noise_never_costs_more_privacy(sigma: float, q: float, steps: int) -> None:
    e1 = epsilon_of([[sigma, q, steps]], delta=1e-5, accountant="rdp")
    e2 = epsilon_of([[sigma * 1.5, q, steps]], delta=1e-5, accountant="rdp")
    e3 = epsilon_of([[sigma, q, steps + 10]], delta=1e-5, accountant="rdp")
    assert e2 <= e1 + 1e-9
    assert e3 >= e1 - 1e-9


def test_history_json_round_trip() -> None:
    acc = make_accountant("prv", [[1.0, 0.1, 5]])
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.step(noise_multiplier=2.0, sample_rate=0.1)
    js = history_to_json(acc.history)
    assert js == [[1.0, 0.1, 6], [2.0, 0.1, 1]]
    assert make_accountant("prv", js).history == acc.history


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "8", True])
def test_invalid_epsilon(bad: object) -> None:
    with pytest.raises(DPConfigError, match="target_epsilon"):
        check_epsilon(bad)  # type: ignore[arg-type]


def test_delta_checks() -> None:
    with pytest.raises(DPConfigError, match=r"target_delta is required.*N = 1000"):
        check_delta(None, num_units=1000)
    with pytest.raises(DPConfigError, match=r">= 1/N = 0\.001.*N = 1000 examples"):
        check_delta(1e-3, num_units=1000)
    with pytest.raises(DPConfigError, match="in \\(0, 1\\)"):
        check_delta(0.0, num_units=1000)
    assert check_delta(1e-5, num_units=1000) == 1e-5
    for n in (2, 10, 1000, 10**6):
        assert default_delta(n) < 1.0 / n


def test_calibration_impossible_budget_is_a_clear_error() -> None:
    with pytest.raises(DPConfigError, match="raise target_epsilon"):
        calibrate_noise_multiplier(
            target_epsilon=1e-7, target_delta=1e-10, sample_rate=1.0, steps=10**6, accountant="rdp"
        )
