"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, and parameter checks.

Accountants are Opacus' own (so the ε we report is, by construction, the one Opacus
computes for the same (q, σ, steps) history):

- ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz,
  "Numerical Composition of Differential Privacy", NeurIPS 2021); we report the upper end
  of its error interval (``eps_error=0.01``);
- ``"rdp"``: Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019) with
  the RDP->(ε, δ) conversion of Balle et al. 2020.

A history is a list of ``[noise_multiplier, sample_rate, steps]`` triples (JSON-able).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")


class DPConfigError(ValueError):
    """An invalid differential-privacy parameter; the message names it and the fix."""


class PrivacyBudgetExceededError(RuntimeError):
    """Raised before a step that would spend more than the calibrated privacy budget."""


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise DPConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return accountant


def default_delta(num_examples: int) -> float:
    """min(1e-5, 1/N^1.1): strictly below 1/N for every N >= 2."""
    return min(1e-5, float(num_examples) ** -1.1)


def check_delta(target_delta: float | None, *, num_units: int, unit: str = "examples", owner: str = "") -> float:
    """Validate 0 < δ < 1/N; ``unit`` names what N counts (examples, clients)."""
    where = f" for {owner}" if owner else ""
    if target_delta is None:
        raise DPConfigError(
            f"target_delta is required{where}: choose δ < 1/N where N = {num_units} {unit}, "
            f"e.g. target_delta = {default_delta(num_units):.3g}"
        )
    if isinstance(target_delta, bool) or not isinstance(target_delta, int | float):
        raise DPConfigError(f"target_delta must be a number, got {target_delta!r}")
    d = float(target_delta)
    if not (0.0 < d < 1.0) or not math.isfinite(d):
        raise DPConfigError(f"target_delta must be in (0, 1), got {target_delta!r}")
    if num_units > 0 and d >= 1.0 / num_units:
        raise DPConfigError(
            f"target_delta = {d:.3g}{where} is >= 1/N = {1.0 / num_units:.3g} (N = {num_units} {unit}): "
            f"such a δ allows releasing a whole record; use e.g. target_delta = {default_delta(num_units):.3g}"
        )
    return d


def check_epsilon(target_epsilon: float | None) -> float | None:
    """ε > 0 (``math.inf`` allowed: clipping without noise, reported as ε = inf)."""
    if target_epsilon is None:
        return None
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float):
        raise DPConfigError(f"target_epsilon must be a number, got {target_epsilon!r}")
    e = float(target_epsilon)
    if math.isnan(e) or e <= 0:
        raise DPConfigError(
            f"target_epsilon must be > 0 (or inf for no noise), got {target_epsilon!r}; typical values are 1 to 10"
        )
    return e


def check_noise_multiplier(noise_multiplier: float | None) -> float | None:
    if noise_multiplier is None:
        return None
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, int | float):
        raise DPConfigError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    s = float(noise_multiplier)
    if not math.isfinite(s) or s < 0:
        raise DPConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return s


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise DPConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def make_accountant(kind: str, history: Iterable[Sequence[float]] = ()) -> Any:
    """An Opacus accountant of ``kind`` with ``history`` preloaded."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    check_accountant(kind)
    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def history_to_json(history: Iterable[Sequence[float]]) -> list[list[float]]:
    return [[float(s), float(q), int(n)] for s, q, n in history]


def epsilon_of(history: Sequence[Sequence[float]], *, delta: float, accountant: str) -> float:
    """ε spent by ``history`` at ``delta`` (0 for an empty history, inf if any step had no noise)."""
    hist = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not hist:
        return 0.0
    if any(s == 0.0 and q > 0 for s, q, _ in hist):
        return math.inf
    hist = [h for h in hist if h[1] > 0]
    if not hist:
        return 0.0
    return _epsilon_cached(tuple(hist), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = make_accountant(accountant, history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest σ (to a tolerance of 0.01 in ε, from above) meeting (ε, δ) after ``steps`` steps.

    Uses Opacus' ``get_noise_multiplier``; the σ returned always satisfies ε(σ) <= target.
    ``target_epsilon = inf`` gives σ = 0.
    """
    check_accountant(accountant)
    if math.isinf(target_epsilon):
        return 0.0
    if steps <= 0:
        raise DPConfigError(f"the number of planned steps must be >= 1, got {steps}")
    if not 0 < sample_rate <= 1:
        raise DPConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        except ValueError as err:
            raise DPConfigError(
                f"cannot reach target_epsilon = {target_epsilon} at δ = {target_delta:.3g} with sample rate "
                f"{sample_rate:.4g} over {steps} steps ({err}); raise target_epsilon or train fewer steps"
            ) from err
    return float(sigma)
