"""Key agreement, key derivation, authenticated encryption and signatures.

Raw primitive, no public API. Everything comes from ``cryptography`` (OpenSSL):

- X25519 (RFC 7748) Diffie-Hellman for the two per-round key pairs of secure
  aggregation (Bonawitz et al., CCS'17: (c_u^PK, c_u^SK) for encrypting shares and
  (s_u^PK, s_u^SK) for pairwise masks). OpenSSL rejects an all-zero shared secret
  (small-order peer keys).
- HKDF-SHA256 (RFC 5869) with constant domain-separation labels; the context (session
  digest = round, run, parties, parameters) goes in the salt/info, never a secret.
- ChaCha20-Poly1305 (RFC 8439) AEAD with a random 96-bit nonce prepended to the
  ciphertext; the associated data binds the session and the ordered pair of parties.
- Ed25519 signatures for the optional authenticated key advertisement.

Threat model: private keys and shared secrets never leave the party that made them;
what these helpers return for sending (public keys, ciphertexts, signatures, digests)
is public by construction.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL_PREFIX = b"fedsecure/secagg/v1/"
PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
SIGNATURE_BYTES = 64
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16


class DecryptionError(ValueError):
    """An AEAD ciphertext failed authentication (tampered, wrong key or wrong context)."""


def encode_parts(*parts: bytes | int | str) -> bytes:
    """Unambiguous concatenation: each part is length-prefixed (ints as 8-byte big-endian)."""
    out = bytearray()
    for p in parts:
        if isinstance(p, bool):
            raise TypeError("encode_parts does not accept bool")
        if isinstance(p, int):
            if p < 0:
                raise ValueError("encode_parts encodes non-negative ints only")
            b = p.to_bytes(8, "big")
        elif isinstance(p, str):
            b = p.encode()
        else:
            b = bytes(p)
        out += struct.pack(">I", len(b))
        out += b
    return bytes(out)


def label(name: str) -> bytes:
    """The constant domain-separation label for ``name``."""
    return LABEL_PREFIX + name.encode()


def digest(name: str, *parts: bytes | int | str) -> bytes:
    """SHA-256 of the label ``name`` followed by ``parts`` (length-prefixed)."""
    return hashlib.sha256(encode_parts(label(name), *parts)).digest()


# ---- X25519 -----------------------------------------------------------------------------
def generate_x25519() -> X25519PrivateKey:
    """A fresh X25519 private key (OpenSSL's CSPRNG)."""
    return X25519PrivateKey.generate()


def x25519_private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes_raw()


def x25519_public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


def x25519_from_private_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != PRIVATE_KEY_BYTES:
        raise ValueError(f"an X25519 private key has {PRIVATE_KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_shared(sk: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret with the peer's 32-byte public key.

    Raises ``ValueError`` for a malformed or small-order peer key.
    """
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an X25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}")
    return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))


# ---- HKDF -------------------------------------------------------------------------------
def hkdf(ikm: bytes, *, name: str, salt: bytes, info: tuple[bytes | int | str, ...], length: int) -> bytes:
    """HKDF-SHA256(ikm) with the constant label ``name`` and public context ``info``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=salt, info=encode_parts(label(name), *info)
    ).derive(ikm)


# ---- AEAD -------------------------------------------------------------------------------
def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305: returns ``nonce || ciphertext || tag`` (random nonce)."""
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises :class:`DecryptionError` on any tampering."""
    if len(blob) < AEAD_NONCE_BYTES + AEAD_TAG_BYTES:
        raise DecryptionError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            blob[:AEAD_NONCE_BYTES], blob[AEAD_NONCE_BYTES:], associated_data
        )
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None


def aead_overhead() -> int:
    return AEAD_NONCE_BYTES + AEAD_TAG_BYTES


# ---- Ed25519 ----------------------------------------------------------------------------
def generate_ed25519() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def ed25519_public_bytes(sk: Ed25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


def sign(sk: Ed25519PrivateKey, message: bytes) -> bytes:
    return sk.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
