"""Local datasets from JSONL / CSV / save_to_disk, with clear errors."""

from __future__ import annotations

import csv
import json

import pytest

from fedsecure.data import DataError, DataFileNotFoundError, local_dataset
from fedsecure.registry import DATASETS


def _rows(n=40):
    return [{"q": f"Question {i}?", "a": f"Answer number {i}.", "user": f"u{i % 3}", "id": f"r{i}"} for i in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    return p


@pytest.fixture
def csv_file(tmp_path):
    p = tmp_path / "data.csv"
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["q", "a", "user", "id"])
        w.writeheader()
        w.writerows(_rows())
    return p


def _check_split(ds, n=40, eval_fraction=0.1, nonmember_fraction=0.2):
    members = ds.members()
    assert len(ds.eval) == int(n * eval_fraction) and len(ds.nonmembers) == int(n * nonmember_fraction)
    ids = [e["id"] for e in members] + [e["id"] for e in ds.eval] + [e["id"] for e in ds.nonmembers]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # exact cover, disjoint
    for e in members:
        i = int(e["id"][1:])
        assert e["prompt"] == f"Question {i}?" and e["response"] == f"Answer number {i}."


@pytest.mark.parametrize("which", ["jsonl", "csv_file"])
def test_load_file_iid(which, request):
    path = request.getfixturevalue(which)
    ds = DATASETS.get("local")(path=str(path), prompt_field="q", response_field="a", num_clients=3, seed=1)
    _check_split(ds)
    sizes = sorted(ds.client_sizes().values())
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 28
    again = local_dataset(path=str(path), prompt_field="q", response_field="a", num_clients=3, seed=1)
    assert [[e["id"] for e in c] for c in ds.clients] == [[e["id"] for e in c] for c in again.clients]


def test_natural_partition_by_field(jsonl):
    ds = local_dataset(
        path=str(jsonl),
        prompt_field="q",
        response_field="a",
        num_clients=3,
        partition="natural",
        partition_field="user",
        eval_fraction=0.0,
        nonmember_fraction=0.0,
    )
    assert [len({e["source"] for e in c}) for c in ds.clients] == [1, 1, 1]
    assert len({c[0]["source"] for c in ds.clients}) == 3


def test_save_to_disk_and_canaries(tmp_path):
    import datasets

    d = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows())}).save_to_disk(str(d))
    ds = local_dataset(
        path=str(d), prompt_field="q", response_field="a", num_clients=2, canary_repetitions=(1, 3), seed=0
    )
    _check_split(ds)
    assert ds.canary_counts() == {c.canary_id: c.repetitions for c in ds.canaries}
    assert sorted(c.repetitions for c in ds.canaries) == [0, 0, 1, 3]


def test_duplicates_dropped(tmp_path):
    p = tmp_path / "dup.jsonl"
    rows = [{"prompt": "p", "response": "r"}] * 3 + [{"prompt": f"p{i}", "response": "r"} for i in range(9)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ds = local_dataset(path=str(p), num_clients=2, eval_fraction=0.0, nonmember_fraction=0.0)
    assert len(ds.members()) == 10


def test_errors(tmp_path, jsonl):
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        local_dataset(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"prompt_field: column 'prompt' not found.*available columns: q, a, user, id"):
        local_dataset(path=str(jsonl))
    with pytest.raises(DataError, match="partition_field"):
        local_dataset(path=str(jsonl), prompt_field="q", response_field="a", partition="dirichlet")
    with pytest.raises(DataError, match="partition must be one of"):
        local_dataset(path=str(jsonl), prompt_field="q", response_field="a", partition="random")
    with pytest.raises(DataError, match="eval_fraction"):
        local_dataset(path=str(jsonl), prompt_field="q", response_field="a", eval_fraction=1.5)
    with pytest.raises(DataError, match="num_clients=50"):
        local_dataset(path=str(jsonl), prompt_field="q", response_field="a", num_clients=50)
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        local_dataset(path=str(bad))
