"""Dataset containers shared by every data source: examples, canaries, federated splits.

A :class:`FederatedDataset` holds, for one run, each client's *training* examples (canary
copies included), a held-out utility ``eval`` set, a held-out ``nonmembers`` set drawn from
the same distribution as the members (the negatives of membership inference), and the
:class:`Canary` records an auditor needs to measure memorisation.

Canaries follow Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and
Testing Unintended Memorization in Neural Networks", USENIX Security 2019: a fixed format
(``prompt`` + ``prefix``) completed by a random ``secret`` from a known randomness space
(every string of ``length`` characters over ``alphabet``), inserted ``repetitions`` times.

Threat model: the dataset object is ground truth held by the *auditor* (the experimenter).
It is never sent to the server; clients only ever see their own ``clients[i]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Example = dict[str, Any]
"""One instruction/response pair.

Keys: ``"prompt"`` (str), ``"response"`` (str), ``"id"`` (str, unique within a dataset);
optional ``"pii"`` (dict field -> value, e.g. name, age, patient_id, email, phone, iban),
``"source"`` / ``"locale"`` (str), ``"label"`` (str, the label used by Dirichlet
partitioning), ``"canary_id"`` (str, only on canary copies).
"""


class DataError(ValueError):
    """Bad dataset parameters or input data; the message names the parameter and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset path that does not exist."""


@dataclass(frozen=True)
class Canary:
    """A secret inserted into training data to measure memorisation (Secret Sharer).

    Attributes
    ----------
    canary_id:
        Unique id; canary copies in the training data carry it as ``example["canary_id"]``.
    prompt:
        The prompt under which the secret appears.
    prefix:
        Response text before the secret (e.g. ``"The access code of Jane Roe is "``).
    secret:
        The random secret (e.g. ``"482913"``).
    alphabet:
        The secret's alphabet (e.g. ``"0123456789"``).
    length:
        Secret length; the candidate space is every string of this length over ``alphabet``.
    repetitions:
        How many times the canary was inserted into training data; ``0`` marks a reference
        canary that was never inserted (the exposure baseline).
    client_id:
        The client whose training data holds the copies (``-1`` for reference canaries).
    """

    canary_id: str
    prompt: str
    prefix: str
    secret: str
    alphabet: str
    length: int
    repetitions: int
    client_id: int

    def __post_init__(self) -> None:
        if self.length < 1 or len(self.secret) != self.length:
            raise DataError(f"canary {self.canary_id}: secret length {len(self.secret)} != length {self.length}")
        if not self.alphabet or any(c not in self.alphabet for c in self.secret):
            raise DataError(f"canary {self.canary_id}: secret has characters outside alphabet {self.alphabet!r}")
        if len(set(self.alphabet)) != len(self.alphabet):
            raise DataError(f"canary {self.canary_id}: alphabet {self.alphabet!r} repeats characters")
        if self.repetitions < 0:
            raise DataError(f"canary {self.canary_id}: repetitions must be >= 0, got {self.repetitions}")
        if self.repetitions == 0 and self.client_id != -1:
            raise DataError(f"canary {self.canary_id}: a reference canary (repetitions 0) has client_id -1")

    @property
    def response(self) -> str:
        """The full canary response, ``prefix + secret``."""
        return self.prefix + self.secret

    @property
    def num_candidates(self) -> int:
        """Size of the randomness space, ``len(alphabet) ** length``."""
        return len(self.alphabet) ** self.length

    def with_secret(self, secret: str) -> str:
        """The response with ``secret`` in place of the real one (a candidate for exposure)."""
        if len(secret) != self.length or any(c not in self.alphabet for c in secret):
            raise DataError(f"candidate secret {secret!r} is not {self.length} characters over {self.alphabet!r}")
        return self.prefix + secret

    def as_example(self, *, copy_index: int = 0) -> Example:
        """The canary as a training example (``id`` = ``"<canary_id>#<copy_index>"``)."""
        return {
            "prompt": self.prompt,
            "response": self.response,
            "id": f"{self.canary_id}#{copy_index}",
            "canary_id": self.canary_id,
        }


@dataclass(frozen=True)
class FederatedDataset:
    """A federated split of one dataset plus the auditor's ground truth.

    Attributes
    ----------
    name:
        Dataset name (e.g. ``"private-records"``).
    clients:
        Per-client training examples, canary copies included, shuffled deterministically.
    eval:
        Held-out utility evaluation set (never trained on).
    nonmembers:
        Held-out examples from the same distribution as the members, disjoint from ``eval``
        (the negatives for membership inference).
    canaries:
        Inserted canaries (``repetitions >= 1``) and reference canaries (``repetitions == 0``).
    license:
        Licence / provenance notice of the data.
    """

    name: str
    clients: tuple[tuple[Example, ...], ...]
    eval: tuple[Example, ...]
    nonmembers: tuple[Example, ...]
    canaries: tuple[Canary, ...]
    license: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", tuple(tuple(c) for c in self.clients))
        object.__setattr__(self, "eval", tuple(self.eval))
        object.__setattr__(self, "nonmembers", tuple(self.nonmembers))
        object.__setattr__(self, "canaries", tuple(self.canaries))
        if not self.clients:
            raise DataError(f"dataset {self.name!r} has no clients")
        for part, examples in (("eval", self.eval), ("nonmembers", self.nonmembers)):
            if any("canary_id" in ex for ex in examples):
                raise DataError(f"dataset {self.name!r}: canary copies found in {part}")
        ids = [c.canary_id for c in self.canaries]
        if len(set(ids)) != len(ids):
            raise DataError(f"dataset {self.name!r}: duplicate canary ids")

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def members(self) -> list[Example]:
        """Unique non-canary training examples across clients (by ``id``, in client order)."""
        seen: set[str] = set()
        out: list[Example] = []
        for client in self.clients:
            for ex in client:
                if "canary_id" in ex or ex["id"] in seen:
                    continue
                seen.add(ex["id"])
                out.append(ex)
        return out

    def client_sizes(self) -> dict[int, int]:
        """client id -> number of training examples (canary copies included)."""
        return {i: len(c) for i, c in enumerate(self.clients)}

    def canary_counts(self) -> dict[str, int]:
        """canary id -> number of copies actually present in the training data."""
        counts = {c.canary_id: 0 for c in self.canaries}
        for client in self.clients:
            for ex in client:
                cid = ex.get("canary_id")
                if cid is not None:
                    counts[cid] = counts.get(cid, 0) + 1
        return counts

    def client_members(self, client_id: int) -> list[Example]:
        """Unique non-canary training examples of one client."""
        if not 0 <= client_id < len(self.clients):
            raise DataError(f"client_id must be in [0, {len(self.clients)}), got {client_id}")
        seen: set[str] = set()
        out: list[Example] = []
        for ex in self.clients[client_id]:
            if "canary_id" not in ex and ex["id"] not in seen:
                seen.add(ex["id"])
                out.append(ex)
        return out

    def summary(self) -> Mapping[str, Any]:
        """Counts for logs and reports (no example content, no secrets)."""
        return {
            "name": self.name,
            "num_clients": self.num_clients,
            "client_sizes": self.client_sizes(),
            "num_members": len(self.members()),
            "num_eval": len(self.eval),
            "num_nonmembers": len(self.nonmembers),
            "canary_repetitions": sorted(c.repetitions for c in self.canaries),
        }
