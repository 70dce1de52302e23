"""Statistical validity and speed of fedsecure.metrics, measured on data with known ground truth.

- AUC percentile-bootstrap CI: coverage of the true AUC of N(shift, 1) vs N(0, 1).
- Empirical epsilon: bound vs the exact epsilon of a Gaussian mechanism (Balle & Wang 2018),
  violation rate, and the violation rate of the naive estimate (no CI, best threshold in-sample).
- Blind baseline on identically distributed texts: spread of the CV AUC vs the bootstrap CI width.
- Timings of summarize_scores, blind_baseline and exposure_skew_normal.

Usage: .venv/bin/python benchmarks/metrics_validity.py [--quick]
Writes benchmarks/results/metrics_validity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from fedsecure.metrics import (
    auc_bootstrap_ci,
    blind_baseline,
    blind_baseline_scores,
    empirical_epsilon,
    exposure_skew_normal,
    gaussian_epsilon,
    summarize_scores,
)
from fedsecure.metrics.empirical_eps import _eps_from_rates

WORDS = [f"w{i}" for i in range(300)]


def _texts(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=20)) for _ in range(n)]


def ci_coverage(reps: int) -> list[dict]:
    rows = []
    for shift in (0.0, 0.8):
        for n in (30, 200):
            true_auc = float(norm.cdf(shift / np.sqrt(2.0)))
            rng = np.random.default_rng(12345)
            covered, widths = 0, []
            for r in range(reps):
                lo, hi = auc_bootstrap_ci(
                    scores_members=rng.normal(shift, 1.0, n),
                    scores_nonmembers=rng.normal(0.0, 1.0, n),
                    num_bootstrap=1000,
                    seed=r,
                )
                covered += lo <= true_auc <= hi
                widths.append(hi - lo)
            rows.append(
                {
                    "shift": shift,
                    "n_per_class": n,
                    "true_auc": true_auc,
                    "reps": reps,
                    "coverage": covered / reps,
                    "mean_width": float(np.mean(widths)),
                }
            )
    return rows


def _naive(members: np.ndarray, nonmembers: np.ndarray, delta: float) -> float:
    t = np.unique(np.r_[members, nonmembers])
    fpr = (nonmembers[None, :] >= t[:, None]).mean(axis=1)
    fnr = (members[None, :] < t[:, None]).mean(axis=1)
    return float(_eps_from_rates(np.maximum(fpr, 1e-300), np.maximum(fnr, 1e-300), delta).max())


def epsilon_audit(reps: int) -> list[dict]:
    rows = []
    for mu, delta, n in (
        (0.5, 0.1, 2000),
        (1.0, 0.1, 2000),
        (2.0, 0.01, 2000),
        (3.0, 1e-5, 5000),
        (5.0, 1e-5, 5000),
    ):
        true_eps = gaussian_epsilon(mu=mu, delta=delta)
        rng = np.random.default_rng(7)
        bounds, naive = [], []
        for r in range(reps):
            m, nm = rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n)
            bounds.append(
                empirical_epsilon(scores_members=m, scores_nonmembers=nm, delta=delta, seed=r).epsilon
            )
            naive.append(_naive(m, nm, delta) if n <= 2000 else float("nan"))
        naive_arr = np.array(naive)
        rows.append(
            {
                "mu": mu,
                "delta": delta,
                "n_per_class": n,
                "true_epsilon": true_eps,
                "reps": reps,
                "bound_mean": float(np.mean(bounds)),
                "bound_max": float(np.max(bounds)),
                "violation_rate": float(np.mean(np.array(bounds) > true_eps)),
                "naive_violation_rate": None
                if np.isnan(naive_arr).all()
                else float(np.mean(naive_arr > true_eps)),
            }
        )
    return rows


def blind_null(reps: int) -> dict:
    aucs, widths = [], []
    for r in range(reps):
        rng = np.random.default_rng(1000 + r)
        out = blind_baseline(members=_texts(200, rng), nonmembers=_texts(200, rng), seed=r)
        aucs.append(out["auc"])
        widths.append(out["auc_ci"][1] - out["auc_ci"][0])
    return {
        "n_per_class": 200,
        "reps": reps,
        "auc_mean": float(np.mean(aucs)),
        "auc_sd": float(np.std(aucs, ddof=1)),
        "nominal_null_sd": float(np.sqrt(401 / (12 * 200 * 200))),
        "bootstrap_ci_mean_width": float(np.mean(widths)),
        "empirical_95_width": float(2 * 1.96 * np.std(aucs, ddof=1)),
    }


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is the stable figure on a shared machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def timings(quick: bool) -> dict:
    rng = np.random.default_rng(0)
    n = 2000 if quick else 10_000
    m, nm = rng.normal(0.5, 1, n), rng.normal(0, 1, n)
    k = 200 if quick else 1000
    mem, non = _texts(k, rng), _texts(k, rng)
    cands = rng.normal(4, 1, 10_000)
    rows = {
        f"summarize_scores_{n}_per_class_1000_bootstrap": _timed(
            lambda: summarize_scores(scores_members=m, scores_nonmembers=nm)
        ),
        f"blind_baseline_scores_{k}_texts_per_class_5_folds": _timed(
            lambda: blind_baseline_scores(members=mem, nonmembers=non)
        ),
        "exposure_skew_normal_10000_candidates": _timed(
            lambda: exposure_skew_normal(canary_score=-3.0, candidate_scores=cands)
        ),
        f"epsilon_lower_bound_{n}_per_class": _timed(
            lambda: empirical_epsilon(scores_members=m, scores_nonmembers=nm, delta=1e-5)
        ),
    }
    return {name: {"wall_s": w, "cpu_s": c} for name, (w, c) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 10 s)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = {
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "auc_ci_coverage": ci_coverage(50 if args.quick else 400),
        "empirical_epsilon": epsilon_audit(5 if args.quick else 40),
        "blind_baseline_null": blind_null(4 if args.quick else 30),
        "timings": timings(args.quick),
    }
    result["total_s"] = time.perf_counter() - t0
    out = Path(__file__).parent / "results" / "metrics_validity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
