"""Metrics for privacy evaluations: ROC/AUC/TPR@FPR with CIs, the blind baseline, exposure,
empirical epsilon, and text overlap. Pure numpy/scipy (matplotlib only for plots).

Score conventions: membership scores are "higher = more likely member"
(:mod:`fedsecure.metrics.roc`, :mod:`fedsecure.metrics.empirical_eps`); exposure takes
log-perplexities, "lower = more likely" (:mod:`fedsecure.metrics.exposure`).
See docs/metrics.md.
"""

from fedsecure.metrics._checks import MetricInputError
from fedsecure.metrics.baseline import (
    BagOfWordsTfidf,
    L2LogisticRegression,
    blind_baseline,
    blind_baseline_scores,
)
from fedsecure.metrics.empirical_eps import (
    EmpiricalEpsilon,
    clopper_pearson_upper,
    empirical_epsilon,
    epsilon_lower_bound,
    gaussian_epsilon,
)
from fedsecure.metrics.exposure import SkewNormalFit, exposure_by_rank, exposure_skew_normal
from fedsecure.metrics.roc import (
    DEFAULT_FPRS,
    auc,
    auc_bootstrap_ci,
    plot_roc_loglog,
    roc_curve,
    summarize_scores,
    tpr_at_fpr,
)
from fedsecure.metrics.text import (
    ROUGE_TYPES,
    TokenOverlap,
    exact_match,
    hungarian_match,
    matched_text_scores,
    pii_recovery_rate,
    rouge_f1,
    rouge_matrix,
    token_precision_recall,
)

__all__ = [
    "DEFAULT_FPRS",
    "ROUGE_TYPES",
    "BagOfWordsTfidf",
    "EmpiricalEpsilon",
    "L2LogisticRegression",
    "MetricInputError",
    "SkewNormalFit",
    "TokenOverlap",
    "auc",
    "auc_bootstrap_ci",
    "blind_baseline",
    "blind_baseline_scores",
    "clopper_pearson_upper",
    "empirical_epsilon",
    "epsilon_lower_bound",
    "exact_match",
    "exposure_by_rank",
    "exposure_skew_normal",
    "gaussian_epsilon",
    "hungarian_match",
    "matched_text_scores",
    "pii_recovery_rate",
    "plot_roc_loglog",
    "roc_curve",
    "rouge_f1",
    "rouge_matrix",
    "summarize_scores",
    "token_precision_recall",
    "tpr_at_fpr",
]
