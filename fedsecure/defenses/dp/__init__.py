"""Differential privacy: :func:`make_private` (DP-SGD for an existing loop), the HF Trainer
integration (:class:`DPTrainer`, imported lazily), and the federated ``dp-sgd`` defense.

Importing this package registers ``dp-sgd`` in :data:`fedsecure.registry.DEFENSES`.
"""

from typing import Any

from fedsecure.defenses.dp.accounting import (
    ACCOUNTANTS,
    DPConfigError,
    PrivacyBudgetExceededError,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_of,
)
from fedsecure.defenses.dp.engine import (
    GRAD_SAMPLE_MODES,
    DPIntegrityError,
    DPSettings,
    PrivateTraining,
    make_private,
)
from fedsecure.defenses.dp.sgd import DPSGDDefense  # registers "dp-sgd"

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "DPConfigError",
    "DPIntegrityError",
    "DPSGDDefense",
    "DPSettings",
    "DPTrainer",
    "PrivacyBudgetExceededError",
    "PrivateTraining",
    "calibrate_noise_multiplier",
    "default_delta",
    "epsilon_of",
    "make_private",
]


def __getattr__(name: str) -> Any:
    if name == "DPTrainer":  # imports transformers.Trainer (slow): only on use
        from fedsecure.defenses.dp.trainer import DPTrainer

        return DPTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
