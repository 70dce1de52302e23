"""Cryptographically secure noise for differential privacy (raw primitives, no public API).

Every random bit here comes from the operating system's CSPRNG (``os.urandom``, the
source behind :mod:`secrets`); nothing uses ``random``, ``numpy.random`` or torch's
generators, and nothing can be seeded. Two samplers, with different guarantees:

``discrete_gaussian`` -- exact.
    The discrete Gaussian N_Z(0, sigma^2) on the integers, sampled exactly with rational
    arithmetic by the rejection sampler of Canonne, Kamath and Steinke, "The Discrete
    Gaussian for Differential Privacy", NeurIPS 2020 (Algorithms 1-3). Python integers
    and :class:`fractions.Fraction` only: no floating point touches the sample, so the
    floating-point attacks on textbook samplers (Mironov, CCS 2012) do not apply. For an
    integer-valued query with L2 sensitivity Delta it gives (Delta/sigma)^2/2-zCDP, the
    same as the continuous Gaussian (CKS20, Thm. 4 and Cor. 9). About 7 us per sample.

``secure_gaussian`` -- fast, floating point.
    Continuous N(0, std^2) in float64 by the Box-Muller transform of 53-bit uniforms,
    hardened as in Holohan and Braghin, "Secure random sampling in differential
    privacy", ESORICS 2021 (arXiv:2107.10138, sec. 5.1): each output is the sum of 2n = 4
    independent Gaussians divided by 2, so reconstructing the uniforms from one output
    needs a search over about 2^(53*(2n-1)) = 2^159 values. This is the guarantee Opacus'
    ``secure_mode`` gives with torchcsprng; it is a mitigation, not an exact DP proof.

Threat model: the adversary sees the noisy outputs (and, for DP-SGD, every released
model) but not the OS entropy pool. Reproducibility is deliberately impossible.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

__all__ = [
    "SecureRandom",
    "discrete_gaussian",
    "distributed_discrete_gaussian_tau",
    "secure_bernoulli_mask",
    "secure_gaussian",
]

_BUFFER_BYTES = 1 << 16


class SecureRandom:
    """Uniform integers from ``os.urandom``, buffered (rejection sampling, no modulo bias)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def _take(self, nbytes: int) -> bytes:
        if self._pos + nbytes > len(self._buf):
            self._buf = os.urandom(max(_BUFFER_BYTES, nbytes))
            self._pos = 0
        out = self._buf[self._pos : self._pos + nbytes]
        self._pos += nbytes
        return out

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)`` (``n >= 1``)."""
        if n <= 0:
            raise ValueError(f"randbelow needs n >= 1, got {n}")
        if n == 1:
            return 0
        k = (n - 1).bit_length()
        nbytes = (k + 7) // 8
        drop = nbytes * 8 - k
        while True:
            r = int.from_bytes(self._take(nbytes), "little") >> drop
            if r < n:
                return r

    def uint64(self, count: int) -> np.ndarray:
        """``count`` uniform 64-bit words (fresh from ``os.urandom``, not the buffer)."""
        return np.frombuffer(os.urandom(8 * count), dtype=np.uint64).copy()

    def uniform53(self, count: int) -> np.ndarray:
        """``count`` uniforms on the grid ``{1, 2, ..., 2^53} / 2^53`` (never 0), float64."""
        return ((self.uint64(count) >> np.uint64(11)).astype(np.float64) + 1.0) * (2.0**-53)


# --------------------------------------------------------------------------------------
# Exact discrete Gaussian (Canonne, Kamath, Steinke 2020)
# --------------------------------------------------------------------------------------
def _bernoulli_exp_le1(rng: SecureRandom, num: int, den: int) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num/den <= 1 (CKS20 Algorithm 1, first case)."""
    k = 1
    while rng.randbelow(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _bernoulli_exp(rng: SecureRandom, num: int, den: int) -> bool:
    """Bernoulli(exp(-num/den)) for any num/den >= 0 (CKS20 Algorithm 1)."""
    while num > den:
        if not _bernoulli_exp_le1(rng, 1, 1):
            return False
        num -= den
    return _bernoulli_exp_le1(rng, num, den)


def _discrete_laplace(rng: SecureRandom, t: int) -> int:
    """Discrete Laplace with scale t: P(y) proportional to exp(-|y|/t) (CKS20 Algorithm 2)."""
    while True:
        u = rng.randbelow(t)
        if not _bernoulli_exp(rng, u, t):
            continue
        v = 0
        while _bernoulli_exp_le1(rng, 1, 1):
            v += 1
        x = u + t * v
        negative = rng.randbelow(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _discrete_gaussian_one(rng: SecureRandom, var: Fraction) -> int:
    """One exact sample of N_Z(0, var) (CKS20 Algorithm 3)."""
    num, den = var.numerator, var.denominator
    t = math.isqrt(num // den) + 1  # floor(sigma) + 1
    while True:
        y = _discrete_laplace(rng, t)
        # accept with prob exp(-(|y| - var/t)^2 / (2 var)), as an exact rational
        a = abs(y) * t * den - num
        if _bernoulli_exp(rng, a * a, 2 * t * t * den * num):
            return y


def discrete_gaussian(variance: int | Fraction, size: int, *, rng: SecureRandom | None = None) -> np.ndarray:
    """``size`` exact samples of the discrete Gaussian N_Z(0, variance), as int64.

    Parameters
    ----------
    variance:
        sigma^2 as an integer or a :class:`~fractions.Fraction` (exact; a float is refused
        so that the caller states the rounding). Must be > 0.
    size:
        Number of independent samples.
    rng:
        Optional :class:`SecureRandom` (a fresh one by default).
    """
    if isinstance(variance, float) or not isinstance(variance, int | Fraction):
        raise TypeError("discrete_gaussian needs an exact variance (int or Fraction), not a float")
    var = Fraction(variance)
    if var <= 0:
        raise ValueError(f"discrete_gaussian variance must be > 0, got {var}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rng = rng or SecureRandom()
    out = [_discrete_gaussian_one(rng, var) for _ in range(size)]
    if out and max(abs(v) for v in out) >= 2**62:
        raise OverflowError("discrete Gaussian sample does not fit in int64; use a smaller variance")
    return np.asarray(out, dtype=np.int64)


def distributed_discrete_gaussian_tau(variance: float, num_shares: int) -> float:
    """tau of Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism", ICML 2021, Thm. 1.

    For n shares X_i ~ N_Z(0, variance) (variance >= 1/4) summed per coordinate, and an
    integer shift with ||Delta||_2 <= D2 and ||Delta||_1 <= D1, the sum is (eps^2/2)-zCDP with
    eps = min(sqrt(D2^2 / (n var) + tau d / 2), D2 / sqrt(n var) + tau D1) where
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 var k / (k+1)). For var of a few grid units
    tau is astronomically small and the sum is as private as one N_Z(0, n var) sample.
    """
    if num_shares <= 1:
        return 0.0
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * variance * k / (k + 1)) for k in range(1, num_shares))


# --------------------------------------------------------------------------------------
# Fast hardened continuous Gaussian (Holohan & Braghin 2021)
# --------------------------------------------------------------------------------------
_HB_N = 2  # 2n = 4 Gaussians per output


def secure_gaussian(shape: tuple[int, ...] | int, *, std: float, rng: SecureRandom | None = None) -> np.ndarray:
    """N(0, std^2) samples of ``shape`` in float64 from the OS CSPRNG, floating-point hardened.

    Each output is (g_1 + g_2 + g_3 + g_4) / 2 with g_i ~ N(0, std^2) independent
    Box-Muller samples from 53-bit CSPRNG uniforms (Holohan & Braghin 2021, n = 2).
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(shape)) if shape else 1
    if std == 0 or count == 0:
        return np.zeros(shape, dtype=np.float64)
    rng = rng or SecureRandom()
    total = np.zeros(count, dtype=np.float64)
    for _ in range(_HB_N):  # each Box-Muller pair gives two independent Gaussians
        u1 = rng.uniform53(count)
        u2 = rng.uniform53(count)
        r = np.sqrt(-2.0 * np.log(u1))
        theta = (2.0 * np.pi) * u2
        total += r * np.cos(theta)
        total += r * np.sin(theta)
    return (total * (std / 2.0)).reshape(shape)


def secure_bernoulli_mask(count: int, p: float, *, rng: SecureRandom | None = None) -> np.ndarray:
    """``count`` independent Bernoulli(p') draws from the OS CSPRNG (Poisson sampling).

    p' = ceil(p * 2^53) / 2^53, i.e. p rounded up to the 53-bit grid (|p' - p| < 2^-53).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = rng or SecureRandom()
    threshold = np.uint64(math.ceil(p * 2.0**53))
    return (rng.uint64(count) >> np.uint64(11)) < threshold
