"""Membership inference on a released model or adapter (View.RELEASED_MODEL).

Attacks (registered in :data:`fedsecure.registry.ATTACKS`), each a score per example with
**higher = more likely member**:

- ``loss``: minus the mean token NLL of the response (Yeom et al., "Privacy Risk in
  Machine Learning: Analyzing the Connection to Overfitting", CSF 2018).
- ``zlib``: minus the NLL divided by the zlib-compressed length (Carlini et al., "Extracting
  Training Data from Large Language Models", USENIX Security 2021).
- ``min-k``: Min-K% prob, the mean of the k% lowest token log-probabilities (Shi et al.,
  "Detecting Pretraining Data from Large Language Models", ICLR 2024).
- ``min-k++``: Min-K%++, the same over log-probabilities standardised by the mean and
  standard deviation of the next-token distribution (Zhang et al., "Min-K%++: Improved
  Baseline for Detecting Pre-Training Data from Large Language Models", ICLR 2025).
- ``reference-base``: the target's log-likelihood minus the *base model's* (the adapter
  disabled): the reference attack of Carlini et al. 2021 / Mattern et al. (ACL Findings
  2023) with the pre-trained model as reference, which LoRA-Leak (Ran et al. 2025) finds
  strong against LoRA fine-tuning since the base model is public.
- ``gradnorm``: minus the L2 norm of the example's gradient w.r.t. the adapter (members sit
  near a minimum: small gradients). mimir's GradNorm reports the norm with the opposite
  sign; here higher still means member.
- ``rmia`` (offline): Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks",
  ICML 2024, with reference LoRA adapters trained on population data.
- ``lira`` (offline, fixed variance): Carlini et al., "Membership Inference Attacks From First
  Principles", IEEE S&P 2022, on the same reference adapters.

Threat model: the attacker holds the released adapter and the public base model (white-box
for ``gradnorm``, log-probabilities for the rest), plus, for ``rmia``/``lira``, population
data from the members' distribution (disjoint from the evaluated examples) to train
reference adapters. The evaluator holds the ground truth (members and non-members drawn
from the same distribution); the blind baseline of Das et al. ("Blind Baselines Beat
Membership Inference Attacks for Foundation Models", 2024) is reported beside every attack
(``blind_baseline_auc``) so a distribution shift between the two sets is visible.

When a DP defense ran (``AttackTarget.claimed_epsilon`` set), every result also carries
``epsilon`` (the accountant's) and ``epsilon_lower_bound`` (Clopper-Pearson, 95%, from the
attack's scores; :func:`fedsecure.metrics.epsilon_lower_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedsecure.attacks.base import Attack, AttackResult, AttackTarget
from fedsecure.attacks.scoring import (
    TokenStats,
    adapter_trainable,
    cached_token_stats,
    compute_token_stats,
    encode_examples,
    examples_digest,
    iter_adapter_gradients,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    zlib_score,
)
from fedsecure.registry import ATTACKS
from fedsecure.types import RunInfo, View

__all__ = [
    "BLIND_BASELINE_KEY",
    "GradNormAttack",
    "LiraAttack",
    "LossAttack",
    "MinKAttack",
    "MinKPlusPlusAttack",
    "ReferenceAdapterSettings",
    "ReferenceBaseAttack",
    "ReleasedModelAttack",
    "RmiaAttack",
    "ZlibAttack",
    "blind_baseline_auc",
    "blind_text_auc",
    "example_text",
    "lira_offline_scores",
    "membership_result",
    "reference_adapter_stats",
    "rmia_scores",
    "split_population",
    "target_delta",
]

BLIND_BASELINE_KEY = "_fedsecure_blind_baseline"
"""Key of the blind-baseline cache inside ``AttackTarget.extra``."""

DEFAULT_DELTA = 1e-5


def _int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = (v > low if low_open else v >= low) and v <= high and math.isfinite(v)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return v


def example_text(example: Mapping[str, Any]) -> str:
    """The text a blind classifier sees: prompt and response joined by a newline."""
    prompt = example.get("prompt", "")
    return f"{prompt}\n{example['response']}" if prompt else str(example["response"])


def blind_baseline_auc(target: AttackTarget, *, seed: int = 0) -> float | None:
    """AUC of the blind (text-only, model-free) classifier on the target's members/non-members.

    :func:`blind_text_auc` on the examples' texts. Cached in ``target.extra`` (the same for
    every attack of a run).
    """
    key = (examples_digest(target.members), examples_digest(target.nonmembers), seed)
    cache = target.extra.setdefault(BLIND_BASELINE_KEY, {})
    if key not in cache:
        cache[key] = blind_text_auc(
            [example_text(e) for e in target.members], [example_text(e) for e in target.nonmembers], seed=seed
        )
    return cache[key]


def blind_text_auc(members: Sequence[str], nonmembers: Sequence[str], *, seed: int = 0) -> float | None:
    """Out-of-fold AUC of the blind classifier (:func:`fedsecure.metrics.blind_baseline_scores`).

    Up to 5 folds, fewer when a class has fewer distinct texts (repeated texts share a fold);
    ``None`` when a class has fewer than two distinct texts.
    """
    from fedsecure.metrics import auc, blind_baseline_scores

    n = min(len(set(members)), len(set(nonmembers)))
    if n < 2:
        return None
    sm, sn = blind_baseline_scores(members=members, nonmembers=nonmembers, num_folds=min(5, n), seed=seed)
    return float(auc(scores_members=sm, scores_nonmembers=sn))


def membership_result(
    attack: Attack,
    *,
    scores_members: Sequence[float] | np.ndarray,
    scores_nonmembers: Sequence[float] | np.ndarray,
    seed: int = 0,
    num_bootstrap: int = 1000,
    claimed_epsilon: float | None = None,
    delta: float = DEFAULT_DELTA,
    blind_auc: float | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    keep_scores: bool = True,
) -> AttackResult:
    """Build an :class:`AttackResult` with the project's membership metrics schema.

    ``metrics`` holds ``auc``, ``auc_ci`` ([low, high], percentile bootstrap),
    ``tpr_at_fpr`` (keys ``"0.01"``, ``"0.001"``, ``"0.0"``), ``num_members``,
    ``num_nonmembers``, ``blind_baseline_auc`` and, when ``claimed_epsilon`` is given,
    ``epsilon`` and ``epsilon_lower_bound`` (at ``delta``, 95% confidence). ``details``
    keeps the raw scores (``scores_members``, ``scores_nonmembers``, for ROC plots) unless
    ``keep_scores`` is false, plus whatever the caller adds.
    """
    from fedsecure.metrics import epsilon_lower_bound, summarize_scores

    sm = np.asarray(scores_members, dtype=np.float64)
    sn = np.asarray(scores_nonmembers, dtype=np.float64)
    metrics: dict[str, Any] = summarize_scores(
        scores_members=sm, scores_nonmembers=sn, num_bootstrap=num_bootstrap, seed=seed
    )
    metrics["blind_baseline_auc"] = blind_auc
    if claimed_epsilon is not None:
        metrics["epsilon"] = float(claimed_epsilon)
        metrics["delta"] = float(delta)
        if sm.size >= 2 and sn.size >= 2:
            metrics["epsilon_lower_bound"] = epsilon_lower_bound(
                scores_members=sm, scores_nonmembers=sn, delta=delta, confidence=0.95, seed=seed
            )
        else:
            metrics["epsilon_lower_bound"] = 0.0
    if extra_metrics:
        metrics.update(extra_metrics)
    out_details: dict[str, Any] = {}
    if keep_scores:
        out_details["scores_members"] = [float(x) for x in sm]
        out_details["scores_nonmembers"] = [float(x) for x in sn]
    if details:
        out_details.update(details)
    return AttackResult(
        name=attack.name,
        threat_model=attack.threat_model,
        applicable=True,
        reason="",
        metrics=metrics,
        details=out_details,
    )


def target_delta(target: AttackTarget) -> float:
    """The DP delta to audit against: ``target.extra["delta"]`` (default 1e-5).

    A per-client mapping (DP-SGD calibrates delta per client) gives its largest value: a
    larger delta only lowers the empirical bound, so the bound stays valid for every client.
    """
    value = target.extra.get("delta", DEFAULT_DELTA)
    if value is None:
        return DEFAULT_DELTA
    if isinstance(value, Mapping):
        vals = [float(v) for v in value.values() if v is not None]
        return max(vals) if vals else DEFAULT_DELTA
    return float(value)


def _check_target(target: AttackTarget, attack: Attack) -> None:
    if not isinstance(target, AttackTarget):
        raise TypeError(f"{attack.name}: run() expects an AttackTarget, got {type(target).__name__}")
    if not target.members or not target.nonmembers:
        raise ValueError(
            f"{attack.name}: the target needs at least one member and one non-member example "
            f"(got {len(target.members)} members, {len(target.nonmembers)} non-members)"
        )


class ReleasedModelAttack(Attack):
    """Base of the released-model membership attacks: score, then summarise.

    Parameters
    ----------
    max_length:
        Token truncation length for scoring; ``None`` uses ``AttackTarget.max_length`` (the
        training length).
    batch_size:
        Sequences per forward pass.
    num_bootstrap:
        Bootstrap replicates of the AUC confidence interval.
    seed:
        Seed of the bootstrap, the epsilon-audit split and the blind baseline's folds.
    """

    needs: ClassVar[frozenset[View]] = frozenset({View.RELEASED_MODEL})
    threat_model: ClassVar[str] = (
        "released model: the attacker queries the final adapter (and the public base model) for "
        "token log-probabilities of candidate records"
    )

    def __init__(
        self, *, max_length: int | None = None, batch_size: int = 8, num_bootstrap: int = 1000, seed: int = 0
    ) -> None:
        self.max_length = None if max_length is None else _int("max_length", max_length, minimum=2)
        self.batch_size = _int("batch_size", batch_size, minimum=1)
        self.num_bootstrap = _int("num_bootstrap", num_bootstrap, minimum=10)
        self.seed = _int("seed", seed, minimum=0)

    def setup(self, run_info: RunInfo | None = None, dataset: Any = None) -> None:
        """Called once before training with the run's public facts (unused)."""

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(member scores, non-member scores, extra details); higher = more likely member."""
        raise NotImplementedError

    def _stats(self, target: AttackTarget, examples: Sequence[Mapping[str, Any]], reference: str = "target"):
        return cached_token_stats(
            target, examples, reference=reference, batch_size=self.batch_size, max_length=self.max_length
        )

    def run(self, target: AttackTarget) -> AttackResult:
        _check_target(target, self)
        sm, sn, details = self.scores(target)
        return membership_result(
            self,
            scores_members=sm,
            scores_nonmembers=sn,
            seed=self.seed,
            num_bootstrap=self.num_bootstrap,
            claimed_epsilon=target.claimed_epsilon,
            delta=target_delta(target),
            blind_auc=blind_baseline_auc(target, seed=self.seed),
            details=details,
        )


class _TokenStatAttack(ReleasedModelAttack):
    """An attack that is a function of the target's per-token statistics of each example."""

    def score_one(self, stats: TokenStats, example: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        out = []
        for examples in (target.members, target.nonmembers):
            stats = self._stats(target, examples)
            out.append(np.array([self.score_one(s, e) for s, e in zip(stats, examples, strict=True)]))
        return out[0], out[1], {}


@ATTACKS.register("loss")
class LossAttack(_TokenStatAttack):
    """LOSS (Yeom et al. 2018): minus the mean token NLL of the response."""

    name = "loss"

    def score_one(self, stats: TokenStats, example: Mapping[str, Any]) -> float:
        return loss_score(stats)


@ATTACKS.register("zlib")
class ZlibAttack(_TokenStatAttack):
    """zlib ratio (Carlini et al. 2021): minus the NLL over the response's zlib entropy."""

    name = "zlib"

    def score_one(self, stats: TokenStats, example: Mapping[str, Any]) -> float:
        return zlib_score(stats, str(example["response"]))


@ATTACKS.register("min-k")
class MinKAttack(_TokenStatAttack):
    """Min-K% prob (Shi et al. 2024): mean of the k% lowest token log-probabilities.

    Parameters
    ----------
    k_percent:
        Percentage of tokens (lowest log-probability first), in (0, 100]; 20 as in the paper.
    """

    name = "min-k"

    def __init__(self, *, k_percent: float = 20.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k_percent = _float("k_percent", k_percent, low=0.0, high=100.0, low_open=True)

    def score_one(self, stats: TokenStats, example: Mapping[str, Any]) -> float:
        return min_k_score(stats, k_percent=self.k_percent)


@ATTACKS.register("min-k++")
class MinKPlusPlusAttack(_TokenStatAttack):
    """Min-K%++ (Zhang et al. 2025): Min-K% over distribution-standardised log-probabilities.

    Parameters
    ----------
    k_percent:
        Percentage of tokens, in (0, 100]; 20 as in the paper.
    """

    name = "min-k++"

    def __init__(self, *, k_percent: float = 20.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k_percent = _float("k_percent", k_percent, low=0.0, high=100.0, low_open=True)

    def score_one(self, stats: TokenStats, example: Mapping[str, Any]) -> float:
        return min_k_plus_plus_score(stats, k_percent=self.k_percent)


@ATTACKS.register("reference-base")
class ReferenceBaseAttack(ReleasedModelAttack):
    """Base model as reference (LoRA-Leak): target log-likelihood minus the base model's."""

    name = "reference-base"
    threat_model = (
        "released adapter + public base model: the attacker compares each record's likelihood under "
        "the fine-tuned model with its likelihood under the base model (adapter disabled)"
    )

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        out = []
        for examples in (target.members, target.nonmembers):
            fine = self._stats(target, examples, "target")
            base = self._stats(target, examples, "base")
            out.append(np.array([f.mean_logprob - b.mean_logprob for f, b in zip(fine, base, strict=True)]))
        return out[0], out[1], {}


@ATTACKS.register("gradnorm")
class GradNormAttack(ReleasedModelAttack):
    """Gradient norm: minus the L2 norm of the example's adapter gradient (white-box)."""

    name = "gradnorm"
    threat_model = (
        "released adapter, white-box: the attacker differentiates the fine-tuned model's loss on each "
        "record with respect to the adapter weights"
    )

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        length = int(self.max_length or target.max_length)
        system = target.extra.get("system_prompt")
        kwargs = {} if system is None else {"system_prompt": system}
        out = []
        for examples in (target.members, target.nonmembers):
            norms = [
                -float(g.norm())
                for g in iter_adapter_gradients(target.model, target.tokenizer, examples, max_length=length, **kwargs)
            ]
            out.append(np.array(norms))
        return out[0], out[1], {}


# --------------------------------------------------------------------------- reference adapters


@dataclass(frozen=True)
class ReferenceAdapterSettings:
    """How the reference adapters of ``rmia``/``lira`` are trained (the cache key).

    Attributes
    ----------
    num_reference_adapters: how many adapters (each on its own random subset).
    reference_steps: optimizer steps per adapter; match the target's total local steps
        seen by an example for a faithful reference.
    reference_lr: AdamW learning rate.
    reference_batch_size: examples per step.
    reference_fraction: fraction of the training pool each adapter trains on.
    seed: seed of the population split, subsets, batches and adapter initialisation.
    """

    num_reference_adapters: int = 2
    reference_steps: int = 100
    reference_lr: float = 1e-3
    reference_batch_size: int = 8
    reference_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _int("num_reference_adapters", self.num_reference_adapters, minimum=1)
        _int("reference_steps", self.reference_steps, minimum=1)
        _float("reference_lr", self.reference_lr, low=0.0, high=10.0, low_open=True)
        _int("reference_batch_size", self.reference_batch_size, minimum=1)
        _float("reference_fraction", self.reference_fraction, low=0.0, high=1.0, low_open=True)
        _int("seed", self.seed, minimum=0)


REFERENCE_KEY = "_fedsecure_reference_adapters"


def split_population(
    population: Sequence[Mapping[str, Any]], *, seed: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Deterministic disjoint halves: (pool that trains reference adapters, RMIA's z samples)."""
    if len(population) < 4:
        raise ValueError(
            f"reference-adapter attacks need at least 4 population examples (got {len(population)}): half train "
            "the reference adapters, half are RMIA's comparison samples; supply more population data"
        )
    perm = np.random.default_rng([seed, 0x5EF]).permutation(len(population))
    half = len(population) // 2
    pool = [population[int(i)] for i in perm[:half]]
    zset = [population[int(i)] for i in perm[half:]]
    return pool, zset


def _reset_lora(model: torch.nn.Module, *, seed: int) -> None:
    """Fresh LoRA initialisation of the active adapter (A Kaiming-uniform, B = 0: the base model)."""
    from peft.tuners.lora import LoraLayer

    active = getattr(model, "active_adapter", "default")
    if not isinstance(active, str):
        active = active[0]
    cfg = getattr(model, "peft_config", {}).get(active)
    if cfg is not None and getattr(cfg, "use_dora", False):
        raise ValueError(
            "reference-adapter attacks support plain LoRA adapters; this adapter uses DoRA (its magnitude "
            "vector cannot be reset to the base model)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        found = False
        for module in model.modules():
            if isinstance(module, LoraLayer) and active in module.lora_A:
                module.reset_lora_parameters(active, True)
                found = True
    if not found:
        raise ValueError(f"no LoRA layer of adapter {active!r} found; reference adapters need a peft LoRA model")


def _train_adapter(
    target: AttackTarget,
    examples: Sequence[Mapping[str, Any]],
    *,
    settings: ReferenceAdapterSettings,
    seed: int,
    max_length: int,
) -> None:
    from fedsecure.data.tokenize import DEFAULT_SYSTEM, make_loader
    from fedsecure.models.loss import per_sequence_loss

    model = target.model
    system = target.extra.get("system_prompt", DEFAULT_SYSTEM)
    features = encode_examples(target.tokenizer, examples, max_length=max_length, system_prompt=system)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    loader = make_loader(
        features,
        batch_size=settings.reference_batch_size,
        seed=seed,
        num_steps=settings.reference_steps,
        pad_token_id=int(pad),
    )
    device = next(model.parameters()).device
    _reset_lora(model, seed=seed)
    with adapter_trainable(model) as params:
        opt = torch.optim.AdamW([p for _, p in params], lr=settings.reference_lr, weight_decay=0.0)
        model.train()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = per_sequence_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        for _, p in params:
            p.grad = None


def reference_adapter_stats(
    target: AttackTarget,
    examples: Sequence[Mapping[str, Any]],
    *,
    settings: ReferenceAdapterSettings,
    max_length: int,
    batch_size: int = 8,
) -> tuple[np.ndarray, list[Mapping[str, Any]]]:
    """Mean token log-probabilities of ``examples`` and of RMIA's z samples under reference adapters.

    Trains ``settings.num_reference_adapters`` fresh LoRA adapters in the target model's own
    adapter slot (same rank and modules), each on a random ``reference_fraction`` of half the
    population, scores, and restores the released adapter afterwards (also on error). Results
    are cached in ``target.extra`` per (settings, examples), so ``rmia`` and ``lira`` share them.

    Returns
    -------
    (matrix, zset)
        ``matrix[j, i]`` is the mean log-probability of item ``i`` under reference ``j``, the
        items being ``examples`` followed by ``zset`` (the population half held out from the
        reference training).
    """
    from fedsecure.data.tokenize import DEFAULT_SYSTEM
    from fedsecure.models import get_adapter_state, set_adapter_state

    pool, zset = split_population(target.population, seed=settings.seed)
    items = list(examples) + list(zset)
    key = (settings, examples_digest(items), max_length)
    cache = target.extra.setdefault(REFERENCE_KEY, {})
    if key in cache:
        return cache[key], zset
    model = target.model
    system = target.extra.get("system_prompt", DEFAULT_SYSTEM)
    snapshot = get_adapter_state(model)
    was_training = model.training
    size = max(1, round(settings.reference_fraction * len(pool)))
    rows = []
    try:
        for j in range(settings.num_reference_adapters):
            rng = np.random.default_rng([settings.seed, 0xAD, j])
            subset = [pool[int(i)] for i in rng.choice(len(pool), size=size, replace=False)]
            seed_j = int(rng.integers(0, 2**31 - 1))
            _train_adapter(target, subset, settings=settings, seed=seed_j, max_length=max_length)
            stats = compute_token_stats(
                model, target.tokenizer, items, max_length=max_length, batch_size=batch_size, system_prompt=system
            )
            rows.append([s.mean_logprob for s in stats])
    finally:
        set_adapter_state(model, snapshot)
        model.train(was_training)
    matrix = np.array(rows, dtype=np.float64)
    cache[key] = matrix
    return matrix, zset


class _ReferenceAdapterAttack(ReleasedModelAttack):
    threat_model = (
        "released adapter + public base model + population data: the attacker trains reference LoRA "
        "adapters on population records and compares each record's likelihood under the target with "
        "its likelihood under the references"
    )

    def __init__(
        self,
        *,
        num_reference_adapters: int = 2,
        reference_steps: int = 100,
        reference_lr: float = 1e-3,
        reference_batch_size: int = 8,
        reference_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = ReferenceAdapterSettings(
            num_reference_adapters=num_reference_adapters,
            reference_steps=reference_steps,
            reference_lr=reference_lr,
            reference_batch_size=reference_batch_size,
            reference_fraction=reference_fraction,
            seed=self.seed,
        )

    def run(self, target: AttackTarget) -> AttackResult:
        _check_target(target, self)
        if len(target.population) < 4:
            return AttackResult.not_applicable(
                self,
                f"{self.name} trains reference adapters on population data, but the target has "
                f"{len(target.population)} population examples (need >= 4, disjoint from members and "
                "non-members): set the run's population split or pass --population to fedsecure audit",
            )
        return super().run(target)

    def _reference(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(target log-probs of members + non-members + z samples, reference matrix, #members, #non-members)."""
        length = int(self.max_length or target.max_length)
        examples = list(target.members) + list(target.nonmembers)
        refs, zset = reference_adapter_stats(
            target, examples, settings=self.settings, max_length=length, batch_size=self.batch_size
        )
        parts = (target.members, target.nonmembers, zset)  # cached separately: LOSS & co. reuse the first two
        target_lp = np.array([s.mean_logprob for part in parts for s in self._stats(target, part)])
        return target_lp, refs, len(target.members), len(target.nonmembers)


@ATTACKS.register("rmia")
class RmiaAttack(_ReferenceAdapterAttack):
    """RMIA offline (Zarifzadeh et al. 2024) with reference LoRA adapters trained on population data.

    ``p(x | theta) = exp(mean token log-probability)`` (the per-token geometric-mean
    likelihood, in (0, 1]); ``p(x)`` is the offline estimate
    ``((1 + a) * mean_ref p(x | theta_ref) + (1 - a)) / 2`` from OUT references; the score of
    ``x`` is the fraction of population samples ``z`` with
    ``(p(x|theta) / p(x)) / (p(z|theta) / p(z)) > gamma``.

    Parameters
    ----------
    num_reference_adapters, reference_steps, reference_lr, reference_batch_size, reference_fraction:
        See :class:`ReferenceAdapterSettings`.
    offline_a:
        The offline interpolation parameter ``a`` in [0, 1] (1: use the OUT references as they are).
    gamma:
        Likelihood-ratio threshold (> 0); 1 as in the paper.
    """

    name = "rmia"

    def __init__(self, *, offline_a: float = 0.3, gamma: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offline_a = _float("offline_a", offline_a, low=0.0, high=1.0)
        self.gamma = _float("gamma", gamma, low=0.0, high=1e6, low_open=True)

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        target_lp, refs, nm, nn = self._reference(target)
        n_eval = nm + nn
        score = rmia_scores(
            target_logprobs=target_lp[:n_eval],
            reference_logprobs=refs[:, :n_eval],
            target_logprobs_z=target_lp[n_eval:],
            reference_logprobs_z=refs[:, n_eval:],
            offline_a=self.offline_a,
            gamma=self.gamma,
        )
        details = {"num_population_z": int(target_lp.size - n_eval), "num_reference_adapters": int(refs.shape[0])}
        return score[:nm], score[nm:], details


@ATTACKS.register("lira")
class LiraAttack(_ReferenceAdapterAttack):
    """Offline LiRA with a global variance (Carlini et al. 2022) on reference LoRA adapters.

    The statistic is the mean token log-probability; the score is
    ``(stat_target(x) - mean_ref stat(x)) / sigma``, with ``sigma`` the pooled standard
    deviation of the references' statistics around their per-example means (the paper's
    fixed-variance variant, advised for few reference models; with one reference the pooled
    deviation of the population samples between target and reference is used instead).
    A monotone transform of the one-sided Gaussian test ``Phi(z)``.
    """

    name = "lira"

    def scores(self, target: AttackTarget) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        target_lp, refs, nm, nn = self._reference(target)
        n_eval = nm + nn
        z, sigma = lira_offline_scores(
            target_logprobs=target_lp[:n_eval],
            reference_logprobs=refs[:, :n_eval],
            target_logprobs_z=target_lp[n_eval:],
            reference_logprobs_z=refs[:, n_eval:],
        )
        return z[:nm], z[nm:], {"sigma": sigma, "num_reference_adapters": int(refs.shape[0])}


def rmia_scores(
    *,
    target_logprobs: np.ndarray,
    reference_logprobs: np.ndarray,
    target_logprobs_z: np.ndarray,
    reference_logprobs_z: np.ndarray,
    offline_a: float,
    gamma: float = 1.0,
) -> np.ndarray:
    """Offline RMIA scores (Zarifzadeh et al. 2024, Eq. 4 with the offline ``p(x)`` of Sec. 3).

    Parameters
    ----------
    target_logprobs:
        ``[n]`` mean token log-probabilities of the candidates under the target.
    reference_logprobs:
        ``[k, n]`` the same under ``k`` OUT reference models.
    target_logprobs_z, reference_logprobs_z:
        ``[m]`` and ``[k, m]`` for the population samples ``z``.
    offline_a:
        ``a`` in ``p(x) = ((1 + a) * mean_ref p(x | ref) + (1 - a)) / 2``.
    gamma:
        Likelihood-ratio threshold.

    Returns
    -------
    numpy.ndarray
        ``[n]`` scores in [0, 1]: the fraction of ``z`` with
        ``(p(x|theta)/p(x)) / (p(z|theta)/p(z)) > gamma``. Higher = more likely member.
    """
    tx = np.asarray(target_logprobs, dtype=np.float64)
    tz = np.asarray(target_logprobs_z, dtype=np.float64)
    rx = np.atleast_2d(np.asarray(reference_logprobs, dtype=np.float64))
    rz = np.atleast_2d(np.asarray(reference_logprobs_z, dtype=np.float64))
    if rx.shape[1] != tx.size or rz.shape[1] != tz.size or rx.shape[0] != rz.shape[0] or tz.size == 0:
        raise ValueError(
            f"rmia_scores: shapes do not match (target {tx.shape}, references {rx.shape}, z {tz.shape}, "
            f"z references {rz.shape}); need at least one z sample"
        )

    def ratio(target: np.ndarray, refs: np.ndarray) -> np.ndarray:
        p_out = np.exp(refs).mean(axis=0)
        return np.exp(target) / (0.5 * ((1.0 + offline_a) * p_out + (1.0 - offline_a)))

    ratio_x, ratio_z = ratio(tx, rx), np.sort(ratio(tz, rz))
    # ratio_x / ratio_z > gamma  <=>  ratio_z < ratio_x / gamma
    return np.searchsorted(ratio_z, ratio_x / gamma, side="left") / ratio_z.size


def lira_offline_scores(
    *,
    target_logprobs: np.ndarray,
    reference_logprobs: np.ndarray,
    target_logprobs_z: np.ndarray | None = None,
    reference_logprobs_z: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Offline fixed-variance LiRA (Carlini et al. 2022): ``(t(x) - mean_ref t(x)) / sigma``.

    ``sigma`` pools the references' deviations from their per-example means over the
    candidates and the z samples (``k >= 2``); with one reference, the standard deviation of
    ``t(z) - ref(z)`` over the population samples is used. Returns (scores, sigma).
    """
    tx = np.asarray(target_logprobs, dtype=np.float64)
    rx = np.atleast_2d(np.asarray(reference_logprobs, dtype=np.float64))
    if rx.shape[1] != tx.size:
        raise ValueError(f"lira_offline_scores: references {rx.shape} do not match targets {tx.shape}")
    pooled = rx
    if reference_logprobs_z is not None:
        pooled = np.concatenate([rx, np.atleast_2d(np.asarray(reference_logprobs_z, dtype=np.float64))], axis=1)
    k = pooled.shape[0]
    if k >= 2:
        dev = pooled - pooled.mean(axis=0)
        sigma = float(np.sqrt((dev**2).sum() / ((k - 1) * pooled.shape[1])))
    elif target_logprobs_z is not None and reference_logprobs_z is not None and np.size(target_logprobs_z) >= 2:
        diff = np.asarray(target_logprobs_z, dtype=np.float64) - np.atleast_2d(reference_logprobs_z)[0]
        sigma = float(diff.std(ddof=1))
    else:
        sigma = 1.0
    sigma = max(sigma, 1e-8)
    return (tx - rx.mean(axis=0)) / sigma, sigma
