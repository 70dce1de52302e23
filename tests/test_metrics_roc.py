"""ROC / AUC / TPR@FPR / bootstrap CI against scikit-learn and hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fedsecure.metrics import (
    MetricInputError,
    auc,
    auc_bootstrap_ci,
    plot_roc_loglog,
    roc_curve,
    summarize_scores,
    tpr_at_fpr,
)
from fedsecure.metrics.roc import _roc_figure

# Scores drawn from a few values force ties; the float strategy exercises arbitrary values.
tied_scores = st.lists(st.integers(min_value=-3, max_value=3).map(float), min_size=1, max_size=40)
float_scores = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=40
)
any_scores = st.one_of(tied_scores, float_scores)


def _sk(members, nonmembers, **kw):
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    s = np.r_[members, nonmembers]
    return sk_roc_curve(y, s, **kw), roc_auc_score(y, s)


@settings(max_examples=200, deadline=None)
@given(members=any_scores, nonmembers=any_scores)
def test_roc_curve_and_auc_match_sklearn(members, nonmembers):
    for drop in (False, True):
        (fpr_sk, tpr_sk, thr_sk), auc_sk = _sk(members, nonmembers, drop_intermediate=drop)
        fpr, tpr, thr = roc_curve(
            scores_members=members, scores_nonmembers=nonmembers, drop_intermediate=drop
        )
        np.testing.assert_array_equal(thr, thr_sk)
        np.testing.assert_allclose(fpr, fpr_sk, rtol=0, atol=1e-15)
        np.testing.assert_allclose(tpr, tpr_sk, rtol=0, atol=1e-15)
    assert auc(scores_members=members, scores_nonmembers=nonmembers) == pytest.approx(auc_sk, abs=1e-12)


def _brute_tpr_at_fpr(members, nonmembers, alpha):
    m, n = np.asarray(members, float), np.asarray(nonmembers, float)
    best = 0.0
    for t in np.r_[np.inf, m, n]:
        if (n >= t).mean() <= alpha:
            best = max(best, float((m >= t).mean()))
    return best


@settings(max_examples=200, deadline=None)
@given(
    members=tied_scores,
    nonmembers=tied_scores,
    alpha=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0]),
)
def test_tpr_at_fpr_equals_brute_force_over_thresholds(members, nonmembers, alpha):
    got = tpr_at_fpr(scores_members=members, scores_nonmembers=nonmembers, fpr=alpha)
    assert got == _brute_tpr_at_fpr(members, nonmembers, alpha)
    # monotone in the budget
    assert got <= tpr_at_fpr(
        scores_members=members, scores_nonmembers=nonmembers, fpr=min(1.0, alpha * 2 + 0.01)
    )


def test_hand_computed_curve_and_auc():
    members, nonmembers = [3.0, 2.0, 1.0], [2.0, 0.0]
    fpr, tpr, thr = roc_curve(scores_members=members, scores_nonmembers=nonmembers)
    np.testing.assert_array_equal(thr, [np.inf, 3, 2, 1, 0])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    # pairs: 3>2, 3>0, 2=2 (1/2), 2>0, 1<2, 1>0 -> 4.5 / 6
    assert auc(scores_members=members, scores_nonmembers=nonmembers) == pytest.approx(0.75)
    assert auc(scores_members=[1.0], scores_nonmembers=[1.0]) == 0.5
    assert auc(scores_members=[2.0], scores_nonmembers=[1.0]) == 1.0
    assert auc(scores_members=[0.0], scores_nonmembers=[1.0]) == 0.0


def test_tpr_at_fpr_tie_at_the_threshold_is_never_split():
    nonmembers = [5.0] + [0.0] * 9  # one non-member ties with two members at 5
    members = [5.0, 5.0, 3.0]
    # admitting the tie costs FPR 0.1: not allowed at alpha 0.05, so only the origin remains
    assert tpr_at_fpr(scores_members=members, scores_nonmembers=nonmembers, fpr=0.05) == 0.0
    assert tpr_at_fpr(scores_members=members, scores_nonmembers=nonmembers, fpr=0.0) == 0.0
    # at alpha 0.1 the tie is admitted and t=3 keeps FPR 0.1
    assert tpr_at_fpr(scores_members=members, scores_nonmembers=nonmembers, fpr=0.1) == 1.0


def test_tpr_at_fpr_alpha_exactly_hit_is_included_unlike_mimir():
    nonmembers = np.arange(100, dtype=float)  # FPR steps of exactly 0.01
    members = [99.5, 98.5, 50.0]
    ours = tpr_at_fpr(scores_members=members, scores_nonmembers=nonmembers, fpr=0.01)
    assert ours == pytest.approx(2 / 3)  # threshold 98.5 admits one non-member: FPR 0.01 <= 0.01
    # mimir / LiRA: tpr[np.where(fpr < alpha)[0][-1]] on sklearn's curve -> strict bound
    (fpr, tpr, _), _ = _sk(members, nonmembers)
    mimir = tpr[np.where(fpr < 0.01)[0][-1]]
    assert mimir == pytest.approx(1 / 3)
    assert ours > mimir


def test_tpr_at_fpr_zero_is_tpr_before_first_false_positive():
    assert tpr_at_fpr(
        scores_members=[10.0, 9.0, 1.0], scores_nonmembers=[5.0, 2.0], fpr=0.0
    ) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores_members=[5.0, 6.0], scores_nonmembers=[5.0, 1.0], fpr=0.0) == 0.5  # tie excluded
    assert tpr_at_fpr(scores_members=[0.0, 1.0], scores_nonmembers=[5.0], fpr=0.0) == 0.0
    assert tpr_at_fpr(scores_members=[0.0, 1.0], scores_nonmembers=[5.0], fpr=1.0) == 1.0


def test_auc_ci_on_random_scores_covers_half_and_contains_estimate():
    rng = np.random.default_rng(7)
    m, n = rng.normal(size=400), rng.normal(size=300)
    lo, hi = auc_bootstrap_ci(scores_members=m, scores_nonmembers=n, seed=1)
    point = auc(scores_members=m, scores_nonmembers=n)
    assert lo < 0.5 < hi
    assert lo <= point <= hi
    assert 0.04 < hi - lo < 0.15  # about 2 * 1.96 * sqrt((1/400 + 1/300) / 12)
    assert (lo, hi) == auc_bootstrap_ci(scores_members=m, scores_nonmembers=n, seed=1)
    assert (lo, hi) != auc_bootstrap_ci(scores_members=m, scores_nonmembers=n, seed=2)
    lo50, hi50 = auc_bootstrap_ci(scores_members=m, scores_nonmembers=n, seed=1, confidence=0.5)
    assert lo <= lo50 and hi50 <= hi


@pytest.mark.parametrize("shift", [0.0, 0.8])
def test_auc_ci_coverage_is_close_to_nominal(shift):
    true_auc = norm.cdf(shift / np.sqrt(2.0))  # P(N(shift,1) > N(0,1))
    rng = np.random.default_rng(2024)
    reps, covered = 200, 0
    for r in range(reps):
        lo, hi = auc_bootstrap_ci(
            scores_members=rng.normal(shift, 1.0, 30),
            scores_nonmembers=rng.normal(0.0, 1.0, 30),
            num_bootstrap=500,
            seed=r,
        )
        covered += lo <= true_auc <= hi
    # nominal 0.95; binomial sd over 200 reps is 0.015; percentile bootstrap runs slightly low
    assert 0.88 <= covered / reps <= 0.99


def test_auc_ci_stratified_keeps_class_sizes():
    # one member: every stratified replicate has exactly that member, so AUC is its fixed rank
    lo, hi = auc_bootstrap_ci(scores_members=[10.0], scores_nonmembers=[0.0, 1.0, 2.0], seed=0)
    assert lo == hi == 1.0


def test_summarize_scores_schema_and_values():
    rng = np.random.default_rng(3)
    m, n = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 1000)
    out = summarize_scores(scores_members=m, scores_nonmembers=n, seed=0)
    assert set(out) == {"auc", "auc_ci", "tpr_at_fpr", "num_members", "num_nonmembers"}
    assert list(out["tpr_at_fpr"]) == ["0.01", "0.001", "0.0"]
    assert out["num_members"] == 500 and out["num_nonmembers"] == 1000
    assert isinstance(out["auc_ci"], list) and len(out["auc_ci"]) == 2
    assert out["auc"] == pytest.approx(roc_auc_score(np.r_[np.ones(500), np.zeros(1000)], np.r_[m, n]))
    for key, alpha in (("0.01", 0.01), ("0.001", 0.001), ("0.0", 0.0)):
        assert out["tpr_at_fpr"][key] == tpr_at_fpr(scores_members=m, scores_nonmembers=n, fpr=alpha)
    assert out["tpr_at_fpr"]["0.0"] <= out["tpr_at_fpr"]["0.001"] <= out["tpr_at_fpr"]["0.01"]
    assert json.loads(json.dumps(out)) == out  # plain Python types only


def test_bad_input_names_the_parameter():
    with pytest.raises(MetricInputError, match="scores_members"):
        auc(scores_members=[], scores_nonmembers=[1.0])
    with pytest.raises(MetricInputError, match=r"scores_nonmembers.*non-finite.*index 1"):
        auc(scores_members=[1.0], scores_nonmembers=[1.0, float("nan")])
    with pytest.raises(MetricInputError, match=r"scores_members.*shape"):
        roc_curve(scores_members=[[1.0, 2.0]], scores_nonmembers=[1.0])
    with pytest.raises(MetricInputError, match="fpr"):
        tpr_at_fpr(scores_members=[1.0], scores_nonmembers=[0.0], fpr=1.5)
    with pytest.raises(MetricInputError, match="confidence"):
        auc_bootstrap_ci(scores_members=[1.0], scores_nonmembers=[0.0], confidence=1.0, seed=0)
    with pytest.raises(MetricInputError, match="num_bootstrap"):
        auc_bootstrap_ci(scores_members=[1.0], scores_nonmembers=[0.0], num_bootstrap=0, seed=0)


def test_plot_roc_loglog_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    fpr_a, tpr_a, _ = roc_curve(scores_members=rng.normal(1, 1, 200), scores_nonmembers=rng.normal(0, 1, 200))
    fpr_b, tpr_b, _ = roc_curve(scores_members=rng.normal(0, 1, 200), scores_nonmembers=rng.normal(0, 1, 200))
    path = plot_roc_loglog({"loss": (fpr_a, tpr_a), "random": (fpr_b, tpr_b)}, tmp_path / "sub" / "roc.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    fig = _roc_figure({"loss": (fpr_a, tpr_a)})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0].startswith("loss (AUC ") and "chance" in labels
    with pytest.raises(MetricInputError, match="results"):
        plot_roc_loglog({}, tmp_path / "x.png")
    with pytest.raises(MetricInputError, match="lengths differ"):
        plot_roc_loglog({"a": ([0, 1], [0, 0.5, 1])}, tmp_path / "x.png")
