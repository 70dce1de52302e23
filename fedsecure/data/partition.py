"""Partitioners: split item indices among federated clients (IID, Dirichlet label skew, natural).

- :func:`partition_iid`: a seeded permutation cut into near-equal parts (sizes differ by <= 1).
- :func:`partition_dirichlet`: label-distribution skew of Hsu, Qi, Brown, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification",
  arXiv:1909.06335 (2019): for each label, client proportions ~ Dirichlet(alpha); small
  alpha = strongly non-IID, large alpha -> IID. Every client gets at least
  ``min_per_client`` items (a repair step moves items from the largest clients if the
  draws leave one short).
- :func:`partition_natural`: a fixed assignment of natural groups (locale, source, site) to
  clients, as in LEAF (Caldas et al., arXiv:1812.01097) where each writer/user is a client.

Every function returns ``num_clients`` lists of indices into the input; every index appears in
exactly one list; lists are sorted ascending. Data randomness (``seed``) is not a security
secret and uses numpy's PCG64.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedsecure.data.base import DataError

PARTITIONS = ("iid", "dirichlet", "natural")
"""Partition names accepted by the dataset builders."""

_DIRICHLET_TRIES = 100


def _check_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")


def partition_iid(n_items: int, *, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n_items)`` and cut it into ``num_clients`` near-equal parts.

    Parameters
    ----------
    n_items:
        Number of items (>= 0).
    num_clients:
        Number of clients (>= 1). With ``n_items < num_clients`` some clients get nothing.
    seed:
        Shuffling seed.

    Returns
    -------
    list of list of int
        Per-client sorted indices; sizes differ by at most one.
    """
    _check_clients(num_clients)
    if n_items < 0:
        raise DataError(f"n_items must be >= 0, got {n_items}")
    perm = np.random.default_rng(seed).permutation(n_items)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: Sequence[Hashable],
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    min_per_client: int = 1,
) -> list[list[int]]:
    """Label-skewed split: for each label, client shares ~ Dirichlet(alpha * 1).

    Parameters
    ----------
    labels:
        One label per item (any hashable).
    num_clients:
        Number of clients (>= 1).
    alpha:
        Dirichlet concentration (> 0); 0.1 = each client sees few labels, 100 = near IID.
    seed:
        Seed of the draws.
    min_per_client:
        Every client receives at least this many items (needs
        ``len(labels) >= num_clients * min_per_client``).

    Returns
    -------
    list of list of int
        Per-client sorted indices.
    """
    _check_clients(num_clients)
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet_alpha must be a finite number > 0, got {alpha!r}")
    if min_per_client < 0:
        raise DataError(f"min_per_client must be >= 0, got {min_per_client}")
    n = len(labels)
    if n < num_clients * min_per_client:
        raise DataError(
            f"cannot give each of {num_clients} clients {min_per_client} item(s) from {n} items; "
            "use fewer clients, a smaller min_per_client, or more data"
        )
    rng = np.random.default_rng(seed)
    by_label: dict[Hashable, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    classes = list(by_label.values())  # first-occurrence order: deterministic

    parts: list[list[int]] = []
    for _ in range(_DIRICHLET_TRIES):
        parts = [[] for _ in range(num_clients)]
        for idx in classes:
            shuffled = rng.permutation(np.asarray(idx))
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(shuffled)).round().astype(int)
            for c, chunk in enumerate(np.split(shuffled, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_per_client:
            break
    else:
        # Repair: move random items from the currently largest client to each short one.
        for c in range(num_clients):
            while len(parts[c]) < min_per_client:
                donor = max(range(num_clients), key=lambda k: (len(parts[k]), -k))
                j = int(rng.integers(len(parts[donor])))
                parts[c].append(parts[donor].pop(j))
    return [sorted(p) for p in parts]


def partition_natural(groups: Sequence[Hashable], *, num_clients: int) -> list[list[int]]:
    """Assign natural groups (locale, source, site) to clients, deterministically.

    With at least as many groups as clients, whole groups go to clients: groups in order of
    decreasing size (ties: first occurrence) each to the least-loaded client (ties: lowest
    id), so ``k`` equal groups for ``k`` clients map group ``i`` (by first occurrence) to
    client ``i``. With fewer groups than clients, every group gets at least one client, the
    remaining clients go to the groups with the most items per client, and a group's items
    (in input order) are cut into near-equal contiguous parts among its clients.

    Parameters
    ----------
    groups:
        One group key per item.
    num_clients:
        Number of clients (>= 1).

    Returns
    -------
    list of list of int
        Per-client sorted indices.
    """
    _check_clients(num_clients)
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = list(members)  # first occurrence
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    if not order:
        return parts
    if len(order) >= num_clients:
        ranked = sorted(range(len(order)), key=lambda k: -len(members[order[k]]))  # stable
        for k in ranked:
            target = min(range(num_clients), key=lambda c: (len(parts[c]), c))
            parts[target].extend(members[order[k]])
        return [sorted(p) for p in parts]
    alloc = [1] * len(order)
    for _ in range(num_clients - len(order)):
        best = max(range(len(order)), key=lambda k: (len(members[order[k]]) / alloc[k], -k))
        alloc[best] += 1
    client = 0
    for k, g in enumerate(order):
        for chunk in np.array_split(np.asarray(members[g]), alloc[k]):
            parts[client] = sorted(int(i) for i in chunk)
            client += 1
    return parts


def partition(
    kind: str,
    *,
    n_items: int,
    num_clients: int,
    seed: int,
    labels: Sequence[Hashable] | None = None,
    groups: Sequence[Hashable] | None = None,
    dirichlet_alpha: float = 0.5,
    min_per_client: int = 1,
) -> list[list[int]]:
    """Dispatch on a partition name (``"iid"``, ``"dirichlet"``, ``"natural"``)."""
    if kind == "iid":
        return partition_iid(n_items, num_clients=num_clients, seed=seed)
    if kind == "dirichlet":
        if labels is None:
            raise DataError("partition 'dirichlet' needs a label per example (set partition_field)")
        return partition_dirichlet(
            labels, num_clients=num_clients, alpha=dirichlet_alpha, seed=seed, min_per_client=min_per_client
        )
    if kind == "natural":
        if groups is None:
            raise DataError("partition 'natural' needs a group per example (set partition_field)")
        return partition_natural(groups, num_clients=num_clients)
    raise DataError(f"unknown partition {kind!r}; allowed values: {', '.join(PARTITIONS)}")
