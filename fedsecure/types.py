"""Core types shared by every part of a federated round (see DESIGN.md, "Core types").

- :data:`AdapterDelta`: name -> tensor of the trainable adapter parameters only, with
  peft's adapter-name-free keys, in a fixed order; the same keys every round.
- :class:`ClientUpdate`: what an honest client would send in plaintext.
- :class:`View`: what a party can observe; transports declare the views they leave.
- :class:`RoundContext`: the public facts of one round, passed to every hook.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

AdapterDelta = dict[str, torch.Tensor]
"""Ordered name -> tensor mapping of the trainable adapter parameters (a delta or a state)."""


class View(enum.StrEnum):
    """What a party can observe in a run."""

    SERVER_PER_CLIENT = "server_per_client"
    """The server sees each client's plaintext update."""
    SERVER_PER_CLIENT_PARTIAL = "server_per_client_partial"
    """The server sees part of each client's update in plaintext (selective encryption);
    the hidden coordinates read as zero."""
    SERVER_AGGREGATE = "server_aggregate"
    """The server sees only the (weighted) sum of the sampled clients' updates."""
    RELEASED_MODEL = "released_model"
    """Anyone sees the final adapter (and the base model)."""
    MALICIOUS_CLIENT = "malicious_client"
    """A participating client sees the global adapter each round and controls its update."""


class InvalidUpdateError(ValueError):
    """A client update was rejected (NaN/Inf, wrong keys or shapes, bad example count)."""

    def __init__(self, client_id: int | str, reason: str) -> None:
        super().__init__(f"client {client_id}: {reason}")
        self.client_id = client_id
        self.reason = reason


class ModelMismatchError(RuntimeError):
    """Clients of one round received a global adapter other than the one the server announced."""


class RoundAbortedError(RuntimeError):
    """A round produced no aggregate (e.g. too few secure-aggregation shares survived).

    Engines keep the previous global adapter and record the round as aborted; nothing
    beyond what the protocol already revealed leaks.
    """


@dataclass(frozen=True)
class ClientUpdate:
    """A client's plaintext contribution to one round.

    Attributes
    ----------
    client_id: the client's id.
    round: the round number (0-based).
    delta: trained adapter minus the global adapter it received.
    num_examples: the number of training examples behind the update (FedAvg weight).
    metrics: client-side training metrics (loss, steps, seconds, ...).
    """

    client_id: int
    round: int
    delta: AdapterDelta
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def validate_against(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`InvalidUpdateError` unless keys/shapes match and values are finite."""
        if self.num_examples <= 0:
            raise InvalidUpdateError(self.client_id, f"num_examples must be > 0, got {self.num_examples}")
        missing = [k for k in reference if k not in self.delta]
        extra = [k for k in self.delta if k not in reference]
        if missing or extra:
            raise InvalidUpdateError(
                self.client_id,
                f"adapter keys differ from the global adapter (missing {missing[:3]}, unexpected {extra[:3]})",
            )
        for k, ref in reference.items():
            t = self.delta[k]
            if not isinstance(t, torch.Tensor):
                raise InvalidUpdateError(self.client_id, f"{k} is {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(ref.shape):
                raise InvalidUpdateError(
                    self.client_id, f"{k} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
            if not torch.isfinite(t).all():
                raise InvalidUpdateError(self.client_id, f"{k} contains NaN or Inf")


@dataclass(frozen=True)
class RoundContext:
    """Public facts of one round, shared by the server and the clients."""

    round: int
    num_rounds: int
    sampled_clients: tuple[int, ...]
    num_clients: int
    seed: int
    global_hash: str = ""
    run_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def sampling_rate(self) -> float:
        return len(self.sampled_clients) / max(1, self.num_clients)


def adapter_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of an adapter, in order."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def scale(state: Mapping[str, torch.Tensor], factor: float) -> AdapterDelta:
    return {k: v * factor for k, v in state.items()}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> AdapterDelta:
    return {k: a[k] + b[k] for k in a}


def weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> AdapterDelta:
    if len(states) != len(weights) or not states:
        raise ValueError("weighted_sum needs one weight per state and at least one state")
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in states[0].items()}
    for s, w in zip(states, weights, strict=True):
        for k in out:
            out[k].add_(s[k].float(), alpha=float(w))
    return out


@dataclass(frozen=True)
class RunInfo:
    """Public facts of a whole run, given to transports, defenses and attacks before training.

    Plug-ins calibrate from it (e.g. DP noise from the planned number of participations).
    """

    num_clients: int
    num_rounds: int
    clients_per_round: int
    client_num_examples: Mapping[int, int]
    batch_size: int
    local_steps: int
    """Logical optimizer steps per client per round."""
    seed: int
    num_parameters: int = 0
    dropout_rate: float = 0.0

    @property
    def client_sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients
