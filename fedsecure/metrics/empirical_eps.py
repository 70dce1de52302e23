"""Empirical lower bound on epsilon from a membership attack's scores.

Jagielski, Ullman, Oprea, "Auditing Differentially Private Machine Learning: How Private is
Private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot, Carlini, "Adversary
Instantiation: Lower Bounds for Differentially Private Machine Learning", IEEE S&P 2021.

Threat model: an auditor who knows which examples were members and holds an attack score
for each (higher = more likely member). If the training mechanism is (epsilon, delta)-DP,
every test "member iff score >= t" must satisfy (hypothesis-testing view of DP, Kairouz et
al. 2015)::

    FPR + e^eps * FNR >= 1 - delta   and   FNR + e^eps * FPR >= 1 - delta,

hence ``eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))``. Replacing the
true error rates with upper confidence bounds keeps the inequality valid with the stated
confidence.

Statistical procedure (what makes the bound honest)
---------------------------------------------------
1. **Held-out threshold selection** (not Bonferroni). Members and non-members are split at
   random (seeded, stratified) into a *selection* part and an *evaluation* part. The threshold
   and its direction ("member iff score >= t" or the complement "score < t") are chosen on
   the selection part only (the test whose Clopper-Pearson bound, computed on the selection
   part, is largest). Choosing the best of many thresholds on the same data
   that certifies it would overstate the bound; a Bonferroni correction over all n
   data-dependent thresholds is both not strictly valid (the thresholds are themselves
   random) and much looser.
2. On the evaluation part, one-sided Clopper-Pearson upper bounds on FPR and on FNR, each at
   level ``(1 - confidence) / 2`` (union bound), so both hold together with probability at
   least ``confidence``; both formulas above use these bounds, so the returned value is a
   valid lower bound on epsilon with probability >= ``confidence``.
3. The result is clipped at 0.

Caveat: the Clopper-Pearson bounds treat each score as an independent trial of the
membership game. That is exact when every score comes from an independently trained model
(the multi-run audits of Jagielski et al. and Nasr et al.). In the one-run setting (many
members and non-members scored against one model, as ML-Privacy-Meter does) the trials are
not independent; Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023) give the rigorous one-run analysis. Read one-run figures as an audit
heuristic, not a certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy.stats import beta

from fedsecure.metrics._checks import MetricInputError, as_scores, check_probability

__all__ = [
    "EmpiricalEpsilon",
    "clopper_pearson_upper",
    "empirical_epsilon",
    "epsilon_lower_bound",
    "gaussian_epsilon",
]


def clopper_pearson_upper(*, errors: Any, trials: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper confidence bound on a binomial rate.

    Parameters
    ----------
    errors
        Observed error counts (scalar or array), each in ``[0, trials]``.
    trials
        Number of trials (>= 1).
    alpha
        Miscoverage in (0, 1): ``P(rate <= bound) >= 1 - alpha``.

    Returns
    -------
    numpy.ndarray
        ``Beta.ppf(1 - alpha, k + 1, n - k)`` (1 where ``k = n``), same shape as ``errors``.
    """
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise MetricInputError(f"trials: must be an integer >= 1, got {trials!r}")
    alpha = check_probability(alpha, name="alpha", low_open=True, high_open=True)
    k = np.asarray(errors, dtype=np.float64)
    if np.any(k < 0) or np.any(k > trials) or np.any(k != np.round(k)):
        raise MetricInputError(f"errors: must be integer counts in [0, {trials}]")
    full = k >= trials
    upper = beta.ppf(1.0 - alpha, k + 1.0, np.where(full, 1.0, trials - k))
    return np.where(full, 1.0, upper)


def _eps_from_rates(fpr_hi: np.ndarray, fnr_hi: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fnr_hi, 0.0)) - np.log(fpr_hi)
        b = np.log(np.maximum(1.0 - delta - fpr_hi, 0.0)) - np.log(fnr_hi)
    out = np.maximum(np.nan_to_num(a, nan=-np.inf), np.nan_to_num(b, nan=-np.inf))
    return np.maximum(out, 0.0)


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """The outcome of :func:`empirical_epsilon`.

    Attributes
    ----------
    epsilon: the lower bound (>= 0), valid with probability >= ``confidence``.
    threshold: the score threshold chosen on the selection part.
    direction: ``"higher"`` for the test "member iff score >= threshold", ``"lower"`` for its
        complement "member iff score < threshold" (an attack whose sign is reversed).
    fpr_upper, fnr_upper: Clopper-Pearson upper bounds on the evaluation part at that threshold.
    false_positives, false_negatives: the counts behind them.
    num_eval_members, num_eval_nonmembers: sizes of the evaluation part.
    delta, confidence: the inputs.
    method: ``"holdout-clopper-pearson"``.
    """

    epsilon: float
    threshold: float
    direction: str
    fpr_upper: float
    fnr_upper: float
    false_positives: int
    false_negatives: int
    num_eval_members: int
    num_eval_nonmembers: int
    delta: float
    confidence: float
    method: str = "holdout-clopper-pearson"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "epsilon": self.epsilon,
            "threshold": self.threshold,
            "direction": self.direction,
            "fpr_upper": self.fpr_upper,
            "fnr_upper": self.fnr_upper,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "num_eval_members": self.num_eval_members,
            "num_eval_nonmembers": self.num_eval_nonmembers,
            "delta": self.delta,
            "confidence": self.confidence,
            "method": self.method,
        }


def _split(values: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(values.size)
    cut = min(max(1, round(fraction * values.size)), values.size - 1)
    return values[perm[:cut]], values[perm[cut:]]


def empirical_epsilon(
    *,
    scores_members: Any,
    scores_nonmembers: Any,
    delta: float,
    confidence: float = 0.95,
    selection_fraction: float = 0.5,
    seed: int = 0,
) -> EmpiricalEpsilon:
    """Lower bound on epsilon with held-out threshold selection and Clopper-Pearson bounds.

    Parameters
    ----------
    scores_members, scores_nonmembers
        Attack scores (higher = more likely member), at least 2 of each.
    delta
        The delta of the (epsilon, delta) guarantee being audited, in [0, 1).
    confidence
        Probability that the returned bound does not exceed the true epsilon, in (0, 1).
    selection_fraction
        Fraction of each class used to choose the threshold; the rest certifies it.
    seed
        Seed of the (non-secret) random split.

    Returns
    -------
    EmpiricalEpsilon
    """
    members = as_scores(scores_members, name="scores_members")
    nonmembers = as_scores(scores_nonmembers, name="scores_nonmembers")
    for name, arr in (("scores_members", members), ("scores_nonmembers", nonmembers)):
        if arr.size < 2:
            raise MetricInputError(
                f"{name}: needs at least 2 scores (one to select the threshold, one to evaluate it), "
                f"got {arr.size}"
            )
    delta = check_probability(delta, name="delta", low_open=False, high_open=True)
    confidence = check_probability(confidence, name="confidence", low_open=True, high_open=True)
    selection_fraction = check_probability(
        selection_fraction, name="selection_fraction", low_open=True, high_open=True
    )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MetricInputError(f"seed: expected an integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    sel_m, eval_m = _split(members, selection_fraction, rng)
    sel_n, eval_n = _split(nonmembers, selection_fraction, rng)
    half_alpha = (1.0 - confidence) / 2.0

    # Selection: every distinct selection score as a threshold "member iff score >= t".
    thresholds = np.unique(np.concatenate([sel_m, sel_n]))
    fp_sel = sel_n.size - np.searchsorted(np.sort(sel_n), thresholds, side="left")
    fn_sel = np.searchsorted(np.sort(sel_m), thresholds, side="left")
    # The complementary test "member iff score < t" swaps errors: FP' = n0 - FP, FN' = n1 - FN.
    fp_all = np.concatenate([fp_sel, sel_n.size - fp_sel])
    fn_all = np.concatenate([fn_sel, sel_m.size - fn_sel])
    eps_sel = _eps_from_rates(
        clopper_pearson_upper(errors=fp_all, trials=sel_n.size, alpha=half_alpha),
        clopper_pearson_upper(errors=fn_all, trials=sel_m.size, alpha=half_alpha),
        delta,
    )
    best = int(np.argmax(eps_sel))
    threshold = float(thresholds[best % thresholds.size])
    direction = "higher" if best < thresholds.size else "lower"

    # Certification on the held-out part at the single chosen test.
    if direction == "higher":
        fp = int(np.count_nonzero(eval_n >= threshold))
        fn = int(np.count_nonzero(eval_m < threshold))
    else:
        fp = int(np.count_nonzero(eval_n < threshold))
        fn = int(np.count_nonzero(eval_m >= threshold))
    fpr_hi = float(clopper_pearson_upper(errors=fp, trials=eval_n.size, alpha=half_alpha))
    fnr_hi = float(clopper_pearson_upper(errors=fn, trials=eval_m.size, alpha=half_alpha))
    eps = float(_eps_from_rates(np.array(fpr_hi), np.array(fnr_hi), delta))
    return EmpiricalEpsilon(
        epsilon=eps,
        threshold=threshold,
        direction=direction,
        fpr_upper=fpr_hi,
        fnr_upper=fnr_hi,
        false_positives=fp,
        false_negatives=fn,
        num_eval_members=int(eval_m.size),
        num_eval_nonmembers=int(eval_n.size),
        delta=delta,
        confidence=confidence,
    )


def epsilon_lower_bound(
    *,
    scores_members: Any,
    scores_nonmembers: Any,
    delta: float,
    confidence: float = 0.95,
    selection_fraction: float = 0.5,
    seed: int = 0,
) -> float:
    """The epsilon of :func:`empirical_epsilon` (same parameters); a float >= 0."""
    return empirical_epsilon(
        scores_members=scores_members,
        scores_nonmembers=scores_nonmembers,
        delta=delta,
        confidence=confidence,
        selection_fraction=selection_fraction,
        seed=seed,
    ).epsilon


def _gaussian_delta(eps: float, mu: float) -> float:
    return float(special.ndtr(-eps / mu + mu / 2.0) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2.0)))


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of the Gaussian mechanism with sensitivity/sigma ratio ``mu``.

    Balle and Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018
    (Theorem 8): ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``; this solves
    ``delta(eps) = delta`` for ``eps >= 0``. It is also the privacy curve of distinguishing
    N(0, 1) from N(mu, 1) -- the reference the tests audit :func:`epsilon_lower_bound` against.
    """
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating, np.integer)):
        raise MetricInputError(f"mu: expected a positive real number, got {mu!r}")
    mu = float(mu)
    if not (math.isfinite(mu) and mu > 0.0):
        raise MetricInputError(f"mu: must be a finite number > 0, got {mu!r}")
    delta = check_probability(delta, name="delta", low_open=True, high_open=True)
    if _gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while _gaussian_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: _gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))
