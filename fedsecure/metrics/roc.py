"""ROC analysis of membership-inference scores: ROC curve, AUC with a bootstrap CI, TPR at low FPR.

Convention (the project's single score convention, see :mod:`fedsecure.attacks.base`):
**higher score = more likely member**. Members are the positive class.

Threat model: none of its own -- these functions score an attack's output against the
ground-truth membership labels. They follow the evaluation practice of Carlini et al.,
"Membership Inference Attacks From First Principles" (IEEE S&P 2022): report the full ROC
on log-log axes and the TPR at low FPR, not only the AUC.

Definitions
-----------
- The ROC curve has one point per *distinct* score value ``t`` (classifier
  "member iff score >= t"), plus the origin (threshold ``+inf``). Tied scores are never
  split: a threshold admits all examples with that score or none. This matches
  ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` exactly.
- AUC is the area under that curve, i.e. the Mann-Whitney probability
  ``P(s_member > s_nonmember) + 0.5 P(s_member = s_nonmember)``.
- ``tpr_at_fpr(fpr=alpha)`` is the **largest TPR over ROC points with FPR <= alpha**
  (non-strict). mimir (Duan et al. 2024, ``run.py``) and the LiRA code use a strict bound,
  ``tpr[np.where(fpr < alpha)[0][-1]]``, which differs when some threshold achieves FPR
  exactly ``alpha`` (for example alpha = 0.01 with 100 or 1000 non-members) and raises
  IndexError at alpha = 0. Here alpha = 0 gives the TPR before the first false positive:
  the fraction of members scoring strictly above every non-member.
- The AUC confidence interval is a percentile bootstrap with stratified resampling
  (members and non-members resampled separately with replacement, each at its own size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from fedsecure.metrics._checks import MetricInputError, as_scores, check_positive_int, check_probability

__all__ = [
    "DEFAULT_FPRS",
    "auc",
    "auc_bootstrap_ci",
    "plot_roc_loglog",
    "roc_curve",
    "summarize_scores",
    "tpr_at_fpr",
]

DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.001, 0.0)
"""The FPR levels reported by :func:`summarize_scores` (keys ``"0.01"``, ``"0.001"``, ``"0.0"``)."""

_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # resampled scores ranked at once (~32 MB of float64)


def _pair(scores_members: Any, scores_nonmembers: Any) -> tuple[np.ndarray, np.ndarray]:
    return (
        as_scores(scores_members, name="scores_members"),
        as_scores(scores_nonmembers, name="scores_nonmembers"),
    )


def _counts(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds) at each distinct score, highest threshold first (no origin)."""
    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    labels = labels[order]
    distinct = np.flatnonzero(np.diff(scores))
    ends = np.concatenate([distinct, [scores.size - 1]])
    tps = np.cumsum(labels)[ends]
    fps = 1.0 + ends - tps
    return fps, tps, scores[ends]


def roc_curve(
    *, scores_members: Any, scores_nonmembers: Any, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a membership score (higher = more likely member).

    Parameters
    ----------
    scores_members, scores_nonmembers
        1-D finite scores of the true members and the true non-members.
    drop_intermediate
        Drop collinear points exactly as scikit-learn does (its default is True, ours False so
        that every achievable threshold is present).

    Returns
    -------
    fpr, tpr, thresholds
        Increasing FPR and TPR, and the decreasing thresholds; the first point is (0, 0) with
        threshold ``+inf``. Point ``i`` is the classifier "member iff score >= thresholds[i]".
    """
    members, nonmembers = _pair(scores_members, scores_nonmembers)
    fps, tps, thresholds = _counts(members, nonmembers)
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(
            np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]])
        )
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.concatenate([[0.0], fps])
    tps = np.concatenate([[0.0], tps])
    thresholds = np.concatenate([[np.inf], thresholds])
    return fps / nonmembers.size, tps / members.size, thresholds


def _auc_from_arrays(members: np.ndarray, nonmembers: np.ndarray) -> float:
    n1, n0 = members.size, nonmembers.size
    ranks = rankdata(np.concatenate([members, nonmembers]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def auc(*, scores_members: Any, scores_nonmembers: Any) -> float:
    """Area under the ROC curve (ties count one half).

    Equal to ``sklearn.metrics.roc_auc_score`` with members labelled 1. Computed from ranks
    (Mann-Whitney U), O(n log n).
    """
    members, nonmembers = _pair(scores_members, scores_nonmembers)
    return _auc_from_arrays(members, nonmembers)


def _bootstrap_aucs(
    members: np.ndarray, nonmembers: np.ndarray, *, num_bootstrap: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n1, n0 = members.size, nonmembers.size
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // (n1 + n0))
    out = np.empty(num_bootstrap)
    for start in range(0, num_bootstrap, chunk):
        b = min(chunk, num_bootstrap - start)
        sample = np.concatenate(
            [members[rng.integers(0, n1, size=(b, n1))], nonmembers[rng.integers(0, n0, size=(b, n0))]],
            axis=1,
        )
        ranks = rankdata(sample, axis=1)
        out[start : start + b] = (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return out


def auc_bootstrap_ci(
    *,
    scores_members: Any,
    scores_nonmembers: Any,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the AUC.

    Members and non-members are resampled separately with replacement (stratified), so every
    replicate keeps both class sizes and the AUC is always defined. The interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the replicate AUCs.

    Parameters
    ----------
    scores_members, scores_nonmembers
        1-D finite scores (higher = more likely member).
    num_bootstrap
        Number of bootstrap replicates (>= 10).
    confidence
        Two-sided confidence level in (0, 1).
    seed
        Seed of the resampling generator (numpy PCG64); the result is deterministic given it.

    Returns
    -------
    (low, high)
    """
    members, nonmembers = _pair(scores_members, scores_nonmembers)
    num_bootstrap = check_positive_int(num_bootstrap, name="num_bootstrap", minimum=10)
    confidence = check_probability(confidence, name="confidence", low_open=True, high_open=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MetricInputError(f"seed: expected an integer, got {seed!r}")
    aucs = _bootstrap_aucs(members, nonmembers, num_bootstrap=num_bootstrap, seed=int(seed))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(aucs, [tail, 1.0 - tail])
    return float(low), float(high)


def _tpr_at_fpr_from_curve(fpr: np.ndarray, tpr: np.ndarray, alpha: float) -> float:
    # fpr[0] == 0 always (the origin), so the mask is never empty.
    return float(tpr[fpr <= alpha].max())


def tpr_at_fpr(*, scores_members: Any, scores_nonmembers: Any, fpr: float) -> float:
    """Largest TPR over ROC points whose FPR is <= ``fpr`` (non-strict).

    Parameters
    ----------
    scores_members, scores_nonmembers
        1-D finite scores (higher = more likely member).
    fpr
        The FPR budget alpha in [0, 1]. ``fpr=0`` gives the TPR before the first false
        positive (members scoring strictly above the highest non-member score).

    Notes
    -----
    Ties are never split (no randomised thresholds): if a member ties with a non-member at
    the threshold, both are admitted together. The resolution is ``1 / num_nonmembers``:
    with fewer than ``1 / fpr`` non-members the result equals ``tpr_at_fpr(fpr=0)``.
    mimir uses ``fpr < alpha`` (strict); see the module docstring.
    """
    alpha = check_probability(fpr, name="fpr", low_open=False, high_open=False)
    fpr_arr, tpr_arr, _ = roc_curve(scores_members=scores_members, scores_nonmembers=scores_nonmembers)
    return _tpr_at_fpr_from_curve(fpr_arr, tpr_arr, alpha)


def summarize_scores(
    *,
    scores_members: Any,
    scores_nonmembers: Any,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> dict[str, Any]:
    """The membership-inference summary stored in ``results.json``.

    Returns
    -------
    dict
        ``{"auc": float, "auc_ci": [low, high], "tpr_at_fpr": {"0.01": ..., "0.001": ...,
        "0.0": ...}, "num_members": int, "num_nonmembers": int}``. The ``tpr_at_fpr`` keys
        are ``str(float(alpha))`` for each alpha in ``fprs``. Plain Python types only
        (JSON-serialisable).
    """
    members, nonmembers = _pair(scores_members, scores_nonmembers)
    alphas = [check_probability(a, name="fprs", low_open=False, high_open=False) for a in fprs]
    fpr_arr, tpr_arr, _ = roc_curve(scores_members=members, scores_nonmembers=nonmembers)
    low, high = auc_bootstrap_ci(
        scores_members=members,
        scores_nonmembers=nonmembers,
        num_bootstrap=num_bootstrap,
        confidence=confidence,
        seed=seed,
    )
    return {
        "auc": _auc_from_arrays(members, nonmembers),
        "auc_ci": [low, high],
        "tpr_at_fpr": {str(a): _tpr_at_fpr_from_curve(fpr_arr, tpr_arr, a) for a in alphas},
        "num_members": int(members.size),
        "num_nonmembers": int(nonmembers.size),
    }


def _roc_figure(results: Mapping[str, tuple[Any, Any]], *, title: str = "") -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared extra
        raise ImportError("plot_roc_loglog needs matplotlib: pip install matplotlib") from exc
    if not results:
        raise MetricInputError("results: is empty; pass at least one name -> (fpr, tpr) curve")
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, curve in results.items():
        try:
            fpr_raw, tpr_raw = curve
        except (TypeError, ValueError) as exc:
            raise MetricInputError(f"results[{name!r}]: expected a pair (fpr, tpr)") from exc
        fpr = as_scores(fpr_raw, name=f"results[{name!r}] fpr")
        tpr = as_scores(tpr_raw, name=f"results[{name!r}] tpr")
        if fpr.shape != tpr.shape:
            raise MetricInputError(
                f"results[{name!r}]: fpr and tpr lengths differ ({fpr.size} vs {tpr.size})"
            )
        if fpr.min() < 0 or fpr.max() > 1 or tpr.min() < 0 or tpr.max() > 1:
            raise MetricInputError(f"results[{name!r}]: fpr and tpr must lie in [0, 1]")
        curves[str(name)] = (fpr, tpr)
    positives = [a[a > 0].min() for pair in curves.values() for a in pair if (a > 0).any()]
    floor = min([1e-3, *positives]) / 2.0  # log axes cannot show 0: zero rates sit on the floor

    fig = Figure(figsize=(5.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (fpr, tpr) in curves.items():
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)) if fpr.size > 1 else float("nan")
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {area:.3f})")
    ax.plot([floor, 1.0], [floor, 1.0], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def plot_roc_loglog(results: Mapping[str, tuple[Any, Any]], path: str | Path, *, title: str = "") -> Path:
    """Write the ROC curves of several attacks on log-log axes to a PNG file.

    Parameters
    ----------
    results
        ``name -> (fpr, tpr)``, e.g. the first two outputs of :func:`roc_curve`.
    path
        Destination PNG; parent directories are created.
    title
        Optional axes title.

    Returns
    -------
    Path
        The written file. Zero rates are drawn at the axis floor (half the smallest positive
        rate shown, at most 5e-4); the dashed diagonal is the chance line. Rendering uses the
        Agg canvas directly and never touches pyplot's global state.
    """
    fig = _roc_figure(results, title=title)
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise MetricInputError(f"path: must end in .png, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
