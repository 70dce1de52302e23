"""Transports: how client updates travel to the server and are combined.

A transport has three roles (DESIGN.md, "Core types"):

- client: ``encode(update) -> Sealed``
- server: ``combine(sealed, ...) -> SealedSum`` without any secret key
- key holder: ``open(sealed_sum) -> AdapterDelta`` (the *weighted sum* of the deltas)

Clients pre-scale their delta by their FedAvg weight (``num_examples``) before sealing,
so that a transport only ever has to *sum*. The weights themselves are public (the
server divides by their total). ``exposes`` declares what the server can observe.

Multi-stage protocols (secure aggregation) implement :meth:`Transport.begin_round` for
their set-up stages and may consult ``dropped`` in :meth:`Transport.combine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedsecure.registry import TRANSPORTS
from fedsecure.types import AdapterDelta, ClientUpdate, RoundContext, RunInfo, View


@dataclass
class Sealed:
    """What one client sends: a payload only the transport understands, plus public facts."""

    client_id: int
    weight: float
    payload: Any
    nbytes: int
    plaintext: AdapterDelta | None = None
    """The per-client plaintext, only when the transport exposes it to the server."""
    stage_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class SealedSum:
    """The server's combination of sealed updates; ``open`` turns it into a weighted sum."""

    client_ids: tuple[int, ...]
    total_weight: float
    payload: Any
    cost: dict[str, float] = field(default_factory=dict)


class Transport(ABC):
    """Base class of all transports (plain, secagg, ckks).

    Subclasses set ``name`` and ``exposes`` and implement the three roles.
    """

    name: ClassVar[str] = ""
    exposes: ClassVar[frozenset[View]] = frozenset()

    def setup(self, run: RunInfo) -> None:
        """Called once before training with the run's public facts."""

    def begin_round(
        self, ctx: RoundContext, *, template: Mapping[str, torch.Tensor], client_ids: Sequence[int]
    ) -> None:
        """Per-round set-up (fresh keys, key exchange). ``template`` gives names and shapes."""

    @abstractmethod
    def encode(self, update: ClientUpdate, *, ctx: RoundContext) -> Sealed:
        """Client side: seal ``update.delta * update.num_examples``."""

    @abstractmethod
    def combine(
        self, sealed: Sequence[Sealed], *, ctx: RoundContext, dropped: Sequence[int] = ()
    ) -> SealedSum:
        """Server side, without keys: combine the sealed updates that arrived."""

    @abstractmethod
    def open(self, combined: SealedSum, *, ctx: RoundContext) -> AdapterDelta:
        """Key holder: return the weighted sum of the deltas in ``combined``."""

    def plaintext_fraction(self) -> float:
        """Fraction of coordinates the server sees in plaintext (1.0 for plain)."""
        return 1.0 if View.SERVER_PER_CLIENT in self.exposes else 0.0

    def cost_report(self) -> dict[str, Any]:
        """Transport-specific cost figures for ``results.json``."""
        return {}


def delta_nbytes(delta: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in delta.values())


@TRANSPORTS.register("plain", help="Plaintext fp32 updates; the server sees each client's update")
class PlainTransport(Transport):
    """No protection: the server sees every client's update (View.SERVER_PER_CLIENT)."""

    name = "plain"
    exposes = frozenset({View.SERVER_PER_CLIENT, View.SERVER_AGGREGATE})

    def encode(self, update: ClientUpdate, *, ctx: RoundContext) -> Sealed:
        w = float(update.num_examples)
        scaled = {k: v.detach().float() * w for k, v in update.delta.items()}
        return Sealed(
            client_id=update.client_id,
            weight=w,
            payload=scaled,
            nbytes=delta_nbytes(scaled),
            plaintext={k: v.detach().float() for k, v in update.delta.items()},
        )

    def combine(
        self, sealed: Sequence[Sealed], *, ctx: RoundContext, dropped: Sequence[int] = ()
    ) -> SealedSum:
        if not sealed:
            raise ValueError("no client update arrived this round")
        total = {k: torch.zeros_like(v) for k, v in sealed[0].payload.items()}
        for s in sealed:
            for k in total:
                total[k].add_(s.payload[k])
        return SealedSum(
            client_ids=tuple(s.client_id for s in sealed),
            total_weight=sum(s.weight for s in sealed),
            payload=total,
        )

    def open(self, combined: SealedSum, *, ctx: RoundContext) -> AdapterDelta:
        return dict(combined.payload)
