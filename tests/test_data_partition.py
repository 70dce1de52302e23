"""Partitioner properties (hypothesis) and hand-checked cases."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsecure.data import DataError, partition_dirichlet, partition_iid, partition_natural
from fedsecure.data.partition import partition


def _assert_exact_cover(parts: list[list[int]], n: int, k: int) -> None:
    assert len(parts) == k
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # every index exactly once
    for p in parts:
        assert p == sorted(p)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_exact_cover_and_balanced(n, k, seed):
    parts = partition_iid(n, num_clients=k, seed=seed)
    _assert_exact_cover(parts, n, k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == partition_iid(n, num_clients=k, seed=seed)


def test_iid_depends_on_seed():
    assert partition_iid(100, num_clients=4, seed=0) != partition_iid(100, num_clients=4, seed=1)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    k=st.integers(1, 10),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
    min_per=st.integers(0, 5),
)
def test_dirichlet_exact_cover_and_min(labels, k, alpha, seed, min_per):
    if len(labels) < k * min_per:
        with pytest.raises(DataError, match="min_per_client"):
            partition_dirichlet(labels, num_clients=k, alpha=alpha, seed=seed, min_per_client=min_per)
        return
    parts = partition_dirichlet(labels, num_clients=k, alpha=alpha, seed=seed, min_per_client=min_per)
    _assert_exact_cover(parts, len(labels), k)
    assert min(len(p) for p in parts) >= min_per
    assert parts == partition_dirichlet(labels, num_clients=k, alpha=alpha, seed=seed, min_per_client=min_per)


def _label_skew(parts, labels):
    """Mean total-variation distance between client label histograms and the global one."""
    glob = Counter(labels)
    n = len(labels)
    tv = []
    for p in parts:
        c = Counter(labels[i] for i in p)
        tv.append(0.5 * sum(abs(c[lab] / len(p) - glob[lab] / n) for lab in glob))
    return sum(tv) / len(tv)


def test_dirichlet_alpha_controls_skew():
    labels = [i % 8 for i in range(2000)]
    skewed = partition_dirichlet(labels, num_clients=5, alpha=0.1, seed=0)
    near_iid = partition_dirichlet(labels, num_clients=5, alpha=1000.0, seed=0)
    assert _label_skew(skewed, labels) > 0.4
    assert _label_skew(near_iid, labels) < 0.05


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.sampled_from("abcdefg"), max_size=200), k=st.integers(1, 12))
def test_natural_exact_cover(groups, k):
    parts = partition_natural(groups, num_clients=k)
    _assert_exact_cover(parts, len(groups), k)
    distinct = len(set(groups))
    if distinct >= k:  # whole groups: no group split across clients
        owner = {}
        for c, p in enumerate(parts):
            for i in p:
                assert owner.setdefault(groups[i], c) == c
    elif groups:  # fewer groups than clients: no client mixes groups, none empty if enough items
        for p in parts:
            assert len({groups[i] for i in p}) <= 1
        if len(groups) >= k and min(Counter(groups).values()) >= k:
            assert all(parts)


def test_natural_hand_cases():
    # equal groups -> group i (first occurrence) goes to client i
    assert partition_natural(["b", "a", "b", "a", "c", "c"], num_clients=3) == [[0, 2], [1, 3], [4, 5]]
    # 4 groups, 2 clients: LPT balancing by size (sizes 3,1,1,1 -> loads 3 and 3)
    assert partition_natural(["x", "x", "x", "y", "z", "w"], num_clients=2) == [[0, 1, 2], [3, 4, 5]]
    # 1 group, 3 clients: contiguous near-equal split
    assert partition_natural(["g"] * 7, num_clients=3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_errors_name_parameter():
    with pytest.raises(DataError, match="num_clients"):
        partition_iid(10, num_clients=0, seed=0)
    with pytest.raises(DataError, match="dirichlet_alpha"):
        partition_dirichlet([0, 1], num_clients=1, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="allowed values: iid, dirichlet, natural"):
        partition("shards", n_items=4, num_clients=2, seed=0)
