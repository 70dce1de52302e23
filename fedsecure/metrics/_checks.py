"""Input validation shared by the metrics modules (no public API beyond the error type)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class MetricInputError(ValueError):
    """A metric received invalid input; the message names the parameter and the fix."""


def as_scores(values: Any, *, name: str, allow_empty: bool = False) -> np.ndarray:
    """Return ``values`` as a finite 1-D float64 array, or raise naming ``name``.

    Accepts lists, tuples, numpy arrays and CPU tensors (anything ``np.asarray`` takes).
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(
            f"{name}: expected a 1-D sequence of real numbers, could not convert it ({exc})"
        ) from exc
    if arr.ndim != 1:
        raise MetricInputError(
            f"{name}: expected a 1-D sequence of scores, got an array of shape {arr.shape}; "
            "flatten it or pass one score per example"
        )
    if arr.size == 0 and not allow_empty:
        raise MetricInputError(f"{name}: is empty; at least one score is needed")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise MetricInputError(
            f"{name}: {idx.size} non-finite value(s) (NaN or +/-inf), first at index {int(idx[0])} "
            f"({arr[idx[0]]!r}); drop those examples or map them to finite scores before computing metrics"
        )
    return arr


def check_probability(value: float, *, name: str, low_open: bool, high_open: bool) -> float:
    """Check that ``value`` is a real number in the (half-)open/closed unit interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MetricInputError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    lo_ok = value > 0.0 if low_open else value >= 0.0
    hi_ok = value < 1.0 if high_open else value <= 1.0
    if not (math.isfinite(value) and lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise MetricInputError(f"{name}: must lie in {interval}, got {value!r}")
    return value


def check_positive_int(value: int, *, name: str, minimum: int = 1) -> int:
    """Check that ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise MetricInputError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)
