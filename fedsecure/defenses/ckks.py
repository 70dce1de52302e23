"""CKKS homomorphic aggregation: the server adds encrypted adapter updates it cannot read.

Scheme: CKKS (Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
Numbers", ASIACRYPT 2017) through TenSEAL 0.3.18 / Microsoft SEAL. Deployment anchors:
NVIDIA FLARE's HE filters (TenSEAL CKKS, one ``ckks_vector`` per layer, every client holding
the same secret key; Roth et al., "NVIDIA FLARE", 2022) and FedML-HE (Jin et al., "FedML-HE: An
Efficient Homomorphic-Encryption-Based Privacy-Preserving Federated Learning System",
arXiv:2303.10837; selective parameter encryption). Parameter bounds: the Homomorphic Encryption
Security Standard (Albrecht et al., HomomorphicEncryption.org, 2018). Decryption-output
leakage: Li & Micciancio, "On the Security of Homomorphic Encryption on Approximate Numbers",
EUROCRYPT 2021.

Parties and keys
----------------
- **Key holder** (:class:`CkksKeyHolder`): a designated decryptor, separate from the aggregator
  (in simulation a separate object with its own state). It generates a fresh CKKS key pair
  every round (``key_rotation="round"``, the default; ~20 ms at N=8192) and publishes only the
  *public context* (parameters + public key; no secret, relinearisation or Galois keys) with
  its fingerprint. It decrypts exactly one ciphertext set per round: the aggregate.
- **Clients** (:class:`CkksClient`) receive the public context, pre-scale their delta by their
  FedAvg weight (``delta * num_examples``) in plaintext, pack the flat vector into as few
  ciphertexts as the slot count allows (N/2 values each) and bind the context fingerprint in
  the message header.
- **Aggregator** (:class:`CkksAggregator`, the server) holds the same public context, verifies
  each message on receipt (framing, fingerprint, round, sizes, scale, parameters) and adds the
  ciphertexts in place. Its context has no secret key: decrypting raises in TenSEAL.

Trust model (what colluding parties learn)
------------------------------------------
Confidentiality of individual updates holds against an honest-but-curious server that does not
collude with the key holder.

- *Server alone*: ciphertexts (IND-CPA under RLWE), the public weights (``num_examples``), the
  released aggregate, and, with selective encryption, each client's plaintext share.
- *Server + key holder*: every client's update (the key holder can decrypt any ciphertext).
  Non-collusion of these two is the core assumption, as for any single-key HE aggregation.
- *Server + some clients*: clients hold no secret key, so nothing beyond what the aggregate
  already gives (the sum of the honest clients' updates; with one honest client, its update).
- *Key holder alone*: the aggregate; individual ciphertexts only if it can intercept them,
  which an authenticated, encrypted channel (TLS) between clients and server prevents.
- *A malicious server* can submit a single client's ciphertext as the "aggregate"; the key
  holder cannot tell a sum from one ciphertext. The one-decryption-per-round rule bounds this to
  one chosen ciphertext set per round. Verifiable aggregation is out of scope.
- NVFlare's layout gives every client the secret key (any client + server decrypt everything);
  FedML-HE's example ships the secret key to the server (no protection from the server).

CKKS decryption outputs leak the secret key if released exactly (Li & Micciancio 2021): from a
ciphertext ``(c0, c1)`` and the exact decryption ``m + e`` the server solves ``c1*s = m + e - c0``.
The key holder therefore adds Gaussian *flooding* noise from a CSPRNG to the decrypted
slots before release (``flooding_std_coeff_units``, default 16 in units of the plaintext
polynomial's integer coefficients, ~1.3e-9 per value at N=8192, scale 2^40). The server's view
of ``s`` then becomes (projected) RLWE samples with Gaussian error of that std at the data
modulus; with a std >= 3.2 (the standard's error width) and a data modulus no larger than the
preset's total, key recovery is at least as hard as the preset's own security level.

Integrity: what is and is not detected
--------------------------------------
CKKS ciphertexts are malleable and the server must add them, so no MAC or AEAD tag can cover
them. On receipt the aggregator detects: malformed or truncated framing; a ciphertext that does
not parse under this round's public context (other parameters, or altered bytes SEAL rejects);
a fingerprint of another context or round (e.g. a stale context, a misconfigured client); a
wrong round, client id, weight, ciphertext count, vector size, scale, level or polynomial degree;
duplicate senders; senders not sampled this round. At decryption the key holder detects values
outside the range an honest set of clients can produce (each client checks its own values
against ``value_bound / clients``): this catches ciphertexts under another key with a forged
fingerprint, replays of other rounds' ciphertexts, and most alterations of high-order
coefficient bits, without telling which client was responsible.
Not detected: a well-formed ciphertext of in-range but arbitrary values (a malicious client, or
a man in the middle without channel integrity; use an authenticated channel and a robust
defense that does not need plaintext, e.g. clipping on the client); low-order bit flips that
stay in range (they perturb the aggregate slightly).

Selective encryption (FedML-HE style)
-------------------------------------
Optionally only part of the coordinates is encrypted; the rest travels as fp32 plaintext:

- ``encrypt_modules``: fnmatch patterns over adapter tensor names (fixed, public);
- ``encrypt_fraction``: the fraction of coordinates with the largest magnitude in the *previous
  round's decrypted aggregate* (a value the server sees anyway). The key holder computes the mask
  and publishes it with the round's context; it depends on no individual client's update. Round
  0 (no previous aggregate) encrypts everything.

The server then sees each client's plaintext share: ``exposes`` gains a per-client view, the
sealed message carries ``plaintext`` (the client's delta with the encrypted coordinates set to
zero), and :meth:`CkksTransport.plaintext_fraction` reports the share.

Arithmetic and precision
------------------------
Only additions happen under encryption; the weights are applied by the clients before encrypting
(the transport contract), so the default preset ``n8192-add`` uses a single 60-bit data prime
(no multiplicative depth, 8x fp32 bytes). Values must stay below ``value_bound``
(2^(data_bits - scale_bits - 2), 2^18 for ``n8192-add``); each client checks its share, and an
out-of-range update is refused with the fix. Measured error at scale 2^40: about 1e-8 per client
and value; the stated tolerance is ``clients * 2^(16 - scale_bits)`` plus the flooding noise
(:meth:`CkksParameters.error_bound`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedsecure.federation.transport import Sealed, SealedSum, Transport
from fedsecure.models.lora import FlatSpec, flatten_adapter, unflatten_adapter
from fedsecure.registry import TRANSPORTS
from fedsecure.types import AdapterDelta, ClientUpdate, InvalidUpdateError, RoundAbortedError, RoundContext, View

__all__ = [
    "DEFAULT_PRESET",
    "HE_STANDARD_MAX_BITS",
    "PRESETS",
    "AggregateIntegrityError",
    "CkksAggregator",
    "CkksClient",
    "CkksKeyHolder",
    "CkksParameterError",
    "CkksParameters",
    "CkksTransport",
    "PublicRoundKey",
    "RoundLayout",
    "context_fingerprint",
    "select_encrypted_coordinates",
]

TENSEAL_INSTALL = "pip install tenseal==0.3.18"

HE_STANDARD_MAX_BITS: Mapping[int, Mapping[int, int]] = {
    1024: {128: 27, 192: 19, 256: 14},
    2048: {128: 54, 192: 37, 256: 29},
    4096: {128: 109, 192: 75, 256: 58},
    8192: {128: 218, 192: 152, 256: 118},
    16384: {128: 438, 192: 305, 256: 237},
    32768: {128: 881, 192: 611, 256: 476},
}
"""Largest total coefficient-modulus bits per ring dimension N and classical security level
(HE Security Standard, ternary secret, error width 3.2; SEAL's ``CoeffModulus::MaxBitCount``)."""

_FINGERPRINT_LABEL = b"fedsecure/ckks/v1/context-fingerprint"
_CLIENT_MAGIC = b"FSCKKSc1"
_SUM_MAGIC = b"FSCKKSs1"
_MAX_HEADER_BYTES = 1 << 20



def _tenseal() -> Any:
    """Import TenSEAL lazily, with the install command in the error."""
    try:
        import tenseal
    except ModuleNotFoundError as err:  # pragma: no cover - exercised with a patched import
        raise ModuleNotFoundError(f"the ckks transport needs TenSEAL: {TENSEAL_INSTALL}") from err
    return tenseal


class CkksParameterError(ValueError):
    """A CKKS parameter set was refused (the message gives the reason and the fix)."""


class AggregateIntegrityError(ValueError, RoundAbortedError):
    """The decrypted aggregate is outside what honest clients can produce (wrong key or tampering)."""


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CkksParameters:
    """A CKKS parameter set, validated against the HE standard's 128-bit bounds.

    Parameters
    ----------
    poly_modulus_degree:
        Ring dimension N (a power of two, 1024..32768); a ciphertext holds N/2 values.
    coeff_mod_bit_sizes:
        Bit sizes of the coefficient-modulus primes. The last one is SEAL's special prime (key
        switching only); fresh ciphertexts live modulo the others (the *data modulus*).
    scale_bits:
        log2 of the CKKS encoding scale.
    name:
        Preset name, for reports.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    name: str = "custom"

    def __post_init__(self) -> None:
        try:
            bits = tuple(int(b) for b in self.coeff_mod_bit_sizes)
        except (TypeError, ValueError):
            raise CkksParameterError(
                f"CKKS parameters {self.name!r} refused: coeff_mod_bit_sizes must be a list of integers, "
                f"got {self.coeff_mod_bit_sizes!r}"
            ) from None
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        problems = self.problems()
        if problems:
            raise CkksParameterError(f"CKKS parameters {self.name!r} refused: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason this parameter set is unsafe or unusable (empty when valid)."""
        n, bits, out = self.poly_modulus_degree, self.coeff_mod_bit_sizes, []
        if n not in HE_STANDARD_MAX_BITS:
            return [f"poly_modulus_degree must be one of {sorted(HE_STANDARD_MAX_BITS)}, got {n}"]
        if len(bits) < 2:
            out.append(
                "coeff_mod_bit_sizes needs at least two primes: the data prime(s) and SEAL's special prime "
                f"(last), got {list(bits)}"
            )
        bad = [b for b in bits if not 20 <= b <= 60]
        if bad:
            out.append(f"every prime must have 20..60 bits (SEAL's limit is 60), got {bad}")
        bound = HE_STANDARD_MAX_BITS[n][128]
        if sum(bits) > bound:
            out.append(
                f"total coefficient modulus {sum(bits)} bits exceeds {bound}, the HE-standard bound for "
                f"128-bit security at N={n}; drop or shrink primes, or double poly_modulus_degree"
            )
        if not 20 <= self.scale_bits <= 60:
            out.append(f"scale_bits must be in 20..60 (precision ~2^-scale_bits), got {self.scale_bits}")
        elif len(bits) >= 2 and self.headroom_bits < 8:
            out.append(
                f"scale 2^{self.scale_bits} leaves {self.headroom_bits} bits of value range in the "
                f"{self.data_modulus_bits}-bit data modulus (need >= 8); lower scale_bits or add a data prime"
            )
        return out

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts live in (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def headroom_bits(self) -> int:
        return self.data_modulus_bits - self.scale_bits - 2

    @property
    def value_bound(self) -> float:
        """Largest |value| the decrypted *sum* may reach (a factor 4 below wrap-around)."""
        return float(2.0**self.headroom_bits)

    @property
    def multiplicative_depth(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def security_bits(self) -> int:
        """Highest classical level (128/192/256) whose HE-standard bound the total meets."""
        total = sum(self.coeff_mod_bit_sizes)
        return max(lvl for lvl, b in HE_STANDARD_MAX_BITS[self.poly_modulus_degree].items() if total <= b)

    def error_bound(self, *, num_clients: int, flooding_std_coeff_units: float = 0.0) -> float:
        """Stated absolute tolerance of one decrypted value of a sum over ``num_clients``.

        ``num_clients * 2^(16 - scale_bits)`` (measured: ~2^(-27) per client at scale 2^40, a
        margin of ~8x) plus 7 standard deviations of the flooding noise (see
        :meth:`flooding_std_values`), before the fp32 rounding of the released tensors.
        """
        return num_clients * 2.0 ** (16 - self.scale_bits) + 7.0 * self.flooding_std_values(flooding_std_coeff_units)

    def flooding_std_values(self, std_coeff_units: float) -> float:
        """Per-value std giving coefficient-domain Gaussian noise of ``std_coeff_units``.

        i.i.d. real slot noise of std sigma maps to plaintext coefficients of std
        ``sigma * 2^scale_bits / sqrt(N)``.
        """
        return std_coeff_units * math.sqrt(self.poly_modulus_degree) / 2.0**self.scale_bits

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "slots": self.slots,
            "security_bits": self.security_bits,
            "he_standard_max_bits_128": HE_STANDARD_MAX_BITS[self.poly_modulus_degree][128],
            "total_modulus_bits": sum(self.coeff_mod_bit_sizes),
            "multiplicative_depth": self.multiplicative_depth,
            "value_bound": self.value_bound,
        }


PRESETS: Mapping[str, CkksParameters] = {
    p.name: p
    for p in (
        # Additions only (what this transport does): one 60-bit data prime; 120 bits <= 152 -> 192-bit.
        CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), scale_bits=40, name="n8192-add"),
        # Additions only with two data primes: range 2^78 for large federations; 180 <= 218 -> 128-bit.
        CkksParameters(
            poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 60), scale_bits=40, name="n8192-add-wide"
        ),
        # Depth 2, as commonly used with TenSEAL; 200 bits <= 218 -> 128-bit.
        CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40, name="n8192"),
        # NVIDIA FLARE's HEBuilder default (depth 1, the server multiplies by 1/weight); 140 <= 152 -> 192-bit.
        CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40, name="n8192-nvflare"),
        # Depth 4 at N=16384; 280 bits <= 305 -> 192-bit.
        CkksParameters(
            poly_modulus_degree=16384,
            coeff_mod_bit_sizes=(60, 40, 40, 40, 40, 60),
            scale_bits=40,
            name="n16384",
        ),
    )
}
DEFAULT_PRESET = "n8192-add"


def resolve_parameters(
    *,
    preset: str,
    poly_modulus_degree: int | None = None,
    coeff_mod_bit_sizes: Sequence[int] | None = None,
    scale_bits: int | None = None,
) -> CkksParameters:
    """A preset by name, or custom parameters when all three numbers are given."""
    custom = (poly_modulus_degree, coeff_mod_bit_sizes, scale_bits)
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise CkksParameterError(
                "custom CKKS parameters need all of poly_modulus_degree, coeff_mod_bit_sizes and scale_bits "
                f"(got {poly_modulus_degree!r}, {coeff_mod_bit_sizes!r}, {scale_bits!r}); or use a preset: "
                f"{', '.join(PRESETS)}"
            )
        return CkksParameters(
            poly_modulus_degree=int(poly_modulus_degree),  # type: ignore[arg-type]
            coeff_mod_bit_sizes=tuple(coeff_mod_bit_sizes),  # type: ignore[arg-type]
            scale_bits=int(scale_bits),  # type: ignore[arg-type]
        )
    if preset not in PRESETS:
        raise CkksParameterError(f"unknown CKKS preset {preset!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Public round facts
# ----------------------------------------------------------------------------------------------


def context_fingerprint(context_bytes: bytes, *, run_id: str, round: int | None) -> str:
    """SHA-256 binding a public context to its run and round (``None``: a per-run context)."""
    h = hashlib.sha256()
    h.update(_FINGERPRINT_LABEL)
    rid = run_id.encode()
    h.update(struct.pack("<I", len(rid)) + rid)
    h.update(struct.pack("<q", -1 if round is None else int(round)))
    h.update(hashlib.sha256(context_bytes).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class PublicRoundKey:
    """What the key holder publishes: the public context (no secret key) and its fingerprint."""

    round: int | None
    context_bytes: bytes
    fingerprint: str


@dataclass(frozen=True, eq=False)
class RoundLayout:
    """The public packing of one round: the adapter's flat layout and which coordinates are encrypted."""

    round: int
    spec: FlatSpec
    """Names and shapes in flattening order (the template's order)."""
    slots: int
    encrypted_index: np.ndarray
    """Sorted flat indices that are encrypted (all of them without selective encryption)."""
    plaintext_index: np.ndarray

    @property
    def num_parameters(self) -> int:
        return int(self.encrypted_index.size + self.plaintext_index.size)

    @property
    def num_encrypted(self) -> int:
        return int(self.encrypted_index.size)

    @property
    def num_plaintext(self) -> int:
        return int(self.plaintext_index.size)

    @property
    def all_encrypted(self) -> bool:
        return self.num_plaintext == 0

    @property
    def chunk_sizes(self) -> list[int]:
        n, s = self.num_encrypted, self.slots
        return [min(s, n - i) for i in range(0, n, s)]

    @property
    def plaintext_fraction(self) -> float:
        return self.num_plaintext / max(1, self.num_parameters)

    def flatten(self, delta: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The flat float64 vector in layout order (delta keys/shapes must match)."""
        vec, _ = flatten_adapter({k: delta[k] for k in self.spec.names})
        return vec.double().numpy()

    def unflatten(self, flat: np.ndarray) -> AdapterDelta:
        """fp32 tensors from a flat vector in layout order."""
        return unflatten_adapter(torch.from_numpy(flat.astype(np.float32)), self.spec)

    def mask(self) -> AdapterDelta:
        """name -> bool tensor, True where the coordinate travels in plaintext."""
        flat = np.zeros(self.num_parameters, dtype=bool)
        flat[self.plaintext_index] = True
        return unflatten_adapter(torch.from_numpy(flat), self.spec)


def select_encrypted_coordinates(previous_aggregate: np.ndarray | None, *, fraction: float) -> np.ndarray:
    """Indices of the ``ceil(fraction * n)`` largest-magnitude coordinates of the previous aggregate.

    The criterion is public (the previous round's released aggregate), so the mask reveals nothing
    about any individual client. Ties are broken by index (stable sort). With no previous
    aggregate every coordinate is selected.

    Parameters
    ----------
    previous_aggregate:
        The previous round's weighted-mean update, flat, or None in the first round.
    fraction:
        Share of coordinates to encrypt, in (0, 1].
    """
    if previous_aggregate is None:
        raise ValueError("select_encrypted_coordinates needs the previous aggregate (None: encrypt all)")
    n = previous_aggregate.size
    k = min(n, max(1, math.ceil(fraction * n)))
    order = np.argsort(-np.abs(previous_aggregate), kind="stable")
    return np.sort(order[:k])


# ----------------------------------------------------------------------------------------------
# Wire format (bytes; JSON header, never pickle)
# ----------------------------------------------------------------------------------------------


class _FormatError(ValueError):
    pass


def _frame(magic: bytes, header: Mapping[str, Any], blobs: Sequence[bytes]) -> bytes:
    head = json.dumps(
        {**header, "blob_lengths": [len(b) for b in blobs]}, sort_keys=True, separators=(",", ":")
    ).encode()
    return b"".join([magic, struct.pack("<I", len(head)), head, *blobs])


def _unframe(data: Any, magic: bytes) -> tuple[dict[str, Any], list[bytes]]:
    if not isinstance(data, bytes | bytearray):
        raise _FormatError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(magic) + 4 or data[: len(magic)] != magic:
        raise _FormatError("payload does not start with the fedsecure CKKS magic (not a CKKS message)")
    (hlen,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    if hlen > _MAX_HEADER_BYTES or start + hlen > len(data):
        raise _FormatError(f"header length {hlen} is out of range (payload of {len(data)} bytes)")
    try:
        header = json.loads(data[start : start + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _FormatError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _FormatError("header is not a JSON object")
    lengths = header.get("blob_lengths")
    if not isinstance(lengths, list) or not all(isinstance(x, int) and x >= 0 for x in lengths):
        raise _FormatError("header blob_lengths must be a list of non-negative integers")
    pos = start + hlen
    if pos + sum(lengths) != len(data):
        raise _FormatError(
            f"blob lengths add up to {sum(lengths)} bytes but {len(data) - pos} follow the header "
            "(truncated or padded payload)"
        )
    blobs = []
    for n in lengths:
        blobs.append(data[pos : pos + n])
        pos += n
    return header, blobs


def _tensor_bytes(values: np.ndarray, *, dtype: torch.dtype) -> bytes:
    from safetensors.torch import save

    return save({"values": torch.from_numpy(np.ascontiguousarray(values)).to(dtype)})


def _tensor_from_bytes(blob: bytes, *, dtype: torch.dtype, size: int) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, TypeError) as err:
        raise _FormatError(f"plaintext share is not a valid safetensors blob ({err})") from None
    t = tensors.get("values")
    if set(tensors) != {"values"} or t is None or t.dtype != dtype or tuple(t.shape) != (size,):
        got = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        raise _FormatError(f"plaintext share must be one {dtype} vector of {size} values, got {got}")
    if not torch.isfinite(t).all():
        raise _FormatError("plaintext share contains NaN or Inf")
    return t.double().numpy()


def _header_int(header: Mapping[str, Any], key: str) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _FormatError(f"header field {key!r} must be an integer, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# Parties
# ----------------------------------------------------------------------------------------------


class CkksKeyHolder:
    """The designated decryptor: makes the keys, publishes the public context, opens the aggregate.

    The secret key never leaves this object. It decrypts at most one aggregate per round.

    Parameters
    ----------
    params:
        The CKKS parameter set.
    flooding_std_coeff_units:
        Std of the Gaussian noise added to decrypted values before release, in units of the
        plaintext polynomial's integer coefficients (0 disables it; see the module docstring).
    """

    def __init__(self, *, params: CkksParameters, flooding_std_coeff_units: float = 16.0) -> None:
        if not (flooding_std_coeff_units >= 0 and math.isfinite(flooding_std_coeff_units)):
            raise ValueError(f"flooding_std_coeff_units must be a finite number >= 0, got {flooding_std_coeff_units}")
        self.params = params
        self.flooding_std_coeff_units = float(flooding_std_coeff_units)
        self._secret_context: Any = None
        self._public: PublicRoundKey | None = None
        self._opened_rounds: set[int] = set()
        self.last_aggregate: np.ndarray | None = None
        """The previous round's released weighted mean (flat, public), for the selective mask."""

    def new_context(self, *, round: int | None, run_id: str) -> PublicRoundKey:
        """Generate a fresh key pair and return the public context to distribute.

        ``round=None`` makes a per-run context (its fingerprint binds only the run id).
        """
        ts = _tenseal()
        p = self.params
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            n_threads=1,  # every vector is one ciphertext: no thread pool needed
        )
        ctx.global_scale = 2.0**p.scale_bits
        public = ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        self._secret_context = ctx  # the previous round's secret key is dropped here
        self._public = PublicRoundKey(
            round=round, context_bytes=public, fingerprint=context_fingerprint(public, run_id=run_id, round=round)
        )
        return self._public

    @property
    def public_key(self) -> PublicRoundKey:
        if self._public is None:
            raise RuntimeError("the key holder has no context yet; call new_context first")
        return self._public

    def decrypt_aggregate(
        self, payload: bytes, *, layout: RoundLayout, num_clients: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Decrypt the aggregate (once per round) and return the flat float64 weighted sum.

        Returns the sum and the verified header. Raises :class:`AggregateIntegrityError` if the
        decrypted values exceed what ``num_clients`` honest clients can produce.
        """
        ts = _tenseal()
        if self._secret_context is None or self._public is None:
            raise RuntimeError("the key holder has no context yet; call new_context first")
        if layout.round in self._opened_rounds:
            raise PermissionError(
                f"the key holder already decrypted an aggregate for round {layout.round}; it decrypts "
                "one aggregate per round (a second request could single out one client's ciphertext)"
            )
        try:
            header, blobs = _unframe(payload, _SUM_MAGIC)
            if header.get("fingerprint") != self._public.fingerprint:
                raise _FormatError("the aggregate was not made under this round's public context")
            if _header_int(header, "round") != layout.round:
                raise _FormatError(f"aggregate is for round {header.get('round')}, expected {layout.round}")
        except _FormatError as err:
            raise ValueError(f"aggregate rejected by the key holder: {err}") from None
        sizes = layout.chunk_sizes
        want = len(sizes) + (1 if layout.num_plaintext else 0)
        if len(blobs) != want:
            raise ValueError(f"aggregate rejected by the key holder: {len(blobs)} blobs, expected {want}")
        self._opened_rounds.add(layout.round)
        out = np.zeros(layout.num_parameters)
        enc = np.empty(layout.num_encrypted)
        pos = 0
        for j, (blob, size) in enumerate(zip(blobs, sizes, strict=False)):
            vec = ts.ckks_vector_from(self._secret_context, blob)
            if vec.size() != size:
                raise ValueError(f"aggregate ciphertext {j} holds {vec.size()} values, expected {size}")
            enc[pos : pos + size] = vec.decrypt()
            pos += size
        if self.flooding_std_coeff_units > 0 and enc.size:
            enc += _secure_normal(enc.size) * self.params.flooding_std_values(self.flooding_std_coeff_units)
        bound = self.params.value_bound * 1.01
        if enc.size and not (np.isfinite(enc).all() and float(np.abs(enc).max()) <= bound):
            worst = float(np.nanmax(np.abs(enc))) if np.isfinite(enc).any() else float("inf")
            raise AggregateIntegrityError(
                f"round {layout.round}: the decrypted aggregate reaches |value| = {worst:.3g}, beyond "
                f"{self.params.value_bound:.3g}, the most {num_clients} honest clients can produce: at least one "
                "ciphertext was encrypted under another key (forged fingerprint, replay) or altered; "
                "discard this round's aggregate"
            )
        out[layout.encrypted_index] = enc
        if layout.num_plaintext:
            try:
                out[layout.plaintext_index] = _tensor_from_bytes(
                    blobs[-1], dtype=torch.float64, size=layout.num_plaintext
                )
            except _FormatError as err:
                raise ValueError(f"aggregate rejected by the key holder: {err}") from None
        return out, header


class CkksClient:
    """Client role: encrypts its weighted delta under the round's public context."""

    def __init__(self, *, params: CkksParameters) -> None:
        self.params = params
        self._context: Any = None
        self._key: PublicRoundKey | None = None

    def load(self, key: PublicRoundKey) -> None:
        """Deserialize the public context published by the key holder."""
        ts = _tenseal()
        ctx = ts.context_from(key.context_bytes, n_threads=1)
        if ctx.has_secret_key() or not ctx.is_public():
            raise ValueError("the context sent to clients holds a secret key; refusing to use it")
        self._context, self._key = ctx, key

    @property
    def context(self) -> Any:
        return self._context

    def seal(
        self, update: ClientUpdate, *, layout: RoundLayout, per_client_bound: float
    ) -> tuple[bytes, dict[str, int]]:
        """Return the payload bytes and a size breakdown for ``update.delta * update.num_examples``."""
        ts = _tenseal()
        if self._context is None or self._key is None:
            raise RuntimeError("the client has no public context; the transport's begin_round sets it")
        weight = float(update.num_examples)
        flat = layout.flatten(update.delta)
        flat *= weight
        enc = flat if layout.all_encrypted else flat[layout.encrypted_index]
        if enc.size:
            worst = float(np.abs(enc).max())
            if worst > per_client_bound:
                raise InvalidUpdateError(
                    update.client_id,
                    f"|delta * num_examples| reaches {worst:.3g} > {per_client_bound:.3g}, the per-client range "
                    f"of CKKS preset {self.params.name!r} this round (value_bound "
                    f"{self.params.value_bound:.3g} / clients); clip the update (e.g. a clipping defense) or "
                    'choose a preset with more headroom (transport.preset = "n8192-add-wide", value_bound 2^78)',
                )
        blobs = [
            ts.ckks_vector(self._context, enc[i : i + layout.slots]).serialize()
            for i in range(0, enc.size, layout.slots)
        ]
        ct_bytes = sum(len(b) for b in blobs)
        plain_bytes = 0
        if layout.num_plaintext:
            blob = _tensor_bytes(flat[layout.plaintext_index], dtype=torch.float32)
            plain_bytes = len(blob)
            blobs.append(blob)
        header = {
            "v": 1,
            "client_id": int(update.client_id),
            "round": int(layout.round),
            "fingerprint": self._key.fingerprint,
            "weight": weight,
            "num_ciphertexts": len(layout.chunk_sizes),
            "num_plaintext": layout.num_plaintext,
        }
        payload = _frame(_CLIENT_MAGIC, header, blobs)
        return payload, {
            "ciphertext": ct_bytes,
            "plaintext": plain_bytes,
            "framing": len(payload) - ct_bytes - plain_bytes,
        }


class CkksAggregator:
    """Server role: verifies each client's ciphertexts and adds them, holding the public context only."""

    def __init__(self, *, params: CkksParameters) -> None:
        self.params = params
        self._context: Any = None
        self._key: PublicRoundKey | None = None
        self._first_parms_id: list[int] | None = None

    def load(self, key: PublicRoundKey) -> None:
        ts = _tenseal()
        ctx = ts.context_from(key.context_bytes, n_threads=1)
        if ctx.has_secret_key() or not ctx.is_public():
            raise ValueError("the aggregator's context holds a secret key; refusing to use it")
        self._context, self._key = ctx, key
        self._first_parms_id = list(ctx.seal_context().data.first_parms_id())

    @property
    def context(self) -> Any:
        """The aggregator's TenSEAL context (public: parameters and public key only)."""
        return self._context

    def _verify(self, vec: Any, *, size: int, client_id: int, index: int) -> None:
        p = self.params
        problems = []
        if vec.size() != size:
            problems.append(f"holds {vec.size()} values, expected {size}")
        cts = vec.ciphertext()
        if len(cts) != 1:
            problems.append(f"packs {len(cts)} SEAL ciphertexts, expected 1")
        else:
            ct = cts[0]
            if ct.size() != 2:
                problems.append(f"has {ct.size()} polynomials, expected 2 (a fresh encryption)")
            if ct.poly_modulus_degree() != p.poly_modulus_degree:
                problems.append(f"has degree {ct.poly_modulus_degree()}, expected {p.poly_modulus_degree}")
            if list(ct.parms_id()) != self._first_parms_id:
                problems.append("is not at the first data level of this round's parameters")
            if ct.scale != 2.0**p.scale_bits:
                problems.append(f"has scale 2^{math.log2(ct.scale):.2f}, expected 2^{p.scale_bits}")
            if not ct.is_ntt_form():
                problems.append("is not in NTT form")
        if problems:
            raise InvalidUpdateError(client_id, f"ciphertext {index} " + "; ".join(problems))

    def combine(
        self, sealed: Sequence[Sealed], *, layout: RoundLayout, expected_clients: Sequence[int]
    ) -> tuple[bytes, float]:
        """Verify and add the sealed updates in place; return the aggregate payload and total weight."""
        ts = _tenseal()
        if self._context is None or self._key is None:
            raise RuntimeError("the aggregator has no public context; the transport's begin_round sets it")
        if not sealed:
            raise ValueError("no client update arrived this round")
        ids = [s.client_id for s in sealed]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InvalidUpdateError(dup[0], "sent more than one update this round")
        allowed = set(expected_clients)
        sizes = layout.chunk_sizes
        acc: list[Any] = [None] * len(sizes)
        plain = np.zeros(layout.num_plaintext)
        total_weight = 0.0
        for s in sealed:
            cid = s.client_id
            if cid not in allowed:
                raise InvalidUpdateError(cid, f"was not sampled in round {layout.round}")
            try:
                header, blobs = _unframe(s.payload, _CLIENT_MAGIC)
                if header.get("fingerprint") != self._key.fingerprint:
                    raise _FormatError(
                        "its context fingerprint is not this round's: it was encrypted under another "
                        "(stale or foreign) public context"
                    )
                if _header_int(header, "round") != layout.round:
                    raise _FormatError(f"it is for round {header.get('round')}, expected {layout.round}")
                if _header_int(header, "client_id") != cid:
                    raise _FormatError(f"its header names client {header.get('client_id')}")
                if header.get("weight") != float(s.weight) or not float(s.weight) > 0:
                    raise _FormatError(f"its header weight {header.get('weight')!r} != sealed weight {s.weight}")
                if _header_int(header, "num_ciphertexts") != len(sizes) or len(blobs) != len(sizes) + (
                    1 if layout.num_plaintext else 0
                ):
                    raise _FormatError(
                        f"it carries {len(blobs)} blobs / {header.get('num_ciphertexts')} ciphertexts, expected "
                        f"{len(sizes)} ciphertexts" + (" and a plaintext share" if layout.num_plaintext else "")
                    )
                if layout.num_plaintext:
                    plain += _tensor_from_bytes(blobs[-1], dtype=torch.float32, size=layout.num_plaintext)
            except _FormatError as err:
                raise InvalidUpdateError(cid, f"CKKS message rejected: {err}") from None
            for j, size in enumerate(sizes):
                try:
                    vec = ts.ckks_vector_from(self._context, blobs[j])
                except (ValueError, RuntimeError, TypeError) as err:  # what TenSEAL / SEAL raise
                    raise InvalidUpdateError(
                        cid,
                        f"ciphertext {j} does not parse under this round's public context ({err}): it was made "
                        "under other parameters or altered in transit",
                    ) from None
                self._verify(vec, size=size, client_id=cid, index=j)
                if acc[j] is None:
                    acc[j] = vec
                else:
                    acc[j].add_(vec)  # in place: no ciphertext copy per client
            total_weight += float(s.weight)
        blobs_out = [v.serialize() for v in acc]
        if layout.num_plaintext:
            blobs_out.append(_tensor_bytes(plain, dtype=torch.float64))
        header = {
            "v": 1,
            "round": int(layout.round),
            "fingerprint": self._key.fingerprint,
            "client_ids": [int(i) for i in ids],
            "total_weight": total_weight,
        }
        return _frame(_SUM_MAGIC, header, blobs_out), total_weight


def _secure_normal(n: int) -> np.ndarray:
    """``n`` approximately standard-normal samples for flooding, from a CSPRNG.

    Box-Muller in float32 on 32-bit uniforms from an AES-128-CTR keystream
    (:func:`fedsecure._hazmat.prg.keystream`) under a fresh ``os.urandom`` key: tails are cut
    at 6.66 sigma and values are float32-rounded. That is enough for flooding, which must be
    wide and unpredictable, not an exact Gaussian; DP noise needs ``_hazmat.noise`` instead.
    """
    import os

    from fedsecure._hazmat.prg import keystream

    m = (n + 1) // 2
    words = keystream(os.urandom(16), 2 * m, np.uint32)
    u1 = (words[:m].astype(np.float32) + np.float32(1.0)) * np.float32(2.0**-32)  # (0, 1]
    theta = words[m:].astype(np.float32) * np.float32(2.0 * math.pi * 2.0**-32)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Transport
# ----------------------------------------------------------------------------------------------


@dataclass
class _RoundCost:
    round: int
    keygen_s: float = 0.0
    context_bytes: int = 0
    mask_bytes: int = 0
    context_load_s: float = 0.0
    num_ciphertexts: int = 0
    plaintext_fraction: float = 0.0
    encrypt_s: list[float] = field(default_factory=list)
    upload_bytes: list[int] = field(default_factory=list)
    ciphertext_bytes: list[int] = field(default_factory=list)
    plaintext_bytes: list[int] = field(default_factory=list)
    aggregate_s: float = 0.0
    aggregated_clients: int = 0
    aggregate_bytes: int = 0
    decrypt_s: float = 0.0


@TRANSPORTS.register("ckks", help="CKKS homomorphic aggregation (TenSEAL): the server adds ciphertexts it cannot read")
class CkksTransport(Transport):
    """CKKS aggregation with a separate key holder; the server only adds ciphertexts.

    ``exposes`` is ``{View.SERVER_AGGREGATE}`` when every coordinate is encrypted. With
    selective encryption the server also sees each client's plaintext share, so the instance's
    ``exposes`` adds the partial per-client view ``View.SERVER_PER_CLIENT_PARTIAL`` and
    ``Sealed.plaintext`` carries the client's delta with the encrypted coordinates zeroed;
    :meth:`plaintext_fraction` gives the share.

    Parameters
    ----------
    preset:
        One of :data:`PRESETS` (default ``"n8192-add"``: N=8192, primes [60, 60], scale 2^40).
    poly_modulus_degree, coeff_mod_bit_sizes, scale_bits:
        Custom parameters instead of a preset (all three), validated against the HE standard.
    key_rotation:
        ``"round"`` (default): a fresh key pair every round; ``"run"``: one per run.
    encrypt_modules:
        fnmatch patterns over adapter tensor names; only matching tensors are encrypted.
    encrypt_fraction:
        Encrypt only this share of coordinates (largest in the previous aggregate); 1.0 = all.
    flooding_std_coeff_units:
        Noise the key holder adds to decrypted values (module docstring); 0 disables.
    """

    name = "ckks"
    exposes = frozenset({View.SERVER_AGGREGATE})

    def __init__(
        self,
        *,
        preset: str = DEFAULT_PRESET,
        poly_modulus_degree: int | None = None,
        coeff_mod_bit_sizes: Sequence[int] | None = None,
        scale_bits: int | None = None,
        key_rotation: Literal["round", "run"] = "round",
        encrypt_modules: Sequence[str] = (),
        encrypt_fraction: float = 1.0,
        flooding_std_coeff_units: float = 16.0,
    ) -> None:
        _tenseal()
        self.params = resolve_parameters(
            preset=preset,
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=coeff_mod_bit_sizes,
            scale_bits=scale_bits,
        )
        if key_rotation not in ("round", "run"):
            raise ValueError(f"key_rotation must be 'round' or 'run', got {key_rotation!r}")
        if isinstance(encrypt_modules, str) or not all(isinstance(p, str) and p for p in encrypt_modules):
            raise ValueError(
                f"encrypt_modules must be a list of name patterns (e.g. ['*q_proj*']), got {encrypt_modules!r}"
            )
        if not (isinstance(encrypt_fraction, int | float) and 0.0 < encrypt_fraction <= 1.0):
            raise ValueError(f"encrypt_fraction must be in (0, 1], got {encrypt_fraction!r}")
        if encrypt_modules and encrypt_fraction < 1.0:
            raise ValueError(
                "choose one selective-encryption criterion: encrypt_modules (fixed name patterns) or "
                "encrypt_fraction (largest coordinates of the previous aggregate), not both"
            )
        self.key_rotation = key_rotation
        self.encrypt_modules = tuple(encrypt_modules)
        self.encrypt_fraction = float(encrypt_fraction)
        self.selective = bool(self.encrypt_modules) or self.encrypt_fraction < 1.0
        if self.selective:
            self.exposes = frozenset({View.SERVER_AGGREGATE, View.SERVER_PER_CLIENT_PARTIAL})  # type: ignore[misc]
        self.key_holder = CkksKeyHolder(params=self.params, flooding_std_coeff_units=flooding_std_coeff_units)
        self.aggregator = CkksAggregator(params=self.params)
        self.client = CkksClient(params=self.params)
        self._layout: RoundLayout | None = None
        self._round_clients: tuple[int, ...] = ()
        self._template: Mapping[str, torch.Tensor] = {}
        self._costs: list[_RoundCost] = []

    # ---- set-up ---------------------------------------------------------------------------
    def begin_round(
        self, ctx: RoundContext, *, template: Mapping[str, torch.Tensor], client_ids: Sequence[int]
    ) -> None:
        """Publish this round's public context (fresh keys by default) and packing layout."""
        if not client_ids:
            raise ValueError(f"round {ctx.round}: no clients sampled")
        cost = _RoundCost(round=ctx.round)
        if self.key_rotation == "round" or self._layout is None:
            t0 = time.perf_counter()
            key = self.key_holder.new_context(
                round=ctx.round if self.key_rotation == "round" else None, run_id=ctx.run_id
            )
            cost.keygen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.client.load(key)
            cost.context_load_s = time.perf_counter() - t0
            self.aggregator.load(key)
        cost.context_bytes = len(self.key_holder.public_key.context_bytes)
        self._layout = self._make_layout(ctx.round, template)
        if self.encrypt_fraction < 1.0:
            cost.mask_bytes = math.ceil(self._layout.num_parameters / 8)  # published bitmask
        cost.num_ciphertexts = len(self._layout.chunk_sizes)
        cost.plaintext_fraction = self._layout.plaintext_fraction
        self._round_clients = tuple(int(c) for c in client_ids)
        self._template = template
        self._costs.append(cost)

    def _make_layout(self, round_: int, template: Mapping[str, torch.Tensor]) -> RoundLayout:
        spec = FlatSpec.of(template)
        n = spec.numel
        everything = np.arange(n)
        enc: np.ndarray = everything
        if self.encrypt_modules:
            starts = np.cumsum([0, *spec.sizes[:-1]])
            chosen = [
                np.arange(start, start + size)
                for name, start, size in zip(spec.names, starts, spec.sizes, strict=True)
                if any(fnmatch.fnmatchcase(name, pat) for pat in self.encrypt_modules)
            ]
            if not chosen:
                raise ValueError(
                    f"encrypt_modules {list(self.encrypt_modules)} match no adapter tensor; names look like "
                    f"{list(spec.names[:2])} (use fnmatch patterns such as '*q_proj*')"
                )
            enc = np.concatenate(chosen)
        elif self.encrypt_fraction < 1.0 and self.key_holder.last_aggregate is not None:
            if self.key_holder.last_aggregate.size != n:
                raise ValueError("the adapter changed size between rounds; keys and shapes must stay fixed")
            enc = select_encrypted_coordinates(self.key_holder.last_aggregate, fraction=self.encrypt_fraction)
        plain = np.setdiff1d(everything, enc, assume_unique=True)
        return RoundLayout(round=round_, spec=spec, slots=self.params.slots, encrypted_index=enc, plaintext_index=plain)

    def _round_layout(self, ctx: RoundContext) -> RoundLayout:
        if self._layout is None or self._layout.round != ctx.round:
            raise RuntimeError(
                f"ckks transport: begin_round was not called for round {ctx.round} (it sets up the keys)"
            )
        return self._layout

    @property
    def per_client_bound(self) -> float:
        """Largest |delta * num_examples| a client may encrypt this round."""
        return self.params.value_bound / max(1, len(self._round_clients))

    # ---- client ---------------------------------------------------------------------------
    def encode(self, update: ClientUpdate, *, ctx: RoundContext) -> Sealed:
        """Client side: pack and encrypt ``update.delta * update.num_examples``."""
        layout = self._round_layout(ctx)
        if update.client_id not in self._round_clients:
            raise InvalidUpdateError(update.client_id, f"was not sampled in round {ctx.round}")
        update.validate_against(self._template)
        t0 = time.perf_counter()
        payload, sizes = self.client.seal(update, layout=layout, per_client_bound=self.per_client_bound)
        elapsed = time.perf_counter() - t0
        cost = self._costs[-1]
        cost.encrypt_s.append(elapsed)
        cost.upload_bytes.append(len(payload))
        cost.ciphertext_bytes.append(sizes["ciphertext"])
        cost.plaintext_bytes.append(sizes["plaintext"])
        plaintext = None
        if layout.num_plaintext:
            mask = layout.mask()
            plaintext = {k: v.detach().float() * mask[k] for k, v in update.delta.items()}
        return Sealed(
            client_id=update.client_id,
            weight=float(update.num_examples),
            payload=payload,
            nbytes=len(payload),
            plaintext=plaintext,
            stage_bytes={
                "upload": len(payload),
                "context_download": cost.context_bytes + cost.mask_bytes,
            },
        )

    # ---- server ---------------------------------------------------------------------------
    def combine(self, sealed: Sequence[Sealed], *, ctx: RoundContext, dropped: Sequence[int] = ()) -> SealedSum:
        """Server side: verify each message and add the ciphertexts with the public context only.

        Dropped clients need no recovery: the sum covers the clients whose messages arrived.
        """
        layout = self._round_layout(ctx)
        t0 = time.perf_counter()
        payload, total_weight = self.aggregator.combine(sealed, layout=layout, expected_clients=self._round_clients)
        elapsed = time.perf_counter() - t0
        cost = self._costs[-1]
        cost.aggregate_s, cost.aggregated_clients, cost.aggregate_bytes = elapsed, len(sealed), len(payload)
        return SealedSum(
            client_ids=tuple(s.client_id for s in sealed),
            total_weight=total_weight,
            payload=payload,
            cost={"aggregate_s": elapsed, "aggregate_bytes": float(len(payload))},
        )

    # ---- key holder -----------------------------------------------------------------------
    def open(self, combined: SealedSum, *, ctx: RoundContext) -> AdapterDelta:
        """Key holder: decrypt the aggregate into the weighted sum of the deltas (fp32 tensors)."""
        flat = self.open_flat(combined, ctx=ctx)
        return self._round_layout(ctx).unflatten(flat)

    def open_flat(self, combined: SealedSum, *, ctx: RoundContext) -> np.ndarray:
        """Like :meth:`open`, returning the flat float64 weighted sum (before fp32 rounding)."""
        layout = self._round_layout(ctx)
        t0 = time.perf_counter()
        flat, header = self.key_holder.decrypt_aggregate(
            combined.payload, layout=layout, num_clients=len(combined.client_ids)
        )
        if [int(i) for i in header.get("client_ids", [])] != [int(i) for i in combined.client_ids]:
            raise ValueError("aggregate rejected by the key holder: its client list differs from the SealedSum's")
        self._costs[-1].decrypt_s = time.perf_counter() - t0
        if combined.total_weight > 0:
            self.key_holder.last_aggregate = flat / combined.total_weight
        return flat

    # ---- reporting ------------------------------------------------------------------------
    def plaintext_mask(self) -> AdapterDelta:
        """name -> bool tensor of the current round: True where the server sees per-client plaintext."""
        if self._layout is None:
            raise RuntimeError("no round has been set up yet")
        return self._layout.mask()

    def plaintext_fraction(self) -> float:
        """Largest share of coordinates any round so far sent in plaintext.

        Before the first round: 0.0 without selective encryption, ``1 - encrypt_fraction`` in
        fraction mode (round 0 itself encrypts everything) and 1.0 in module mode (unknown
        until the adapter names are seen; the conservative value).
        """
        if self._costs:
            return max(c.plaintext_fraction for c in self._costs)
        if not self.selective:
            return 0.0
        return 1.0 - self.encrypt_fraction if self.encrypt_fraction < 1.0 else 1.0

    def cost_report(self) -> dict[str, Any]:
        """Key, byte and time figures of the rounds so far (per client where stated)."""
        costs = self._costs
        rep: dict[str, Any] = {
            **self.params.describe(),
            "key_rotation": self.key_rotation,
            "encrypt_modules": list(self.encrypt_modules),
            "encrypt_fraction": self.encrypt_fraction,
            "flooding_std_coeff_units": self.key_holder.flooding_std_coeff_units,
            "rounds": len(costs),
        }
        if not costs:
            return rep
        enc = [s for c in costs for s in c.encrypt_s]
        ct = [b for c in costs for b in c.ciphertext_bytes]
        up = [b for c in costs for b in c.upload_bytes]
        agg = [c.aggregate_s / c.aggregated_clients for c in costs if c.aggregated_clients]
        layout = self._layout
        fp32 = 4 * layout.num_parameters if layout is not None else 0
        rep.update(
            {
                "num_parameters": layout.num_parameters if layout is not None else 0,
                "ciphertexts_per_client": costs[-1].num_ciphertexts,
                "context_bytes_per_round": costs[-1].context_bytes,
                "download_bytes_per_client_per_round": costs[-1].context_bytes + costs[-1].mask_bytes,
                "keygen_s_per_round": _mean([c.keygen_s for c in costs if c.keygen_s]),
                "ciphertext_bytes_per_client_per_round": _mean(ct),
                "upload_bytes_per_client_per_round": _mean(up),
                "fp32_bytes_per_client": fp32,
                "bytes_ratio_fp32": _mean(up) / fp32 if fp32 else 0.0,
                "encrypt_s_per_client": _mean(enc),
                "aggregate_s_per_client": _mean(agg),
                "decrypt_s_per_round": _mean([c.decrypt_s for c in costs if c.decrypt_s]),
                "plaintext_fraction_per_round": [c.plaintext_fraction for c in costs],
            }
        )
        return rep


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
