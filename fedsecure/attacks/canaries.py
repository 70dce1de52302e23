"""Canary exposure (Secret Sharer) on a released model or adapter.

Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", USENIX Security 2019.

The data module inserts canaries -- a fixed format ``prompt`` + ``prefix`` completed by a
random ``secret`` -- 1, 2, 4 or 8 times into one client's training data, and keeps as many
*reference* canaries that were never inserted (``repetitions == 0``). For each canary this
attack scores the inserted secret and ``num_candidates`` other random secrets of the same
randomness space (same length and alphabet) by their log-perplexity (the summed token NLL
of the response ``prefix + secret`` given the prompt; lower = more likely) and reports

- the rank exposure ``log2 |R| - log2 rank`` (:func:`fedsecure.metrics.exposure_by_rank`,
  capped at ``log2(num_candidates + 1)``),
- the skew-normal extrapolation ``-log2 CDF(canary)`` (Section 4.3 of the paper,
  :func:`fedsecure.metrics.exposure_skew_normal`), which measures beyond the sample,

per canary and averaged per repetition count. A memorised canary has high exposure; a
reference canary's exposure is low (about 1 bit on average: its rank is uniform).

The result also carries the membership metrics schema: each secret is scored by its
log-perplexity standardised against its own canary's candidates (higher = more likely
inserted); the members are the inserted canaries' secrets, the non-members every candidate
and every reference canary's secret. With the accountant's epsilon set, the empirical lower
bound is computed from those scores.

Threat model: an auditor who inserted the canaries (knows the format and the randomness
space, not which secret the model prefers) and can query the released model for
log-probabilities of any candidate.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedsecure.attacks.base import Attack, AttackResult, AttackTarget
from fedsecure.attacks.membership import membership_result, target_delta
from fedsecure.attacks.scoring import compute_token_stats
from fedsecure.data.tokenize import DEFAULT_SYSTEM
from fedsecure.registry import ATTACKS
from fedsecure.types import RunInfo, View

__all__ = ["CanaryExposureAttack", "candidate_secrets"]


def candidate_secrets(canary: Any, *, num_candidates: int, seed: int) -> list[str]:
    """Distinct random secrets of the canary's randomness space, the real secret excluded.

    When the space holds at most ``num_candidates + 1`` secrets, every other secret is
    returned (the exact exposure). Otherwise ``num_candidates`` secrets are drawn uniformly
    at random (characters i.i.d. over the alphabet, duplicates redrawn), deterministically
    from ``seed`` and the canary id. These are evaluation samples, not secrets of the run.
    """
    alphabet, length = canary.alphabet, int(canary.length)
    space = len(alphabet) ** length
    if space - 1 <= num_candidates:
        out = []
        for index in range(space):
            chars = []
            for _ in range(length):
                index, digit = divmod(index, len(alphabet))
                chars.append(alphabet[digit])
            s = "".join(reversed(chars))
            if s != canary.secret:
                out.append(s)
        return out
    rng = np.random.default_rng([seed, zlib.crc32(canary.canary_id.encode())])
    chosen: dict[str, None] = {}
    while len(chosen) < num_candidates:
        need = num_candidates - len(chosen)
        draws = rng.integers(0, len(alphabet), size=(need, length))
        for row in draws:
            s = "".join(alphabet[int(i)] for i in row)
            if s != canary.secret:
                chosen.setdefault(s)
    return list(chosen)[:num_candidates]


@ATTACKS.register("canary-exposure")
class CanaryExposureAttack(Attack):
    """Secret Sharer exposure of the inserted canaries, by repetition count.

    Parameters
    ----------
    num_candidates:
        Random other secrets scored per canary (>= 20 for the skew-normal fit); the rank
        exposure is capped at ``log2(num_candidates + 1)`` bits.
    max_length:
        Token truncation length; ``None`` uses ``AttackTarget.max_length``.
    batch_size:
        Sequences per forward pass.
    num_bootstrap:
        Bootstrap replicates of the membership AUC interval.
    seed:
        Seed of the candidate draws, the bootstrap and the epsilon-audit split.
    """

    name: ClassVar[str] = "canary-exposure"
    threat_model: ClassVar[str] = (
        "released model, auditor with canaries: the auditor inserted random secrets into training data "
        "and ranks each inserted secret among random candidates by the model's log-perplexity"
    )
    needs: ClassVar[frozenset[View]] = frozenset({View.RELEASED_MODEL})

    def __init__(
        self,
        *,
        num_candidates: int = 1000,
        max_length: int | None = None,
        batch_size: int = 32,
        num_bootstrap: int = 1000,
        seed: int = 0,
    ) -> None:
        for key, value, minimum in (
            ("num_candidates", num_candidates, 20),
            ("batch_size", batch_size, 1),
            ("num_bootstrap", num_bootstrap, 10),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
        bad_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
        if max_length is not None and bad_length:
            raise ValueError(f"max_length must be None or an integer >= 2, got {max_length!r}")
        self.num_candidates = num_candidates
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_bootstrap = num_bootstrap
        self.seed = seed

    def setup(self, run_info: RunInfo | None = None, dataset: Any = None) -> None:
        """Called once before training with the run's public facts (unused)."""

    def _log_perplexities(self, target: AttackTarget, canary: Any, secrets: Sequence[str]) -> np.ndarray:
        examples = [{"prompt": canary.prompt, "response": canary.prefix + s} for s in secrets]
        stats = compute_token_stats(
            target.model,
            target.tokenizer,
            examples,
            max_length=int(self.max_length or target.max_length),
            batch_size=self.batch_size,
            system_prompt=target.extra.get("system_prompt", DEFAULT_SYSTEM),
        )
        return np.array([s.total_nll for s in stats], dtype=np.float64)

    def run(self, target: AttackTarget) -> AttackResult:
        from fedsecure.metrics import exposure_by_rank, exposure_skew_normal
        from fedsecure.metrics.exposure import MIN_CANDIDATES_FOR_FIT

        canaries = list(target.canaries)
        if not canaries:
            return AttackResult.not_applicable(
                self, "the run has no canaries: set data.canary_repetitions (e.g. [1, 2, 4, 8]) to insert them"
            )
        if not any(c.repetitions > 0 for c in canaries):
            return AttackResult.not_applicable(
                self, "no canary was inserted into training data (all have repetitions 0)"
            )
        per_canary: list[dict[str, Any]] = []
        members: list[float] = []
        nonmembers: list[float] = []
        for canary in canaries:
            candidates = candidate_secrets(canary, num_candidates=self.num_candidates, seed=self.seed)
            ppl = self._log_perplexities(target, canary, [canary.secret, *candidates])
            own, others = float(ppl[0]), ppl[1:]
            rank = 1 + int(np.count_nonzero(others <= own))
            skew: float | None = None
            if others.size >= MIN_CANDIDATES_FOR_FIT and np.ptp(others) > 0:
                skew = exposure_skew_normal(canary_score=own, candidate_scores=others)
            entry = {
                "canary_id": canary.canary_id,
                "repetitions": int(canary.repetitions),
                "client_id": int(canary.client_id),
                "log_perplexity": own,
                "candidates_mean_log_perplexity": float(others.mean()),
                "rank": rank,
                "num_candidates": int(others.size),
                "exposure_rank": exposure_by_rank(canary_score=own, candidate_scores=others),
                "exposure_rank_max": math.log2(others.size + 1),
                "exposure_skew_normal": skew,
            }
            per_canary.append(entry)
            std = float(others.std(ddof=1)) if others.size >= 2 else 0.0
            std = std if std > 0 else 1.0
            standardised = -(ppl - others.mean()) / std  # higher = more likely the inserted secret
            (members if canary.repetitions > 0 else nonmembers).append(float(standardised[0]))
            nonmembers.extend(float(x) for x in standardised[1:])

        def by_repetition(field: str) -> dict[str, float | None]:
            out: dict[str, float | None] = {}
            for reps in sorted({e["repetitions"] for e in per_canary}):
                vals = [e[field] for e in per_canary if e["repetitions"] == reps and e[field] is not None]
                out[str(reps)] = float(np.mean(vals)) if vals else None
            return out

        exposure_skew = by_repetition("exposure_skew_normal")
        exposure_rank = by_repetition("exposure_rank")
        extra = {
            "exposure_by_repetition": {
                k: (exposure_skew[k] if exposure_skew[k] is not None else exposure_rank[k]) for k in exposure_skew
            },
            "exposure_rank_by_repetition": exposure_rank,
            "exposure_skew_normal_by_repetition": exposure_skew,
            "exposure_rank_max": math.log2(self.num_candidates + 1),
            "num_canaries": len(per_canary),
        }
        return membership_result(
            self,
            scores_members=members,
            scores_nonmembers=nonmembers,
            seed=self.seed,
            num_bootstrap=self.num_bootstrap,
            claimed_epsilon=target.claimed_epsilon,
            delta=target_delta(target),
            blind_auc=None,
            extra_metrics=extra,
            details={"canaries": per_canary},
            keep_scores=False,
        )
