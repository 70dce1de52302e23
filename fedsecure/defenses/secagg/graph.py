"""SecAgg+ neighbour graph and the choice of its degree k and Shamir threshold t.

Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS'20: instead of the complete graph of Bonawitz et al.
(CCS'17), every client masks with and shares its secrets among only k = O(log n)
neighbours of a random k-regular graph.

Graph. The clients are ordered by SHA-256(session label, round nonce, client id); the
nonce is fresh server randomness of the round, so the order is unpredictable before
the round starts (static corruptions cannot target a client's neighbourhood). Each
client is joined to the k/2 clients before and after it on that cycle (the Harary /
ring-lattice graph, k even), or to everybody when k >= n - 1 (complete graph). Every
client recomputes the graph from the public round set-up, so a server cannot hand out
a different graph (a cheap malicious-server check).

Choice of k and t (:func:`derive_graph`). Assume at most C = ceil(gamma*n) corrupt
clients (colluding with the server) and at most D = ceil(delta*n) dropouts per round,
both sets independent of the fresh graph. Find the smallest even k (else n-1) and the
smallest t > k/2 with, using exact hypergeometric tails HG(N=n-1, K, k) for the number of
bad neighbours of a client,

- privacy, shares:  n * P[HG(n-1, C, k) >= t] <= 2^-sigma
  (no honest client has t corrupt neighbours, who could rebuild its secrets);
- privacy, graph:   (n^2/2) * P[two given disjoint k/2-windows of the cycle are all
  corrupt-or-dropped] <= 2^-sigma (the honest survivors stay connected, so the server
  learns no partial sum of a component);
- correctness:      n * P[HG(n-1, D, k) >= k - t + 1] <= 2^-eta
  (every client keeps >= t live neighbours, so every needed secret is recoverable);

with sigma = 40 and eta = 30 by default (the statistical security and correctness
parameters of Bell et al.). The majority condition t > k/2 means that the honest
holders of a client's shares cannot be split into two groups that each reach t without
corrupt help (against a server that lies about who dropped, t > (k + C_u)/2 is needed,
with C_u the corrupt neighbours of u).

Threat model: static corruption of at most C clients chosen before the round's nonce is
revealed; dropouts not chosen adversarially with respect to the graph. Both bounds are the
user's assumptions (``max_corrupt_fraction``, ``max_dropout_fraction``); outside them a round
may abort, and privacy holds only with the stated probability.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedsecure._hazmat.agreement import encode_parts, label


@dataclass(frozen=True)
class GraphParameters:
    """Degree k and threshold t for a round of n clients, with the failure bounds they meet."""

    num_clients: int
    neighbours: int
    threshold: int
    max_dropouts: int
    max_corrupt: int
    log2_privacy_failure: float
    """log2 of the bound on P[secrets or a partial sum of an honest client can be learned]."""
    log2_correctness_failure: float
    """log2 of the bound on P[some needed secret has fewer than t live holders]."""

    @property
    def complete(self) -> bool:
        return self.neighbours >= self.num_clients - 1


def _hg_tail(population: int, successes: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X ~ Hypergeometric(population, successes, draws), exactly."""
    if at_least <= 0:
        return 1.0
    hi = min(successes, draws)
    if at_least > hi:
        return 0.0
    total = math.comb(population, draws)
    num = sum(
        math.comb(successes, i) * math.comb(population - successes, draws - i)
        for i in range(at_least, hi + 1)
    )
    return num / total


def _log2(p: float) -> float:
    return -math.inf if p <= 0 else math.log2(p)


def _disconnect_bound(n: int, k: int, removed: int) -> float:
    """Union bound on P[the ring lattice of degree k minus ``removed`` random nodes disconnects]."""
    if k >= n - 1 or removed < k:
        return 0.0
    # Two disjoint windows of k/2 consecutive nodes both fully removed (needed to cut the cycle).
    return (n * n / 2) * (math.comb(n - k, removed - k) / math.comb(n, removed))


def graph_failure_bounds(
    n: int, k: int, t: int, *, max_dropouts: int, max_corrupt: int
) -> tuple[float, float]:
    """(privacy, correctness) failure-probability bounds for degree ``k`` and threshold ``t``."""
    privacy = n * _hg_tail(n - 1, max_corrupt, k, t) + _disconnect_bound(n, k, max_corrupt + max_dropouts)
    correctness = n * _hg_tail(n - 1, max_dropouts, k, k - t + 1)
    return min(1.0, privacy), min(1.0, correctness)


def _search(n: int, d: float, c: float, security_bits: int, correctness_bits: int) -> GraphParameters | None:
    md = min(n, math.ceil(d * n - 1e-9))
    mc = min(n, math.ceil(c * n - 1e-9))
    sec, cor = 2.0**-security_bits, 2.0**-correctness_bits
    for k in [*range(2, n - 1, 2), n - 1]:
        for t in range(k // 2 + 1, k + 1):
            privacy, correctness = graph_failure_bounds(n, k, t, max_dropouts=md, max_corrupt=mc)
            if privacy > sec:
                continue  # a larger t helps privacy
            if correctness <= cor:
                return GraphParameters(n, k, t, md, mc, _log2(privacy), _log2(correctness))
            break  # a larger t only hurts correctness: try a larger k
    return None


@lru_cache(maxsize=256)
def derive_graph(
    num_clients: int,
    *,
    max_dropout_fraction: float,
    max_corrupt_fraction: float,
    security_bits: int = 40,
    correctness_bits: int = 30,
) -> GraphParameters:
    """Smallest (k, t) meeting the privacy and correctness bounds of the module docstring.

    Raises ``ValueError`` (naming the parameters to change) when even the complete graph
    cannot meet them for ``num_clients`` clients.
    """
    n = num_clients
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients in a round, got {n}")
    args = (max_dropout_fraction, max_corrupt_fraction, security_bits, correctness_bits)
    found = _search(n, *args)
    if found is not None:
        return found
    bigger = next((m for m in range(n + 1, n + 65) if _search(m, *args) is not None), None)
    hint = f"sample at least {bigger} clients per round, " if bigger else "sample more clients per round, "
    raise ValueError(
        f"no neighbour count / threshold gives 2^-{security_bits} privacy and 2^-{correctness_bits} "
        f"correctness failure for {n} clients with max_dropout_fraction={max_dropout_fraction} and "
        f"max_corrupt_fraction={max_corrupt_fraction}; {hint}lower one of those fractions "
        f"(0 for both works with 2 clients), or lower security_bits/correctness_bits"
    )


def check_graph(n: int, k: int, t: int) -> None:
    """Validate an explicit (k, t) for ``n`` clients (``k`` already clamped to n - 1)."""
    if not 1 <= k <= n - 1:
        raise ValueError(f"neighbours must be in [1, {n - 1}] for {n} clients, got {k}")
    if k < n - 1 and k % 2:
        raise ValueError(
            f"neighbours={k}: the ring-lattice graph needs an even number of neighbours "
            f"(k/2 on each side) unless it is complete (n-1={n - 1}); use {k + 1}"
        )
    if not k // 2 < t <= k:
        raise ValueError(
            f"threshold={t} must be a strict majority of the {k} neighbours, i.e. in [{k // 2 + 1}, {k}] "
            f"(a minority threshold lets disjoint groups of holders rebuild both secrets of a client)"
        )


def graph_order(client_ids: Sequence[int], *, nonce: bytes) -> list[int]:
    """The round's pseudo-random cycle order of the clients (public, recomputable)."""
    tag = label("graph-order")
    return sorted(client_ids, key=lambda c: hashlib.sha256(encode_parts(tag, nonce, c)).digest())


def neighbours_of(client_ids: Sequence[int], *, nonce: bytes, k: int) -> dict[int, frozenset[int]]:
    """Adjacency of the ring-lattice graph of degree ``k`` (complete when k >= n-1)."""
    n = len(client_ids)
    if k >= n - 1:
        everyone = frozenset(client_ids)
        return {c: everyone - {c} for c in client_ids}
    order = graph_order(client_ids, nonce=nonce)
    half = k // 2
    out: dict[int, frozenset[int]] = {}
    for i, c in enumerate(order):
        out[c] = frozenset(order[(i + off) % n] for off in range(-half, half + 1) if off)
    return out
