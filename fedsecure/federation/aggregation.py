"""Aggregators: pure functions from client updates to the global delta.

- ``fedavg`` (McMahan et al. 2017): example-weighted mean; works on a weighted *sum*, so
  it runs under secure aggregation and CKKS.
- ``median`` (coordinate-wise; Yin et al. 2018), ``trimmed-mean`` (Yin et al. 2018) and
  ``krum`` / ``multi-krum`` (Blanchard et al. 2017): Byzantine-robust; they need each
  client's plaintext update, so transports that hide per-client updates are rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedsecure.registry import AGGREGATORS
from fedsecure.types import AdapterDelta, ClientUpdate, weighted_sum


class Aggregator:
    """Base class. ``needs_per_client`` aggregators cannot run on a sealed sum."""

    name: ClassVar[str] = ""
    needs_per_client: ClassVar[bool] = False

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AdapterDelta:
        raise NotImplementedError

    def from_sum(self, weighted_sum_delta: AdapterDelta, *, total_weight: float) -> AdapterDelta:
        """Aggregate from the transport's weighted sum (only sum-compatible aggregators)."""
        raise NotImplementedError(f"aggregator {self.name!r} needs per-client updates")


@AGGREGATORS.register("fedavg", help="Example-weighted mean (McMahan et al. 2017); works on sealed sums")
class FedAvg(Aggregator):
    """FedAvg: sum_i n_i * delta_i / sum_i n_i."""

    name = "fedavg"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AdapterDelta:
        if not updates:
            raise ValueError("fedavg needs at least one update")
        total = float(sum(u.num_examples for u in updates))
        return weighted_sum([u.delta for u in updates], [u.num_examples / total for u in updates])

    def from_sum(self, weighted_sum_delta: AdapterDelta, *, total_weight: float) -> AdapterDelta:
        if total_weight <= 0:
            raise ValueError(f"total weight must be > 0, got {total_weight}")
        return {k: v / total_weight for k, v in weighted_sum_delta.items()}


def _stack(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.delta[key].float() for u in updates])


@AGGREGATORS.register("median", help="Coordinate-wise median (Yin et al. 2018); needs per-client updates")
class Median(Aggregator):
    """Coordinate-wise median (for an even count, the mean of the two middle values)."""

    name = "median"
    needs_per_client = True

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AdapterDelta:
        if not updates:
            raise ValueError("median needs at least one update")
        out: AdapterDelta = {}
        for k in updates[0].delta:
            s = torch.sort(_stack(updates, k), dim=0).values
            n = s.shape[0]
            out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return out


@AGGREGATORS.register("trimmed-mean", help="Coordinate-wise trimmed mean (Yin et al. 2018); per-client")
class TrimmedMean(Aggregator):
    """Drop the ``trim_fraction`` largest and smallest values per coordinate, average the rest."""

    name = "trimmed-mean"
    needs_per_client = True

    def __init__(self, *, trim_fraction: float = 0.1) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AdapterDelta:
        n = len(updates)
        if n == 0:
            raise ValueError("trimmed-mean needs at least one update")
        b = int(self.trim_fraction * n)
        out: AdapterDelta = {}
        for k in updates[0].delta:
            s = torch.sort(_stack(updates, k), dim=0).values
            out[k] = s[b : n - b].mean(dim=0)
        return out


@AGGREGATORS.register("krum", help="(Multi-)Krum (Blanchard et al. 2017); needs per-client updates")
class Krum(Aggregator):
    """Krum: pick the update(s) closest to their n - f - 2 nearest neighbours.

    With ``num_selected`` = m > 1 this is Multi-Krum: the mean of the m best-scored updates.
    """

    name = "krum"
    needs_per_client = True

    def __init__(self, *, num_byzantine: int = 1, num_selected: int = 1) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected

    def scores(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        n = len(updates)
        if n < 2 * self.num_byzantine + 3:
            raise ValueError(
                f"krum needs n >= 2f + 3 clients per round; got n={n}, f={self.num_byzantine}: "
                "sample more clients or lower num_byzantine"
            )
        flat = torch.stack([torch.cat([u.delta[k].reshape(-1).float() for k in u.delta]) for u in updates])
        d = torch.cdist(flat.double(), flat.double()).pow(2)
        m = n - self.num_byzantine - 2
        d.fill_diagonal_(float("inf"))
        return torch.sort(d, dim=1).values[:, :m].sum(dim=1)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AdapterDelta:
        order = torch.argsort(self.scores(updates))[: self.num_selected].tolist()
        chosen = [updates[i] for i in order]
        return weighted_sum([u.delta for u in chosen], [1.0 / len(chosen)] * len(chosen))
