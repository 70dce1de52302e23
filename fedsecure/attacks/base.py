"""Attack plug-in contract.

``Attack.run(view) -> AttackResult``. Every attack states its threat model and the views
it needs. If the run's transport hides a needed view, the result is
``applicable=False`` with the reason -- never a silent run on data the attacker could
not see. One score convention everywhere: higher = more likely member / more leakage.

Two kinds of attacks:

- *observers* (``when = "round"``) watch the server each round through
  :meth:`Attack.observe_round` and report in :meth:`Attack.finish`;
- *released-model* attacks (``when = "final"``) run once on the final adapter through
  :meth:`Attack.run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from fedsecure.types import AdapterDelta, ClientUpdate, RoundContext, View


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack; JSON-serialisable through :meth:`to_dict`."""

    name: str
    threat_model: str
    applicable: bool
    reason: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threat_model": self.threat_model,
            "applicable": self.applicable,
            "reason": self.reason,
            "metrics": dict(self.metrics),
            "details": dict(self.details),
        }

    @classmethod
    def not_applicable(cls, attack: Attack, reason: str) -> AttackResult:
        return cls(name=attack.name, threat_model=attack.threat_model, applicable=False, reason=reason)


@dataclass
class RoundObservation:
    """What a server-side observer receives after each round.

    ``updates`` holds the per-client plaintext updates only when the transport exposes
    View.SERVER_PER_CLIENT (otherwise it is empty); ``aggregate`` is the opened weighted
    mean the server applies. ``global_before`` is the adapter the server sent.
    ``ground_truth`` carries the clients' true training examples, for *scoring* the
    attack only; an attack must never read it to compute its guess.
    """

    ctx: RoundContext
    views: frozenset[View]
    global_before: AdapterDelta
    aggregate: AdapterDelta
    updates: Sequence[ClientUpdate] = ()
    model: Any = None
    tokenizer: Any = None
    train_config: Any = None
    ground_truth: Mapping[int, Sequence[Mapping[str, str]]] = field(default_factory=dict)


@dataclass
class AttackTarget:
    """What a released-model attack receives: the final model and the evaluation splits.

    ``members``/``nonmembers`` are lists of examples (dicts with ``prompt`` and
    ``response``) drawn from the same distribution; ``canaries`` are the inserted secrets
    with their repetition counts; ``base_model`` is the model without the adapter
    (a callable that returns it, loaded lazily), used as a reference.
    """

    model: torch.nn.Module
    tokenizer: Any
    members: Sequence[Mapping[str, str]]
    nonmembers: Sequence[Mapping[str, str]]
    canaries: Sequence[Any] = ()
    population: Sequence[Mapping[str, str]] = ()
    model_spec: Any = None
    lora_config: Any = None
    max_length: int = 128
    seed: int = 0
    claimed_epsilon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base class of all attacks."""

    name: ClassVar[str] = ""
    threat_model: ClassVar[str] = ""
    needs: ClassVar[frozenset[View]] = frozenset({View.RELEASED_MODEL})
    when: ClassVar[Literal["round", "final"]] = "final"

    def applicability(self, views: frozenset[View], *, transport_name: str = "") -> str:
        """Return "" when the attack can run with ``views``, else the reason it cannot."""
        missing = self.needs - views
        if View.SERVER_PER_CLIENT in missing and View.SERVER_PER_CLIENT_PARTIAL in views:
            # selective encryption: per-client attacks run on the coordinates left in plaintext
            missing = missing - {View.SERVER_PER_CLIENT}
        if not missing:
            return ""
        return (
            f"needs {', '.join(sorted(v.value for v in missing))}, but the run's transport "
            f"{transport_name!r} exposes only {', '.join(sorted(v.value for v in views)) or 'nothing'}"
        )

    def observe_round(self, obs: RoundObservation) -> None:
        """Observers: look at one round."""

    def finish(self) -> AttackResult:
        """Observers: the result after the last round."""
        raise NotImplementedError

    def run(self, target: AttackTarget) -> AttackResult:
        """Released-model attacks: attack the final model."""
        raise NotImplementedError
