"""SecAgg+ protocol: message types and the client / server state machines, stage by stage.

Papers: Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS'17 (double
masking, Shamir shares of the self-mask seed and of the mask key, dropout recovery);
Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS'20 (SecAgg+: sparse k-regular neighbour graph).

Threat model. The server is honest-but-curious and may collude with fewer than t of any
client's neighbours (the degree and threshold of :mod:`.graph` make that hold with
probability 1 - 2^-40 for at most a max_corrupt_fraction of clients). It learns the
masked vectors, the sum of the surviving clients' quantised weighted updates, who
dropped at which stage, and the public weights -- nothing else. Cheap checks against
a *malicious* server: clients recompute the neighbour graph and the no-wrap ring bound
from the public round set-up and reject a different one; share ciphertexts are
authenticated (ChaCha20-Poly1305) with the round session and party ids, so forged or
redirected shares are detected; every client binds the hash of the global adapter it
received into the share plaintext and the pairwise-mask keys, so clients given
different models detect it (:class:`ModelMismatchError`) before sending a masked
input; a client answers one unmask request per round, refuses requests naming a client
both alive and dropped, or leaving it fewer than t live neighbours; optional Ed25519
signatures on the advertised keys (a PKI of long-term identity keys) stop key
substitution. Not covered: a malicious server that tells different clients different
dropout stories needs t > (k + C_u)/2 and the consistency round of Bonawitz et al.;
malicious clients can send any value within the ring (no range proofs).

Stages (each client's messages travel through the server; every message is a frozen
dataclass with ``to_bytes``/``from_bytes``, so a real engine can carry them between
processes):

0. set-up (server -> all): :class:`RoundSetup` -- clients, k, t, ring, fresh nonce.
1. advertise keys: client -> :class:`AdvertiseKeys` (two fresh X25519 public keys);
   server -> each client :class:`NeighbourKeys` of its live neighbours.
2. share keys: client -> :class:`ShareKeys`: t-of-m Shamir shares of the self-mask seed b_u
   and of the mask private key s_u^SK, one AEAD ciphertext per neighbour, plus hash
   commitments to each share; server -> :class:`ForwardedShares`.
3. masked input: client -> :class:`MaskedInput` y_u = q_u + PRG(b_u) +- pairwise masks (see
   :meth:`SecAggClient.masked_input`), in the ring's word size.
4. unmask: server -> :class:`UnmaskRequest` (which neighbours are alive / dropped);
   client -> :class:`UnmaskResponse` (seed shares of the alive, key shares of the dropped);
   the server checks every share against its commitment, rebuilds the secrets with t
   shares, regenerates only the masks still in the sum and subtracts them.

A client that drops at stage 1 or 2 is simply left out; one that drops at stage 3 has its
pairwise masks removed from its neighbours' inputs through its rebuilt mask key; one
that drops at stage 4 is still in the sum (its self-mask seed is rebuilt from its
neighbours). Below threshold the server raises :class:`SecAggAbortError` before
requesting a single share, or, if holders vanish during stage 4, before using any.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedsecure._hazmat import agreement as ka
from fedsecure._hazmat import prg, shamir
from fedsecure._hazmat.quantisation import FixedPoint, fits, quantise
from fedsecure.defenses.secagg.graph import check_graph, neighbours_of
from fedsecure.types import ModelMismatchError as CoreModelMismatchError
from fedsecure.types import RoundAbortedError

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "unmask")
"""Protocol stages at which a client can drop out, in order."""

_MAGIC = b"FSA1"
_SHARE_PLAINTEXT = 32 + 2 * shamir.SHARE_BYTES
_SHARE_CIPHERTEXT = _SHARE_PLAINTEXT + ka.aead_overhead()
_MAX_ID = 2**63 - 1


# ---- errors -----------------------------------------------------------------------------
class SecAggError(ValueError):
    """Base class of secure-aggregation failures; the round produces no output."""


class SecAggAbortError(SecAggError, RoundAbortedError):
    """Too few live parties hold the shares a needed secret requires: the round aborts.

    Raised before any share is requested (or, if holders drop during the unmask stage,
    before any rebuilt secret is used), so nothing beyond the masked vectors leaks.
    """


class SecAggIntegrityError(SecAggError, RoundAbortedError):
    """A message failed authentication or a consistency check (tampering, bad share)."""


class ModelMismatchError(SecAggIntegrityError, CoreModelMismatchError):
    """Clients of one round received different global adapters from the server."""


class MessageFormatError(SecAggError):
    """Bytes that do not parse as a secure-aggregation message."""


class ProtocolStateError(SecAggError):
    """A stage was run out of order or twice."""


# ---- binary codec -----------------------------------------------------------------------
class _Writer:
    def __init__(self, kind: int) -> None:
        self.buf = bytearray(_MAGIC)
        self.buf.append(kind)

    def u8(self, v: int) -> None:
        self.buf += struct.pack("<B", v)

    def u32(self, v: int) -> None:
        self.buf += struct.pack("<I", v)

    def u64(self, v: int) -> None:
        self.buf += struct.pack("<Q", v)

    def f64(self, v: float) -> None:
        self.buf += struct.pack("<d", v)

    def blob(self, b: bytes) -> None:
        self.u32(len(b))
        self.buf += b

    def fixed(self, b: bytes, n: int) -> None:
        if len(b) != n:
            raise MessageFormatError(f"field must have {n} bytes, got {len(b)}")
        self.buf += b

    def ids(self, ids: Sequence[int]) -> None:
        self.u32(len(ids))
        self.buf += struct.pack(f"<{len(ids)}Q", *ids)


class _Reader:
    def __init__(self, data: bytes, kind: int, name: str) -> None:
        self.data = memoryview(bytes(data))
        self.pos = 0
        self.name = name
        head = self.take(5)
        if bytes(head[:4]) != _MAGIC or head[4] != kind:
            raise MessageFormatError(f"not a {name} message")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise MessageFormatError(f"truncated {self.name} message")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return struct.unpack("<B", self.take(1))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]

    def blob(self) -> bytes:
        return bytes(self.take(self.u32()))

    def fixed(self, n: int) -> bytes:
        return bytes(self.take(n))

    def ids(self) -> tuple[int, ...]:
        n = self.u32()
        return tuple(struct.unpack(f"<{n}Q", self.take(8 * n)))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MessageFormatError(
                f"{len(self.data) - self.pos} trailing bytes after a {self.name} message"
            )


class _Message:
    KIND: ClassVar[int] = 0

    def to_bytes(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` in bytes."""
        return len(self.to_bytes())


@dataclass(frozen=True)
class RoundSetup(_Message):
    """Stage 0, server -> every sampled client: the public parameters of the round."""

    KIND: ClassVar[int] = 1
    run_id: str
    round: int
    nonce: bytes
    client_ids: tuple[int, ...]
    neighbours: int
    threshold: int
    ring_bits: int
    scale: float
    clip_range: float
    max_weight: float
    num_params: int
    stochastic_rounding: bool = False
    prg: str = "aes128-ctr"
    signed: bool = False

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(ring_bits=self.ring_bits, scale=self.scale, clip_range=self.clip_range)

    @property
    def session(self) -> bytes:
        """32-byte digest of the whole set-up; bound into every key, AD and signature."""
        return ka.digest("session", self.to_bytes())

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.blob(self.run_id.encode())
        w.u64(self.round)
        w.fixed(self.nonce, 32)
        w.ids(self.client_ids)
        w.u32(self.neighbours)
        w.u32(self.threshold)
        w.u8(self.ring_bits)
        w.f64(self.scale)
        w.f64(self.clip_range)
        w.f64(self.max_weight)
        w.u64(self.num_params)
        w.u8(int(self.stochastic_rounding))
        w.blob(self.prg.encode())
        w.u8(int(self.signed))
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSetup:
        r = _Reader(data, cls.KIND, "RoundSetup")
        out = cls(
            run_id=r.blob().decode(),
            round=r.u64(),
            nonce=r.fixed(32),
            client_ids=r.ids(),
            neighbours=r.u32(),
            threshold=r.u32(),
            ring_bits=r.u8(),
            scale=r.f64(),
            clip_range=r.f64(),
            max_weight=r.f64(),
            num_params=r.u64(),
            stochastic_rounding=bool(r.u8()),
            prg=r.blob().decode(),
            signed=bool(r.u8()),
        )
        r.done()
        return out


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Stage 1, client -> server: the client's two fresh X25519 public keys (+ signature)."""

    KIND: ClassVar[int] = 2
    round: int
    sender: int
    mask_public: bytes
    enc_public: bytes
    signature: bytes = b""

    def _write(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.fixed(self.mask_public, ka.PUBLIC_KEY_BYTES)
        w.fixed(self.enc_public, ka.PUBLIC_KEY_BYTES)
        w.blob(self.signature)

    @classmethod
    def _read(cls, r: _Reader, round_: int) -> AdvertiseKeys:
        return cls(
            round=round_,
            sender=r.u64(),
            mask_public=r.fixed(ka.PUBLIC_KEY_BYTES),
            enc_public=r.fixed(ka.PUBLIC_KEY_BYTES),
            signature=r.blob(),
        )

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        self._write(w)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r = _Reader(data, cls.KIND, "AdvertiseKeys")
        out = cls._read(r, r.u64())
        r.done()
        return out


@dataclass(frozen=True)
class NeighbourKeys(_Message):
    """Stage 1, server -> client: the advertised keys of the client's live neighbours."""

    KIND: ClassVar[int] = 3
    round: int
    receiver: int
    entries: tuple[AdvertiseKeys, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.receiver)
        w.u32(len(self.entries))
        for e in self.entries:
            e._write(w)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> NeighbourKeys:
        r = _Reader(data, cls.KIND, "NeighbourKeys")
        round_, receiver = r.u64(), r.u64()
        entries = tuple(AdvertiseKeys._read(r, round_) for _ in range(r.u32()))
        r.done()
        return cls(round=round_, receiver=receiver, entries=entries)


@dataclass(frozen=True)
class ShareCommitment:
    """Public hash commitments to the two shares a client dealt to one holder."""

    holder: int
    seed_share: bytes
    key_share: bytes


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Stage 2, client -> server: encrypted shares for each neighbour, and commitments."""

    KIND: ClassVar[int] = 4
    round: int
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    commitments: tuple[ShareCommitment, ...]
    seed_commitment: bytes

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.sender)
        w.u32(len(self.ciphertexts))
        for holder, ct in self.ciphertexts:
            w.u64(holder)
            w.blob(ct)
        w.u32(len(self.commitments))
        for c in self.commitments:
            w.u64(c.holder)
            w.fixed(c.seed_share, 32)
            w.fixed(c.key_share, 32)
        w.fixed(self.seed_commitment, 32)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        r = _Reader(data, cls.KIND, "ShareKeys")
        round_, sender = r.u64(), r.u64()
        cts = tuple((r.u64(), r.blob()) for _ in range(r.u32()))
        commits = tuple(ShareCommitment(r.u64(), r.fixed(32), r.fixed(32)) for _ in range(r.u32()))
        seed_c = r.fixed(32)
        r.done()
        return cls(round=round_, sender=sender, ciphertexts=cts, commitments=commits, seed_commitment=seed_c)


@dataclass(frozen=True)
class ForwardedShares(_Message):
    """Stage 3 input, server -> client: the ciphertexts addressed to the client."""

    KIND: ClassVar[int] = 5
    round: int
    receiver: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.receiver)
        w.u32(len(self.ciphertexts))
        for sender, ct in self.ciphertexts:
            w.u64(sender)
            w.blob(ct)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> ForwardedShares:
        r = _Reader(data, cls.KIND, "ForwardedShares")
        round_, receiver = r.u64(), r.u64()
        cts = tuple((r.u64(), r.blob()) for _ in range(r.u32()))
        r.done()
        return cls(round=round_, receiver=receiver, ciphertexts=cts)


@dataclass(frozen=True, eq=False)
class MaskedInput(_Message):
    """Stage 3, client -> server: the masked quantised weighted update (ring words)."""

    KIND: ClassVar[int] = 6
    _HEADER: ClassVar[int] = 5 + 8 + 8 + 8 + 1 + 8
    round: int
    sender: int
    weight: float
    vector: np.ndarray = field(repr=False)

    @property
    def ring_bits(self) -> int:
        return self.vector.dtype.itemsize * 8

    @property
    def nbytes(self) -> int:
        return self._HEADER + self.vector.nbytes

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.sender)
        w.f64(self.weight)
        w.u8(self.ring_bits)
        w.u64(self.vector.size)
        w.buf += self.vector.astype(self.vector.dtype.newbyteorder("<"), copy=False).tobytes()
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        r = _Reader(data, cls.KIND, "MaskedInput")
        round_, sender, weight, bits, n = r.u64(), r.u64(), r.f64(), r.u8(), r.u64()
        if bits not in (32, 64):
            raise MessageFormatError(f"MaskedInput ring_bits must be 32 or 64, got {bits}")
        dt = np.dtype("<u4" if bits == 32 else "<u8")
        vec = np.frombuffer(r.take(n * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))
        r.done()
        return cls(round=round_, sender=sender, weight=weight, vector=vec)


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Stage 4, server -> client: which of its neighbours sent a masked input and which dropped."""

    KIND: ClassVar[int] = 7
    round: int
    receiver: int
    alive: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.receiver)
        w.ids(self.alive)
        w.ids(self.dropped)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = _Reader(data, cls.KIND, "UnmaskRequest")
        out = cls(round=r.u64(), receiver=r.u64(), alive=r.ids(), dropped=r.ids())
        r.done()
        return out


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    """Stage 4, client -> server: seed shares of alive neighbours, key shares of dropped ones."""

    KIND: ClassVar[int] = 8
    round: int
    sender: int
    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.KIND)
        w.u64(self.round)
        w.u64(self.sender)
        for group in (self.seed_shares, self.key_shares):
            w.u32(len(group))
            for owner, share in group:
                w.u64(owner)
                w.fixed(share, shamir.SHARE_BYTES)
        return bytes(w.buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = _Reader(data, cls.KIND, "UnmaskResponse")
        round_, sender = r.u64(), r.u64()
        groups = []
        for _ in range(2):
            groups.append(tuple((r.u64(), r.fixed(shamir.SHARE_BYTES)) for _ in range(r.u32())))
        r.done()
        return cls(round=round_, sender=sender, seed_shares=groups[0], key_shares=groups[1])


# ---- shared derivations -----------------------------------------------------------------
def model_digest(global_hash: str) -> bytes:
    """32-byte digest of the global-adapter hash a party received (public)."""
    return ka.digest("global-model", global_hash)


def _signed_payload(session: bytes, sender: int, mask_public: bytes, enc_public: bytes) -> bytes:
    return ka.encode_parts(ka.label("advertise"), session, sender, mask_public, enc_public)


def _share_ad(session: bytes, sender: int, receiver: int) -> bytes:
    return ka.encode_parts(ka.label("share-ad"), session, sender, receiver)


def _share_key(shared: bytes, session: bytes, sender: int, receiver: int) -> bytes:
    return ka.hkdf(shared, name="share-encryption", salt=session, info=(sender, receiver), length=32)


def _share_commitment(session: bytes, kind: str, owner: int, holder: int, share: bytes) -> bytes:
    return ka.digest("share-commitment", session, kind, owner, holder, share)


def _seed_commitment(session: bytes, owner: int, seed: bytes) -> bytes:
    return ka.digest("seed-commitment", session, owner, seed)


def pairwise_mask_key(
    shared: bytes, *, session: bytes, a: int, b: int, model: bytes, algorithm: str
) -> bytes:
    """PRG key of the pair {a, b} from their X25519 secret, the session and the model digest."""
    lo, hi = (a, b) if a < b else (b, a)
    return ka.hkdf(
        shared, name="pairwise-mask", salt=session, info=(lo, hi, model), length=prg.key_bytes(algorithm)
    )


def self_mask_key(seed: bytes, *, session: bytes, owner: int, algorithm: str) -> bytes:
    """PRG key of a client's self mask from its seed b_u."""
    return ka.hkdf(seed, name="self-mask", salt=session, info=(owner,), length=prg.key_bytes(algorithm))


def _x(client_id: int) -> int:
    """Shamir x-coordinate of a holder."""
    return client_id + 1


def validate_setup(setup: RoundSetup) -> dict[int, frozenset[int]]:
    """Check a round set-up's internal consistency; return the neighbour graph.

    Every client runs this (cheap malicious-server check): a graph, threshold or ring
    that breaks the protocol's guarantees is rejected.
    """
    ids = setup.client_ids
    n = len(ids)
    if n < 2:
        raise SecAggError(f"round {setup.round}: secure aggregation needs >= 2 clients, got {n}")
    if list(ids) != sorted(set(ids)) or any(not 0 <= c < _MAX_ID for c in ids):
        raise SecAggIntegrityError(f"round {setup.round}: client ids must be distinct, sorted, in [0, 2^63)")
    try:
        check_graph(n, setup.neighbours, setup.threshold)
    except ValueError as err:
        raise SecAggIntegrityError(f"round {setup.round}: bad graph parameters: {err}") from None
    if len(setup.nonce) != 32:
        raise SecAggIntegrityError("round nonce must have 32 bytes")
    if setup.prg not in prg.PRG_ALGORITHMS:
        raise SecAggIntegrityError(f"unknown PRG {setup.prg!r}; expected one of {prg.PRG_ALGORITHMS}")
    if setup.num_params < 1:
        raise SecAggError("num_params must be >= 1")
    if not (math.isfinite(setup.max_weight) and setup.max_weight > 0):
        raise SecAggIntegrityError(f"max_weight must be positive, got {setup.max_weight}")
    try:
        spec = setup.fixed_point
    except ValueError as err:
        raise SecAggIntegrityError(f"round {setup.round}: {err}") from None
    if not fits(spec=spec, num_clients=n, max_weight=setup.max_weight):
        raise SecAggIntegrityError(
            f"round {setup.round}: scale {setup.scale} with {n} clients of weight <= {setup.max_weight} and "
            f"clip_range {setup.clip_range} could wrap the {setup.ring_bits}-bit ring"
        )
    return neighbours_of(ids, nonce=setup.nonce, k=setup.neighbours)


class ClientStage(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


# ---- client -----------------------------------------------------------------------------
class SecAggClient:
    """One client's side of one round. Fresh keys and seeds; never reused across rounds.

    Parameters
    ----------
    client_id:
        This client's id (must be in ``setup.client_ids``).
    setup:
        The round set-up received from the server (validated here).
    global_hash:
        Hash of the global adapter this client received (``RoundContext.global_hash``).
    identity_key:
        Long-term Ed25519 key, required when ``setup.signed``.
    peer_identities:
        client id -> 32-byte Ed25519 public key (the PKI), required when ``setup.signed``.

    Secrets (both X25519 private keys, the self-mask seed, the shares held for
    neighbours) live only in private attributes, are never logged, never part of
    ``repr``, and are dropped as soon as the protocol no longer needs them. Instances
    refuse to be pickled.
    """

    def __init__(
        self,
        client_id: int,
        setup: RoundSetup,
        *,
        global_hash: str,
        identity_key: Any = None,
        peer_identities: Mapping[int, bytes] | None = None,
    ) -> None:
        self.client_id = int(client_id)
        self.setup = setup
        self._graph = validate_setup(setup)
        if self.client_id not in self._graph:
            raise SecAggError(f"client {client_id} is not among the round's clients")
        if setup.signed and (identity_key is None or peer_identities is None):
            raise SecAggError(f"client {client_id}: the round requires signed keys but no identity key / PKI")
        self.neighbours = self._graph[self.client_id]
        self._session = setup.session
        self._model = model_digest(global_hash)
        self._identity = identity_key
        self._pki = dict(peer_identities or {})
        self.stage = ClientStage.NEW
        self._enc_sk: Any = None
        self._mask_sk: Any = None
        self._peer_keys: dict[int, AdvertiseKeys] = {}
        self._held_seed: dict[int, bytes] = {}
        self._held_key: dict[int, bytes] = {}
        self._self_seed = b""
        self.share_senders: frozenset[int] = frozenset()
        self.clipped = 0

    def __repr__(self) -> str:
        return f"SecAggClient(client_id={self.client_id}, round={self.setup.round}, stage={self.stage.value})"

    def __reduce__(self) -> Any:
        raise TypeError("SecAggClient holds round secrets and cannot be pickled")

    def _expect(self, stage: ClientStage, name: str) -> None:
        if self.stage is not stage:
            raise ProtocolStateError(
                f"client {self.client_id}: {name} called at stage {self.stage.value}, expected {stage.value}"
            )

    def _check_header(self, msg_round: int, receiver: int, name: str) -> None:
        if msg_round != self.setup.round or receiver != self.client_id:
            raise SecAggIntegrityError(
                f"client {self.client_id}: {name} for client {receiver} in round {msg_round}, expected "
                f"client {self.client_id} in round {self.setup.round}"
            )

    def wipe(self) -> None:
        """Forget every secret of the round (also done when the protocol no longer needs them)."""
        self._enc_sk = self._mask_sk = None
        self._self_seed = b""
        self._held_seed, self._held_key = {}, {}

    # -- stage 1 ---------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        """Generate the round's two X25519 key pairs; return their public halves."""
        self._expect(ClientStage.NEW, "advertise_keys")
        self._enc_sk = ka.generate_x25519()
        self._mask_sk = ka.generate_x25519()
        mask_pk, enc_pk = ka.x25519_public_bytes(self._mask_sk), ka.x25519_public_bytes(self._enc_sk)
        sig = b""
        if self.setup.signed:
            sig = ka.sign(self._identity, _signed_payload(self._session, self.client_id, mask_pk, enc_pk))
        self.stage = ClientStage.ADVERTISED
        logger.debug("secagg round %d: client %d advertised keys", self.setup.round, self.client_id)
        return AdvertiseKeys(self.setup.round, self.client_id, mask_pk, enc_pk, sig)

    # -- stage 2 ---------------------------------------------------------------------------
    def share_keys(self, msg: NeighbourKeys) -> ShareKeys:
        """Check the neighbours' keys; deal t-of-m shares of the seed and mask key to them."""
        self._expect(ClientStage.ADVERTISED, "share_keys")
        self._check_header(msg.round, msg.receiver, "NeighbourKeys")
        own = {ka.x25519_public_bytes(self._mask_sk), ka.x25519_public_bytes(self._enc_sk)}
        seen_keys: set[bytes] = set(own)
        peers: dict[int, AdvertiseKeys] = {}
        for e in msg.entries:
            if e.sender not in self.neighbours:
                raise SecAggIntegrityError(
                    f"client {self.client_id}: the server sent keys of client {e.sender}, which is not its "
                    "neighbour in the round's graph"
                )
            if e.sender in peers:
                raise SecAggIntegrityError(f"client {self.client_id}: keys of client {e.sender} sent twice")
            if e.mask_public in seen_keys or e.enc_public in seen_keys or e.mask_public == e.enc_public:
                raise SecAggIntegrityError(
                    f"client {self.client_id}: client {e.sender} advertised a public key already in use "
                    "this round"
                )
            if self.setup.signed:
                pk = self._pki.get(e.sender)
                payload = _signed_payload(self._session, e.sender, e.mask_public, e.enc_public)
                if pk is None or not ka.verify(pk, e.signature, payload):
                    raise SecAggIntegrityError(
                        f"client {self.client_id}: the keys of client {e.sender} are not signed by its "
                        "identity key: the server (or someone in between) substituted them"
                    )
            seen_keys.update((e.mask_public, e.enc_public))
            peers[e.sender] = e
        t = self.setup.threshold
        if len(peers) < t:
            raise SecAggAbortError(
                f"client {self.client_id}: only {len(peers)} of its {len(self.neighbours)} neighbours "
                f"advertised keys, fewer than the threshold t={t}; aborting before dealing any share"
            )
        holders = sorted(peers)
        seed = secrets.token_bytes(32)
        seed_shares = shamir.split(seed, threshold=t, xs=[_x(v) for v in holders])
        key_shares = shamir.split(
            ka.x25519_private_bytes(self._mask_sk), threshold=t, xs=[_x(v) for v in holders]
        )
        cts: list[tuple[int, bytes]] = []
        commits: list[ShareCommitment] = []
        for v in holders:
            s_seed, s_key = seed_shares[_x(v)], key_shares[_x(v)]
            key = _share_key(
                ka.x25519_shared(self._enc_sk, peers[v].enc_public), self._session, self.client_id, v
            )
            cts.append(
                (
                    v,
                    ka.aead_encrypt(
                        key, self._model + s_seed + s_key, _share_ad(self._session, self.client_id, v)
                    ),
                )
            )
            commits.append(
                ShareCommitment(
                    v,
                    _share_commitment(self._session, "seed", self.client_id, v, s_seed),
                    _share_commitment(self._session, "key", self.client_id, v, s_key),
                )
            )
        self._peer_keys = peers
        self._self_seed = seed
        self.stage = ClientStage.SHARED
        logger.debug(
            "secagg round %d: client %d dealt shares to %d neighbours",
            self.setup.round,
            self.client_id,
            len(holders),
        )
        return ShareKeys(
            self.setup.round,
            self.client_id,
            tuple(cts),
            tuple(commits),
            _seed_commitment(self._session, self.client_id, seed),
        )

    # -- stage 3 ---------------------------------------------------------------------------
    def masked_input(self, msg: ForwardedShares, update: np.ndarray, *, weight: float) -> MaskedInput:
        """Store the neighbours' shares; return the quantised ``weight * update``, masked.

        y_u = q_u + PRG(b_u) + sum_{v in N2(u), u < v} PRG(s_uv) - sum_{v in N2(u), u > v} PRG(s_uv)
        over Z_{2^R}, where N2(u) are the neighbours whose shares arrived (they will mask
        with u as well) and s_uv is derived from X25519(s_u^SK, s_v^PK), the session and the
        global-adapter digest.
        """
        self._expect(ClientStage.SHARED, "masked_input")
        self._check_header(msg.round, msg.receiver, "ForwardedShares")
        setup = self.setup
        if update.shape != (setup.num_params,):
            raise SecAggError(
                f"client {self.client_id}: update has shape {update.shape}, expected ({setup.num_params},)"
            )
        if not (math.isfinite(weight) and 0 < weight <= setup.max_weight):
            raise SecAggError(
                f"client {self.client_id}: weight {weight} is outside (0, max_weight={setup.max_weight}] "
                "that the ring was sized for; raise the transport's max_weight"
            )
        held_seed: dict[int, bytes] = {}
        held_key: dict[int, bytes] = {}
        for sender, ct in msg.ciphertexts:
            if sender not in self._peer_keys or sender in held_seed:
                raise SecAggIntegrityError(
                    f"client {self.client_id}: unexpected or duplicate shares from client {sender}"
                )
            key = _share_key(
                ka.x25519_shared(self._enc_sk, self._peer_keys[sender].enc_public),
                self._session,
                sender,
                self.client_id,
            )
            try:
                plain = ka.aead_decrypt(key, ct, _share_ad(self._session, sender, self.client_id))
            except ka.DecryptionError:
                raise SecAggIntegrityError(
                    f"client {self.client_id}: the key shares from client {sender} failed authentication "
                    "(tampered or redirected ciphertext, or a different round set-up); aborting before "
                    "sending a masked input"
                ) from None
            if len(plain) != _SHARE_PLAINTEXT:
                raise SecAggIntegrityError(
                    f"client {self.client_id}: malformed share plaintext from {sender}"
                )
            if plain[:32] != self._model:
                raise ModelMismatchError(
                    f"client {self.client_id} and client {sender} received different global adapters from "
                    "the server this round (their global-adapter hashes differ); aborting before sending a "
                    "masked input"
                )
            held_seed[sender] = plain[32 : 32 + shamir.SHARE_BYTES]
            held_key[sender] = plain[32 + shamir.SHARE_BYTES :]
        t = setup.threshold
        if len(held_seed) < t:
            raise SecAggAbortError(
                f"client {self.client_id}: shares arrived from only {len(held_seed)} neighbours, fewer than "
                f"the threshold t={t}; refusing to send a masked input"
            )
        stochastic_key = os.urandom(16) if setup.stochastic_rounding else None
        vec, self.clipped = quantise(
            np.asarray(update, dtype=np.float32),
            weight=weight,
            spec=setup.fixed_point,
            stochastic_key=stochastic_key,
        )
        add = [
            self_mask_key(self._self_seed, session=self._session, owner=self.client_id, algorithm=setup.prg)
        ]
        sub: list[bytes] = []
        for v in sorted(held_seed):
            k = pairwise_mask_key(
                ka.x25519_shared(self._mask_sk, self._peer_keys[v].mask_public),
                session=self._session,
                a=self.client_id,
                b=v,
                model=self._model,
                algorithm=setup.prg,
            )
            (add if self.client_id < v else sub).append(k)
        prg.apply_masks(vec, add_keys=add, sub_keys=sub, algorithm=setup.prg)
        self._held_seed, self._held_key = held_seed, held_key
        self.share_senders = frozenset(held_seed)
        # Own secrets are no longer needed: the server rebuilds them from the neighbours' shares.
        self._enc_sk = self._mask_sk = None
        self._self_seed = b""
        self.stage = ClientStage.MASKED
        logger.debug(
            "secagg round %d: client %d sent a masked input (%d pairwise masks)",
            setup.round,
            self.client_id,
            len(add) + len(sub) - 1,
        )
        return MaskedInput(setup.round, self.client_id, float(weight), vec)

    # -- stage 4 ---------------------------------------------------------------------------
    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of the alive neighbours and key shares of the dropped ones (once)."""
        self._expect(ClientStage.MASKED, "unmask")
        self._check_header(msg.round, msg.receiver, "UnmaskRequest")
        alive, dropped = set(msg.alive), set(msg.dropped)
        if len(alive) != len(msg.alive) or len(dropped) != len(msg.dropped):
            raise SecAggIntegrityError(f"client {self.client_id}: unmask request lists a client twice")
        if alive & dropped:
            raise SecAggIntegrityError(
                f"client {self.client_id}: unmask request names clients {sorted(alive & dropped)} both "
                "alive and dropped (revealing both their secrets would expose their inputs); refusing"
            )
        unknown = (alive | dropped) - self.share_senders
        if unknown:
            raise SecAggIntegrityError(
                f"client {self.client_id}: unmask request names clients {sorted(unknown)} whose shares it "
                "does not hold"
            )
        if len(alive) < self.setup.threshold:
            raise SecAggAbortError(
                f"client {self.client_id}: only {len(alive)} of its neighbours are said to be alive, fewer "
                f"than the threshold t={self.setup.threshold}; refusing to unmask so small an aggregate"
            )
        resp = UnmaskResponse(
            self.setup.round,
            self.client_id,
            tuple((u, self._held_seed[u]) for u in sorted(alive)),
            tuple((u, self._held_key[u]) for u in sorted(dropped)),
        )
        self.wipe()
        self.stage = ClientStage.DONE
        logger.debug(
            "secagg round %d: client %d revealed %d seed and %d key shares",
            self.setup.round,
            self.client_id,
            len(alive),
            len(dropped),
        )
        return resp


# ---- server -----------------------------------------------------------------------------
@dataclass
class ServerTimings:
    """Seconds the server spent per task in the round."""

    sum_s: float = 0.0
    reconstruct_s: float = 0.0
    regenerate_s: float = 0.0

    @property
    def unmask_s(self) -> float:
        return self.reconstruct_s + self.regenerate_s


class SecAggServer:
    """The server's side of one round: routes messages, sums masked inputs, unmasks the sum.

    Parameters
    ----------
    setup:
        The round set-up the server sent.
    global_hash:
        Hash of the global adapter the server sent (bound into the pairwise masks).
    peer_identities:
        client id -> Ed25519 public key, to verify signed keys when ``setup.signed``.
    """

    def __init__(
        self, setup: RoundSetup, *, global_hash: str, peer_identities: Mapping[int, bytes] | None = None
    ) -> None:
        self.setup = setup
        self.graph = validate_setup(setup)
        self._session = setup.session
        self._model = model_digest(global_hash)
        self._pki = dict(peer_identities or {})
        if setup.signed and not self._pki:
            raise SecAggError("the round requires signed keys but the server has no PKI (peer_identities)")
        self.keys: dict[int, AdvertiseKeys] = {}
        self.share_holders: dict[int, frozenset[int]] = {}
        self.commitments: dict[int, dict[int, ShareCommitment]] = {}
        self.seed_commitments: dict[int, bytes] = {}
        self.weights: dict[int, float] = {}
        self._acc: np.ndarray | None = None
        self._requests: dict[int, UnmaskRequest] = {}
        self.needed_keys: frozenset[int] = frozenset()
        self.masks_regenerated = 0
        self.timings = ServerTimings()
        self.stage = "advertise_keys"

    def __repr__(self) -> str:
        return f"SecAggServer(round={self.setup.round}, stage={self.stage})"

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolStateError(f"server: stage {self.stage} now, {stage} requested")

    @property
    def advertised(self) -> frozenset[int]:
        """U1: clients that advertised keys."""
        return frozenset(self.keys)

    @property
    def shared(self) -> frozenset[int]:
        """U2: clients that dealt their shares."""
        return frozenset(self.share_holders)

    @property
    def survivors(self) -> frozenset[int]:
        """U3: clients whose masked input is in the sum."""
        return frozenset(self.weights)

    # -- stage 1 ---------------------------------------------------------------------------
    def receive_advertise(self, msgs: Mapping[int, AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        """Collect the advertised keys (U1) and route each client its live neighbours' keys."""
        self._expect("advertise_keys")
        seen: dict[bytes, int] = {}
        for cid, m in msgs.items():
            if m.sender != cid or cid not in self.graph or m.round != self.setup.round:
                raise SecAggIntegrityError(f"server: advertised keys from client {cid} are mislabelled")
            if self.setup.signed and not ka.verify(
                self._pki.get(cid, b""),
                m.signature,
                _signed_payload(self._session, cid, m.mask_public, m.enc_public),
            ):
                raise SecAggIntegrityError(
                    f"server: the keys of client {cid} are not signed by its identity key"
                )
            for pk in (m.mask_public, m.enc_public):
                if pk in seen:
                    raise SecAggIntegrityError(
                        f"server: clients {seen[pk]} and {cid} advertised the same public key"
                    )
                seen[pk] = cid
            self.keys[cid] = m
        u1 = self.advertised
        short = {u: len(self.graph[u] & u1) for u in u1 if len(self.graph[u] & u1) < self.setup.threshold}
        if short:
            raise SecAggAbortError(
                f"round {self.setup.round}: after dropouts at stage advertise_keys, clients {sorted(short)} "
                f"have fewer than t={self.setup.threshold} live neighbours ({short}); aborting before any "
                "share is dealt (raise neighbours or lower the dropout)"
            )
        self.stage = "share_keys"
        return {
            u: NeighbourKeys(self.setup.round, u, tuple(self.keys[v] for v in sorted(self.graph[u] & u1)))
            for u in sorted(u1)
        }

    # -- stage 2 ---------------------------------------------------------------------------
    def receive_shares(self, msgs: Mapping[int, ShareKeys]) -> dict[int, ForwardedShares]:
        """Collect the encrypted shares (U2) and forward each to its holder."""
        self._expect("share_keys")
        u1 = self.advertised
        inbox: dict[int, list[tuple[int, bytes]]] = {}
        for cid, m in msgs.items():
            if m.sender != cid or cid not in u1 or m.round != self.setup.round:
                raise SecAggIntegrityError(f"server: shares from client {cid} are mislabelled or unexpected")
            expected = self.graph[cid] & u1
            holders = [h for h, _ in m.ciphertexts]
            if set(holders) != expected or len(holders) != len(expected):
                raise SecAggIntegrityError(
                    f"server: client {cid} sent shares to {sorted(holders)}, expected its live neighbours "
                    f"{sorted(expected)}"
                )
            commits = {c.holder: c for c in m.commitments}
            if set(commits) != expected or len(m.commitments) != len(expected):
                raise SecAggIntegrityError(f"server: client {cid} sent commitments for the wrong holders")
            if any(len(ct) != _SHARE_CIPHERTEXT for _, ct in m.ciphertexts):
                raise SecAggIntegrityError(f"server: client {cid} sent a malformed share ciphertext")
            self.commitments[cid] = commits
            self.seed_commitments[cid] = m.seed_commitment
            self.share_holders[cid] = frozenset(holders)
        u2 = self.shared
        for cid, m in msgs.items():
            for holder, ct in m.ciphertexts:
                if holder in u2:
                    inbox.setdefault(holder, []).append((cid, ct))
        short = {v: len(inbox.get(v, ())) for v in u2 if len(inbox.get(v, ())) < self.setup.threshold}
        if short:
            raise SecAggAbortError(
                f"round {self.setup.round}: after dropouts at stage share_keys, clients {sorted(short)} "
                f"would receive fewer than t={self.setup.threshold} shares ({short}); aborting before any "
                "masked input"
            )
        self.stage = "masked_input"
        return {v: ForwardedShares(self.setup.round, v, tuple(sorted(inbox[v]))) for v in sorted(u2)}

    # -- stage 3 ---------------------------------------------------------------------------
    def add_masked_input(self, msg: MaskedInput) -> None:
        """Add one client's masked vector to the running sum (U3)."""
        self._expect("masked_input")
        cid = msg.sender
        if cid not in self.share_holders:
            raise SecAggIntegrityError(
                f"server: masked input from client {cid}, which did not deal its shares"
            )
        if cid in self.weights:
            raise SecAggIntegrityError(f"server: client {cid} sent two masked inputs")
        if msg.round != self.setup.round:
            raise SecAggIntegrityError(f"server: masked input of client {cid} is for round {msg.round}")
        spec = self.setup.fixed_point
        if msg.vector.dtype != spec.dtype or msg.vector.shape != (self.setup.num_params,):
            raise SecAggError(
                f"server: masked input of client {cid} has {msg.vector.dtype}[{msg.vector.size}], expected "
                f"{spec.dtype}[{self.setup.num_params}]"
            )
        if not (math.isfinite(msg.weight) and 0 < msg.weight <= self.setup.max_weight):
            raise SecAggError(f"server: client {cid} declared weight {msg.weight} outside (0, max_weight]")
        t0 = time.perf_counter()
        if self._acc is None:
            self._acc = msg.vector.copy()
        else:
            np.add(self._acc, msg.vector, out=self._acc)
        self.timings.sum_s += time.perf_counter() - t0
        self.weights[cid] = msg.weight

    def _holders_of(self, owner: int, among: frozenset[int]) -> frozenset[int]:
        return self.share_holders[owner] & among

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Close stage 3; check that every needed secret has >= t live holders; build requests."""
        self._expect("masked_input")
        u2, u3 = self.shared, self.survivors
        if not u3:
            raise SecAggAbortError(f"round {self.setup.round}: no masked input arrived")
        dropped = u2 - u3
        t = self.setup.threshold
        problems = []
        for u in sorted(u3):
            h = len(self._holders_of(u, u3))
            if h < t:
                problems.append(f"seed of client {u}: {h} live holders")
        self.needed_keys = frozenset(d for d in dropped if self.share_holders[d] & u3)
        for d in sorted(self.needed_keys):
            h = len(self._holders_of(d, u3))
            if h < t:
                problems.append(f"mask key of dropped client {d}: {h} live holders")
        reqs: dict[int, UnmaskRequest] = {}
        for w in sorted(u3):
            held = frozenset(u for u in u2 if w in self.share_holders[u])
            alive, gone = held & u3, held & dropped
            if len(alive) < t:
                problems.append(f"client {w}: {len(alive)} alive neighbours")
            reqs[w] = UnmaskRequest(self.setup.round, w, tuple(sorted(alive)), tuple(sorted(gone)))
        if problems:
            self.stage = "aborted"
            self._acc = None
            raise SecAggAbortError(
                f"round {self.setup.round}: too many dropouts before the unmask stage; need t={t} for "
                f"{'; '.join(problems)}. Aborting before any share is requested (raise neighbours, lower "
                "the threshold, or lower the dropout)"
            )
        self._requests = reqs
        self.stage = "unmask"
        return reqs

    # -- stage 4 ---------------------------------------------------------------------------
    def receive_unmask(self, msgs: Mapping[int, UnmaskResponse]) -> np.ndarray:
        """Rebuild the needed secrets from verified shares, remove the masks; return the ring sum.

        The result is sum_{u in U3} q_u over Z_{2^R}. Raises :class:`SecAggAbortError`
        (without using any rebuilt secret) if a needed secret has fewer than t valid shares.
        """
        self._expect("unmask")
        t0 = time.perf_counter()
        setup = self.setup
        seed_pts: dict[int, dict[int, bytes]] = {u: {} for u in self.survivors}
        key_pts: dict[int, dict[int, bytes]] = {d: {} for d in self.needed_keys}
        rejected: list[str] = []
        for w, m in msgs.items():
            req = self._requests.get(w)
            if req is None or m.sender != w or m.round != setup.round:
                rejected.append(f"unexpected response from client {w}")
                continue
            if (
                tuple(o for o, _ in m.seed_shares) != req.alive
                or tuple(o for o, _ in m.key_shares) != req.dropped
            ):
                rejected.append(f"client {w} answered a different request")
                continue
            for kind, group, pts in (("seed", m.seed_shares, seed_pts), ("key", m.key_shares, key_pts)):
                for owner, share in group:
                    c = self.commitments[owner][w]
                    expect = c.seed_share if kind == "seed" else c.key_share
                    if _share_commitment(self._session, kind, owner, w, share) != expect:
                        rejected.append(
                            f"{kind} share of client {owner} from client {w} does not match its commitment"
                        )
                        continue
                    pts[owner][_x(w)] = share
        t = setup.threshold
        short = [
            f"seed of client {u}: {len(p)} valid shares" for u, p in sorted(seed_pts.items()) if len(p) < t
        ]
        short += [
            f"mask key of client {d}: {len(p)} valid shares" for d, p in sorted(key_pts.items()) if len(p) < t
        ]
        if short:
            self.stage = "aborted"
            self._acc = None
            raise SecAggAbortError(
                f"round {setup.round}: unmasking needs t={t} valid shares per secret but got fewer for "
                f"{'; '.join(short)}"
                + (f" (rejected: {'; '.join(rejected)})" if rejected else "")
                + ". Aborting without output."
            )
        if rejected:
            logger.warning(
                "secagg round %d: ignored %d bad shares: %s", setup.round, len(rejected), "; ".join(rejected)
            )
        seeds: dict[int, bytes] = {}
        for u, pts in seed_pts.items():
            seed = shamir.combine(pts, threshold=t)
            if _seed_commitment(self._session, u, seed) != self.seed_commitments[u]:
                raise SecAggIntegrityError(
                    f"server: the rebuilt self-mask seed of client {u} fails its commitment"
                )
            seeds[u] = seed
        mask_keys: dict[int, Any] = {}
        for d, pts in key_pts.items():
            sk = ka.x25519_from_private_bytes(shamir.combine(pts, threshold=t))
            if ka.x25519_public_bytes(sk) != self.keys[d].mask_public:
                raise SecAggIntegrityError(
                    f"server: the rebuilt mask key of client {d} does not match its public key"
                )
            mask_keys[d] = sk
        add: list[bytes] = []
        sub = [
            self_mask_key(s, session=self._session, owner=u, algorithm=setup.prg) for u, s in seeds.items()
        ]
        u3 = self.survivors
        for d, sk in mask_keys.items():
            for w in sorted(self.share_holders[d] & u3):
                k = pairwise_mask_key(
                    ka.x25519_shared(sk, self.keys[w].mask_public),
                    session=self._session,
                    a=d,
                    b=w,
                    model=self._model,
                    algorithm=setup.prg,
                )
                # w added +PRG if w < d, else -PRG: remove it.
                (sub if w < d else add).append(k)
        t1 = time.perf_counter()
        self.timings.reconstruct_s += t1 - t0
        acc = self._acc
        assert acc is not None
        prg.apply_masks(acc, add_keys=add, sub_keys=sub, algorithm=setup.prg)
        self.timings.regenerate_s += time.perf_counter() - t1
        self.masks_regenerated = len(add) + len(sub)
        self._acc = None
        self.stage = "done"
        logger.debug(
            "secagg round %d: unmasked the sum of %d clients (%d masks regenerated)",
            setup.round,
            len(u3),
            self.masks_regenerated,
        )
        return acc


def new_nonce() -> bytes:
    """Fresh 32-byte round nonce (public, unpredictable)."""
    return secrets.token_bytes(32)
