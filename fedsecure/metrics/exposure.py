"""Secret Sharer exposure of an inserted canary.

Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", USENIX Security 2019.

Threat model: an auditor who inserted a canary ``s[r]`` (a format with a random secret ``r``
drawn from a randomness space ``R``) into the training data and can query the trained model
for the log-perplexity of any candidate ``s[r']``. Exposure measures how much more likely the
model finds the inserted canary than the other candidates.

Score convention (differs from the ROC convention!): the inputs are **log-perplexities**
(e.g. the summed or mean token negative log-likelihood, natural log or any fixed base), so
**lower = more likely**. Do not pass membership scores (higher = member) here; negate them.

``candidate_scores`` are the log-perplexities of the *other* candidates only -- the canary
itself is **not** included in it. The candidate set is ``R = {canary} U candidates``, so
``|R| = len(candidate_scores) + 1``.

- :func:`exposure_by_rank` (Definition 4 of the paper): ``log2 |R| - log2 rank``, where
  ``rank = |{r' in R : Px(s[r']) <= Px(s[r])}|`` counts the canary itself and every
  candidate at least as likely (ties count against the canary, as in the paper's ``<=``).
  Range ``[0, log2 |R|]``; the maximum ``log2 |R|`` means the canary is strictly the most
  likely. With a *sample* of R the maximum is the sample's ``log2 |R|`` -- use the
  skew-normal estimate to measure beyond it.
- :func:`exposure_skew_normal` (Section 4.3 of the paper, "approximation by distribution
  modelling"): fit a skew-normal to the candidates' log-perplexities and return
  ``-log2 CDF(canary score)``, i.e. ``-log2 Pr_{t ~ fit}[t <= Px(s[r])]``. It extrapolates
  beyond ``log2 |R|`` and is what makes exposure measurable for large randomness spaces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import integrate, special
from scipy.stats import skewnorm

from fedsecure.metrics._checks import MetricInputError, as_scores

__all__ = ["MIN_CANDIDATES_FOR_FIT", "SkewNormalFit", "exposure_by_rank", "exposure_skew_normal"]

MIN_CANDIDATES_FOR_FIT = 20
"""The fewest candidate scores :func:`exposure_skew_normal` accepts (three parameters are fitted)."""


def _canary(value: Any) -> float:
    if isinstance(value, bool):
        raise MetricInputError("canary_score: expected a real number (the canary's log-perplexity), got bool")
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(
            f"canary_score: expected a real number (the canary's log-perplexity), got {value!r}"
        ) from exc
    if not math.isfinite(out):
        raise MetricInputError(f"canary_score: must be finite, got {out!r}")
    return out


def exposure_by_rank(*, canary_score: float, candidate_scores: Any) -> float:
    """Rank-based exposure ``log2 |R| - log2 rank`` in bits.

    Parameters
    ----------
    canary_score
        Log-perplexity of the inserted canary (lower = more likely).
    candidate_scores
        Log-perplexities of the other candidates, *excluding* the canary; ``|R|`` is
        ``len(candidate_scores) + 1``.

    Returns
    -------
    float
        Exposure in ``[0, log2 |R|]``. ``rank`` is 1 plus the number of candidates whose
        log-perplexity is <= the canary's (ties count against the canary).
    """
    canary = _canary(canary_score)
    candidates = as_scores(candidate_scores, name="candidate_scores")
    rank = 1 + int(np.count_nonzero(candidates <= canary))
    return math.log2(candidates.size + 1) - math.log2(rank)


class SkewNormalFit:
    """A skew-normal fitted to candidate log-perplexities (``scipy.stats.skewnorm.fit``).

    Attributes
    ----------
    shape, loc, scale
        The fitted parameters (``a``, ``loc``, ``scale`` of ``scipy.stats.skewnorm``).
    """

    def __init__(self, *, candidate_scores: Any) -> None:
        scores = as_scores(candidate_scores, name="candidate_scores")
        if scores.size < MIN_CANDIDATES_FOR_FIT:
            raise MetricInputError(
                f"candidate_scores: the skew-normal fit needs at least {MIN_CANDIDATES_FOR_FIT} candidates, "
                f"got {scores.size}; score more candidates or use exposure_by_rank"
            )
        if np.ptp(scores) == 0.0:
            raise MetricInputError(
                "candidate_scores: all candidates have the same score, so no distribution can be fitted; "
                "check that the candidates differ (distinct random secrets) and are scored by the model"
            )
        shape, loc, scale = skewnorm.fit(scores)
        self.shape = float(shape)
        self.loc = float(loc)
        self.scale = float(scale)

    def log_cdf(self, x: float) -> float:
        """Natural log of the fitted CDF at ``x``, accurate deep in the lower tail.

        scipy's ``logcdf`` underflows to ``-inf`` once the CDF drops below ~1e-308; there the
        value is computed as ``log pdf(z) + log integral_{-inf}^{z} pdf(t) / pdf(z) dt`` with the
        log-density evaluated through ``log_ndtr`` (no underflow).
        """
        z = (x - self.loc) / self.scale
        value = float(skewnorm.logcdf(z, self.shape))
        if math.isfinite(value):
            return value
        a = self.shape

        def log_pdf(t: float) -> float:
            return (
                math.log(2.0) - 0.5 * t * t - 0.5 * math.log(2.0 * math.pi) + float(special.log_ndtr(a * t))
            )

        anchor = log_pdf(z)
        ratio, _ = integrate.quad(
            lambda t: math.exp(log_pdf(t) - anchor), -np.inf, z, epsabs=0.0, epsrel=1e-10, limit=200
        )
        if not ratio > 0.0:  # pragma: no cover - defensive; quad of a positive integrand
            return -math.inf
        return anchor + math.log(ratio)


def exposure_skew_normal(*, canary_score: float, candidate_scores: Any) -> float:
    """Exposure estimated by fitting a skew-normal to the candidates: ``-log2 CDF(canary)``.

    Parameters
    ----------
    canary_score
        Log-perplexity of the inserted canary (lower = more likely).
    candidate_scores
        Log-perplexities of a random sample of other candidates (canary excluded), at least
        :data:`MIN_CANDIDATES_FOR_FIT`; a few thousand give a stable tail.

    Returns
    -------
    float
        Exposure in bits, >= 0; not capped by the number of candidates. Values far beyond
        ``log2(len(candidate_scores))`` are extrapolations of the fitted tail and only as good
        as the skew-normal model of the candidates' distribution.
    """
    canary = _canary(canary_score)
    fit = SkewNormalFit(candidate_scores=candidate_scores)
    return max(0.0, -fit.log_cdf(canary) / math.log(2.0))
