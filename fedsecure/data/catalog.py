"""Dataset catalog: builders registered in :data:`fedsecure.registry.DATASETS`.

- ``private-records``: synthetic patient or bank-customer records (Faker, fictitious people)
  with per-client locales and label mixes, and Secret Sharer canaries (Carlini et al.,
  USENIX Security 2019) of known repetition counts plus never-inserted reference canaries.
- ``local``: the user's own JSONL / CSV / Parquet file or ``save_to_disk`` directory, with
  optional canaries.

Members, ``eval`` and ``nonmembers`` are always a *random* split of one pool, so they follow
the same distribution and membership inference measures memorisation, not a distribution
shift (Duan et al., "Do Membership Inference Attacks Work on Large Language Models?", 2024,
show how a shifted non-member set inflates attack success).

Threat model: the returned :class:`~fedsecure.data.base.FederatedDataset` is the auditor's
ground truth (which examples are members, which canaries were inserted and their secrets);
a client is only ever handed its own training examples.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

import fedsecure.data.partition as partition_mod
from fedsecure.data.base import Canary, DataError, Example, FederatedDataset
from fedsecure.data.local import read_rows
from fedsecure.data.partition import PARTITIONS
from fedsecure.data.synthetic import (
    DEFAULT_LOCALES,
    RECORD_KINDS,
    canary_examples,
    check_locales,
    generate_sites,
    make_canaries,
)
from fedsecure.registry import DATASETS

log = logging.getLogger(__name__)

FAKER_LICENSE = (
    "Synthetic, fictitious records generated with Faker (MIT licence, Copyright (c) 2012 Daniele Faraglia "
    "and contributors). Any resemblance to real persons is coincidental. The generated data may be used freely."
)


def _int_param(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_partition(kind: str) -> None:
    if kind not in PARTITIONS:
        raise DataError(f"partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")


def _check_repetitions(canary_repetitions: Sequence[int], canaries_per_repetition: int) -> list[int]:
    if isinstance(canary_repetitions, str | bytes | int):
        raise DataError(f"canary_repetitions must be a list of integers >= 1, got {canary_repetitions!r}")
    reps = [_int_param("canary_repetitions[]", r, minimum=1) for r in canary_repetitions]
    if len(set(reps)) != len(reps):
        raise DataError(f"canary_repetitions has duplicates {reps}; use canaries_per_repetition for more canaries")
    _int_param("canaries_per_repetition", canaries_per_repetition, minimum=0)
    return reps


def _assemble(
    *,
    name: str,
    members: list[Example],
    parts: list[list[int]],
    canaries: list[Canary],
    eval_set: list[Example],
    nonmembers: list[Example],
    seed: int,
    license: str,
) -> FederatedDataset:
    clients: list[tuple[Example, ...]] = []
    for c, idx in enumerate(parts):
        examples = [members[i] for i in idx]
        for can in canaries:
            if can.client_id == c:
                examples.extend(canary_examples(can, source="canary"))
        random.Random(f"fedsecure.shuffle/{seed}/{c}").shuffle(examples)
        clients.append(tuple(examples))
    empty = [c for c, ex in enumerate(clients) if not ex]
    if empty:
        raise DataError(f"clients {empty} received no training examples; use fewer clients or more data")
    return FederatedDataset(
        name=name,
        clients=tuple(clients),
        eval=tuple(eval_set),
        nonmembers=tuple(nonmembers),
        canaries=tuple(canaries),
        license=license,
    )


@DATASETS.register(
    "private-records",
    help="Synthetic patient/bank-customer records (Faker) per locale, with canaries of known repetition",
)
def private_records(
    *,
    num_clients: int = 4,
    examples_per_client: int = 64,
    num_eval: int = 64,
    num_nonmembers: int = 128,
    partition: str = "natural",
    dirichlet_alpha: float = 0.5,
    canary_repetitions: Sequence[int] = (1, 2, 4, 8),
    canaries_per_repetition: int = 1,
    seed: int = 0,
    locales: Sequence[str] | None = None,
    record_kind: str = "patient",
) -> FederatedDataset:
    """Synthetic private records as a federated dataset with canaries.

    Each client ``i`` is a site with locale ``locales[i % len(locales)]`` and its own label mix
    (diagnoses for patients, account types for customers). One pool of
    ``num_clients * examples_per_client + num_eval + num_nonmembers`` records (equal shares
    per site) is split at random into members, ``eval`` and ``nonmembers``.

    Parameters
    ----------
    num_clients:
        Number of clients (>= 1).
    examples_per_client:
        Member (training) records per client before canaries; with ``partition="dirichlet"``
        the average, client sizes vary.
    num_eval:
        Held-out utility examples.
    num_nonmembers:
        Held-out examples for membership inference, disjoint from ``eval``.
    partition:
        ``"natural"`` (client i = site i: own locale and label mix), ``"iid"`` (pooled and
        shuffled), ``"dirichlet"`` (label skew with ``dirichlet_alpha`` over the diagnosis /
        account type).
    dirichlet_alpha:
        Dirichlet concentration for ``partition="dirichlet"`` (> 0; small = more skew).
    canary_repetitions:
        For each count ``r``, ``canaries_per_repetition`` canaries inserted ``r`` times into one
        client's data (canary ``j`` goes to client ``j % num_clients``); as many reference
        canaries (repetitions 0) are created and never inserted.
    canaries_per_repetition:
        Canaries per repetition count (>= 0).
    seed:
        Seed of everything (records, splits, partition, canary secrets, shuffles).
    locales:
        Faker locales of the sites (default: en_US, en_GB, de_DE, fr_FR, it_IT, es_ES, nl_NL, ...).
    record_kind:
        ``"patient"`` (name, age, date of birth, MRN, city, diagnosis + ICD-10, medication,
        doctor, phone, email) or ``"customer"`` (name, customer id, address, IBAN or US
        routing/account number, account type, balance, phone, email).

    Returns
    -------
    FederatedDataset
    """
    _int_param("num_clients", num_clients, minimum=1)
    _int_param("examples_per_client", examples_per_client, minimum=1)
    _int_param("num_eval", num_eval, minimum=0)
    _int_param("num_nonmembers", num_nonmembers, minimum=0)
    _int_param("seed", seed, minimum=0)
    _check_partition(partition)
    if record_kind not in RECORD_KINDS:
        raise DataError(f"record_kind must be one of {', '.join(RECORD_KINDS)}, got {record_kind!r}")
    reps = _check_repetitions(canary_repetitions, canaries_per_repetition)
    locs = check_locales(locales) if locales is not None else DEFAULT_LOCALES

    held = num_eval + num_nonmembers
    held_per_site = [len(a) for a in np.array_split(np.arange(held), num_clients)]
    counts = [examples_per_client + h for h in held_per_site]
    per_site, sites = generate_sites(counts=counts, locales=locs, seed=seed, record_kind=record_kind)

    split_rng = random.Random(f"fedsecure.split/{seed}")
    members: list[Example] = []
    held_pool: list[Example] = []
    for examples, h in zip(per_site, held_per_site):
        held_idx = set(split_rng.sample(range(len(examples)), h))
        held_pool.extend(ex for j, ex in enumerate(examples) if j in held_idx)
        members.extend(ex for j, ex in enumerate(examples) if j not in held_idx)
    split_rng.shuffle(held_pool)
    eval_set, nonmembers = held_pool[:num_eval], held_pool[num_eval:]

    parts = partition_mod.partition(
        partition,
        n_items=len(members),
        num_clients=num_clients,
        seed=seed,
        labels=[ex["label"] for ex in members],
        groups=[ex["source"] for ex in members],
        dirichlet_alpha=dirichlet_alpha,
    )
    ref_counter = iter(range(10**9))

    def name_source(client: int) -> str:
        site = sites[client] if client >= 0 else sites[next(ref_counter) % len(sites)]
        return site.name()

    canaries = make_canaries(
        repetitions=reps,
        per_repetition=canaries_per_repetition,
        num_clients=num_clients,
        seed=seed,
        record_kind=record_kind,
        name_source=name_source,
    )
    return _assemble(
        name="private-records",
        members=members,
        parts=parts,
        canaries=canaries,
        eval_set=eval_set,
        nonmembers=nonmembers,
        seed=seed,
        license=FAKER_LICENSE,
    )


def _as_text(value: Any, *, field: str, row: int, path: str) -> str:
    if value is None:
        raise DataError(f"{path}: row {row} has no value in field {field!r}; fill or drop the row")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise DataError(f"{path}: row {row} field {field!r} is {type(value).__name__}, expected text")


@DATASETS.register("local", help="your own JSONL/CSV/HF-saved dataset")
def local_dataset(
    *,
    path: str,
    prompt_field: str = "prompt",
    response_field: str = "response",
    num_clients: int = 4,
    partition: str = "iid",
    partition_field: str | None = None,
    dirichlet_alpha: float = 0.5,
    eval_fraction: float = 0.1,
    nonmember_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
    canary_repetitions: Sequence[int] = (),
    canaries_per_repetition: int = 1,
) -> FederatedDataset:
    """A federated split of your own instruction/response data.

    Parameters
    ----------
    path:
        A ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file or a directory written by
        ``Dataset.save_to_disk`` (a ``DatasetDict`` uses its ``train`` split).
    prompt_field, response_field:
        Column names of the prompt and the response.
    num_clients:
        Number of clients (>= 1).
    partition:
        ``"iid"``, ``"dirichlet"`` (label skew over ``partition_field``) or ``"natural"``
        (one group per value of ``partition_field``, e.g. a user or source column).
    partition_field:
        Column used by ``"dirichlet"`` / ``"natural"``; also copied to ``example["source"]``.
    dirichlet_alpha:
        Dirichlet concentration (> 0).
    eval_fraction, nonmember_fraction:
        Fractions of the (deduplicated) rows held out for utility evaluation and as
        membership-inference non-members; the rest are members. Split at random.
    seed:
        Seed of subsampling, splits, partition and canaries.
    max_examples:
        Use at most this many rows (a random subset).
    canary_repetitions, canaries_per_repetition:
        Optional Secret Sharer canaries, as in ``private-records`` (default: none).

    Other columns are kept: a ``pii`` column (dict) becomes ``example["pii"]``; ``id``,
    ``source``, ``locale`` columns are copied (``id`` must be unique). Exact duplicate
    (prompt, response) rows are dropped so no text is both member and non-member.
    """
    _int_param("num_clients", num_clients, minimum=1)
    _int_param("seed", seed, minimum=0)
    _check_partition(partition)
    reps = _check_repetitions(canary_repetitions, canaries_per_repetition)
    for fname, frac in (("eval_fraction", eval_fraction), ("nonmember_fraction", nonmember_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
            raise DataError(f"{fname} must be a number in [0, 1), got {frac!r}")
    if eval_fraction + nonmember_fraction >= 1:
        raise DataError(
            f"eval_fraction + nonmember_fraction = {eval_fraction + nonmember_fraction} leaves no training data; "
            "make their sum < 1"
        )
    if max_examples is not None:
        _int_param("max_examples", max_examples, minimum=1)
    if partition in ("dirichlet", "natural") and partition_field is None:
        raise DataError(f"partition {partition!r} needs partition_field (the column holding the label/group)")

    rows, columns = read_rows(path)
    for key, col in (
        ("prompt_field", prompt_field),
        ("response_field", response_field),
        ("partition_field", partition_field),
    ):
        if col is not None and col not in columns:
            raise DataError(f"{key}: column {col!r} not found in {path}; available columns: {', '.join(columns)}")

    examples: list[Example] = []
    seen_text: set[tuple[str, str]] = set()
    seen_ids: set[str] = set()
    dropped = 0
    for i, row in enumerate(rows):
        prompt = _as_text(row[prompt_field], field=prompt_field, row=i, path=path)
        response = _as_text(row[response_field], field=response_field, row=i, path=path)
        if not response:
            raise DataError(f"{path}: row {i} has an empty {response_field!r}; nothing to train on")
        if (prompt, response) in seen_text:
            dropped += 1
            continue
        seen_text.add((prompt, response))
        ex_id = str(row["id"]) if "id" in row and row["id"] is not None else f"local-{i}"
        if ex_id in seen_ids:
            raise DataError(f"{path}: id {ex_id!r} (row {i}) is not unique; ids must identify examples")
        seen_ids.add(ex_id)
        ex: Example = {"prompt": prompt, "response": response, "id": ex_id}
        if isinstance(row.get("pii"), dict):
            ex["pii"] = {str(k): str(v) for k, v in row["pii"].items() if v is not None}
        for key in ("source", "locale"):
            if row.get(key) is not None:
                ex[key] = str(row[key])
        if partition_field is not None:
            value = _as_text(row[partition_field], field=partition_field, row=i, path=path)
            ex["label"] = value
            ex["source"] = value
        examples.append(ex)
    if dropped:
        log.warning("%s: dropped %d exact duplicate (prompt, response) rows", path, dropped)

    rng = random.Random(f"fedsecure.local/{seed}")
    rng.shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    n = len(examples)
    n_eval = math.floor(n * eval_fraction)
    n_non = math.floor(n * nonmember_fraction)
    eval_set, nonmembers, members = examples[:n_eval], examples[n_eval : n_eval + n_non], examples[n_eval + n_non :]
    if len(members) < num_clients:
        raise DataError(
            f"{path}: {len(members)} training examples for num_clients={num_clients}; "
            "use fewer clients, smaller eval/nonmember fractions or more data"
        )
    parts = partition_mod.partition(
        partition,
        n_items=len(members),
        num_clients=num_clients,
        seed=seed,
        labels=[ex.get("label") for ex in members],
        groups=[ex.get("source") for ex in members],
        dirichlet_alpha=dirichlet_alpha,
    )
    taken = {ex["id"] for ex in examples}
    counter = iter(range(10**9))

    def name_source(client: int) -> str:
        from faker import Faker

        fake = Faker("en_US")
        fake.seed_instance(f"fedsecure.local-canary/{seed}/{next(counter)}")
        for _ in range(1000):
            name = f"{fake.first_name()} {fake.last_name()}"
            if name not in taken:
                taken.add(name)
                return name
        raise DataError("could not draw a unique canary name")

    canaries = make_canaries(
        repetitions=reps,
        per_repetition=canaries_per_repetition,
        num_clients=num_clients,
        seed=seed,
        record_kind="generic",
        name_source=name_source,
    )
    return _assemble(
        name=f"local:{path}",
        members=members,
        parts=parts,
        canaries=canaries,
        eval_set=eval_set,
        nonmembers=nonmembers,
        seed=seed,
        license=f"User-provided data from {path}; its licence is that of its source.",
    )
