"""Secure noise primitives: exact discrete Gaussian pmf, hardened Gaussian moments, CSPRNG use.

The samplers read os.urandom and cannot be seeded, so the statistical tests use bounds
whose false-failure probability is below 1e-6.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from fedsecure._hazmat import noise
from fedsecure._hazmat.noise import (
    SecureRandom,
    discrete_gaussian,
    distributed_discrete_gaussian_tau,
    secure_bernoulli_mask,
    secure_gaussian,
)


def _dg_pmf(var: float, support: np.ndarray) -> np.ndarray:
    w = np.exp(-(support.astype(float) ** 2) / (2 * var))
    big = np.arange(-60, 61)
    return w / np.exp(-(big.astype(float) ** 2) / (2 * var)).sum()


@pytest.mark.parametrize("var", [Fraction(1, 2), 2, Fraction(37, 10)])
def test_discrete_gaussian_matches_exact_pmf(var: Fraction | int) -> None:
    n = 20000
    xs = discrete_gaussian(var, n)
    assert xs.dtype == np.int64
    support = np.arange(-6, 7)
    pmf = _dg_pmf(float(var), support)
    observed = np.array([(xs == k).sum() for k in support], dtype=float)
    expected = pmf * n
    tail_obs = n - observed.sum()
    tail_exp = n - expected.sum()
    keep = expected > 5
    obs = np.append(observed[keep], tail_obs + observed[~keep].sum())
    exp = np.append(expected[keep], tail_exp + expected[~keep].sum())
    _, p = stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert p > 1e-6, f"chi-square p = {p:.2e}"


def test_discrete_gaussian_large_variance_moments() -> None:
    var = 10**6
    xs = discrete_gaussian(var, 8000).astype(float)
    # mean: sd of the sample mean is 1000/sqrt(8000) ~ 11.2 -> 6 sd = 67
    assert abs(xs.mean()) < 67
    # variance: relative sd ~ sqrt(2/8000) = 1.6% -> 6 sd ~ 9.5%
    assert abs(xs.var() / var - 1) < 0.095


def test_discrete_gaussian_refuses_inexact_or_bad_variance() -> None:
    with pytest.raises(TypeError, match="exact variance"):
        discrete_gaussian(2.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="> 0"):
        discrete_gaussian(0, 3)


def test_secure_gaussian_moments_and_shape() -> None:
    std = 0.37
    x = secure_gaussian((400, 250), std=std)
    assert x.shape == (400, 250) and x.dtype == np.float64
    flat = x.ravel() / std
    n = flat.size
    assert abs(flat.mean()) < 6 / math.sqrt(n)
    assert abs(flat.var() - 1) < 6 * math.sqrt(2 / n)
    # Gaussian shape: Kolmogorov-Smirnov against N(0, 1)
    assert stats.kstest(flat[:20000], "norm").pvalue > 1e-6
    assert np.all(secure_gaussian(5, std=0.0) == 0)


def test_secure_samplers_use_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = noise.os.urandom

    def spy(k: int) -> bytes:
        calls.append(k)
        return real(k)

    monkeypatch.setattr(noise.os, "urandom", spy)
    secure_gaussian(10, std=1.0)
    discrete_gaussian(3, 5)
    secure_bernoulli_mask(10, 0.5)
    assert len(calls) >= 3
    # and two draws differ (no hidden fixed seed)
    assert not np.array_equal(secure_gaussian(50, std=1.0), secure_gaussian(50, std=1.0))


def test_randbelow_is_uniform() -> None:
    rng = SecureRandom()
    n = 7
    draws = np.array([rng.randbelow(n) for _ in range(14000)])
    counts = np.bincount(draws, minlength=n)
    assert counts.sum() == 14000 and draws.max() < n
    assert stats.chisquare(counts).pvalue > 1e-6
    assert rng.randbelow(1) == 0


def test_bernoulli_mask_rate() -> None:
    p = 0.03
    m = secure_bernoulli_mask(200000, p)
    sd = math.sqrt(p * (1 - p) / m.size)
    assert abs(m.mean() - p) < 6 * sd
    assert not secure_bernoulli_mask(1000, 0.0).any()
    assert secure_bernoulli_mask(1000, 1.0).all()


def test_distributed_tau_is_negligible_for_realistic_grids() -> None:
    # exp(-2 pi^2 var k/(k+1)) summed: ~1e-42 at var = 10 grid units
    assert distributed_discrete_gaussian_tau(10.0, 100) < 1e-40
    assert distributed_discrete_gaussian_tau(5.0, 1) == 0.0
    assert distributed_discrete_gaussian_tau(1.0, 2) > 1e-9  # too coarse: dp-fedavg would refuse it
