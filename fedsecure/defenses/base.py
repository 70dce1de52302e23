"""Defense plug-in contract.

A defense is a named bundle of optional hooks, each called at a fixed stage of the round
(DESIGN.md, "A round, in fixed stages"); configuration order never changes the order:

client: ``wrap_training`` -> local fit -> ``transform_update`` -> transport.encode
server: combine -> aggregate -> open -> ``post_aggregate`` -> apply -> ``account``

Defenses declare the views they need (``requires_views``) and can reject combinations
in :meth:`Defense.conflicts`; the experiment collects every conflict of every part and
raises them together before any training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsecure.types import AdapterDelta, ClientUpdate, RoundContext, RunInfo, View

if TYPE_CHECKING:
    from fedsecure.federation.transport import Transport


@dataclass
class TrainingSetup:
    """Everything a client's local fit uses; ``wrap_training`` may replace any part.

    The default loop iterates ``data_loader`` (each item a *logical* batch dict with
    ``input_ids``, ``attention_mask``, ``labels``), splits it into micro-batches of at most
    ``micro_batch_size`` rows, back-propagates ``loss_fn(model, micro).sum() / rows`` and
    steps the optimizer once per logical batch. A defense that needs its own step (DP-SGD)
    sets ``step_fn``, which then performs one logical step and returns its mean loss.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: Iterable[dict[str, torch.Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    """Per-sequence loss: returns a tensor of shape [batch] (mean over supervised tokens)."""
    micro_batch_size: int | None = None
    step_fn: Callable[[dict[str, torch.Tensor]], float] | None = None
    after_step: list[Callable[[], None]] = field(default_factory=list)
    close: list[Callable[[], None]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class Defense:
    """Base class: every hook is optional and a no-op by default."""

    name: ClassVar[str] = ""
    requires_views: ClassVar[frozenset[View]] = frozenset()
    """Views the *server* must have for this defense to work (e.g. central clipping)."""

    def conflicts(self, *, transport: Transport, aggregator: Any, config: Any) -> list[str]:
        """Return human-readable conflicts ("X needs Y: fix by Z"); empty when compatible."""
        missing = self.requires_views - transport.exposes
        if missing:
            return [
                f"defense {self.name!r} needs the server to see "
                f"{', '.join(sorted(v.value for v in missing))}, but transport {transport.name!r} "
                f"exposes only {', '.join(sorted(v.value for v in transport.exposes)) or 'nothing'}"
            ]
        return []

    def setup(self, run: RunInfo) -> None:
        """Called once before training with the run's public facts (calibrate noise here)."""

    # ---- client-side stages -------------------------------------------------------
    def wrap_training(self, setup: TrainingSetup, *, client_id: int, ctx: RoundContext) -> TrainingSetup:
        return setup

    def transform_update(self, update: ClientUpdate, *, ctx: RoundContext) -> ClientUpdate:
        return update

    # ---- server-side stages -------------------------------------------------------
    def post_aggregate(self, delta: AdapterDelta, *, ctx: RoundContext, num_updates: int) -> AdapterDelta:
        return delta

    def account(self, *, ctx: RoundContext) -> Mapping[str, float]:
        """Privacy spent after this round: e.g. ``{"epsilon_client_level": 2.1}``."""
        return {}

    def report(self) -> dict[str, Any]:
        """Final figures for ``results.json`` (ε ledgers, parameters)."""
        return {}

    # ---- checkpointing ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
