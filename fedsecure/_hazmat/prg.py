"""Keystream PRGs that expand a short key into a vector over Z_{2^32} or Z_{2^64}.

Raw primitive, no public API. Used for the pairwise and self masks of secure aggregation
(Bonawitz et al., CCS'17, sec. 4: "PRG(s_{u,v})"), and for the coins of stochastic rounding.

The stream is the keystream of a stream cipher from ``cryptography`` (OpenSSL):

- ``"aes128-ctr"`` (default): AES-128 in CTR mode, initial counter block all zero. Keys
  are 16 bytes, derived fresh per (round, party, purpose) by HKDF, so a (key, counter)
  pair never repeats. With AES-NI this runs at ~10 GB/s on one core.
- ``"chacha20"``: ChaCha20 with a 32-byte key and an all-zero 16-byte nonce/counter.

The keystream bytes are read as little-endian unsigned words: a vector uniform over the
ring as long as the cipher is a PRF. Threat model: the key is secret; everything else
(algorithm, counter, length) is public.

Masking is the hot loop, so :func:`apply_masks` streams every key chunk by chunk into
the accumulator while the chunk sits in cache, instead of materialising each mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PRG_ALGORITHMS: tuple[str, ...] = ("aes128-ctr", "chacha20")
_KEY_BYTES = {"aes128-ctr": 16, "chacha20": 32}
_ZERO_BLOCK = bytes(16)
_CHUNK_BYTES = 1 << 17  # 128 KiB: keystream chunk + accumulator chunk stay in L2


def key_bytes(algorithm: str) -> int:
    """Key length in bytes of ``algorithm``."""
    try:
        return _KEY_BYTES[algorithm]
    except KeyError:
        raise ValueError(f"unknown PRG algorithm {algorithm!r}; choose one of {PRG_ALGORITHMS}") from None


def _encryptor(key: bytes, algorithm: str):
    if len(key) != key_bytes(algorithm):
        raise ValueError(f"{algorithm} needs a {key_bytes(algorithm)}-byte key, got {len(key)} bytes")
    if algorithm == "aes128-ctr":
        return Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()
    return Cipher(algorithms.ChaCha20(key, _ZERO_BLOCK), mode=None).encryptor()


def keystream(
    key: bytes, num_words: int, dtype: np.dtype | type, *, algorithm: str = "aes128-ctr"
) -> np.ndarray:
    """Return the first ``num_words`` words of the keystream of ``key`` as ``dtype``.

    ``dtype`` is ``np.uint32`` or ``np.uint64``. Deterministic in (key, algorithm).
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"keystream dtype must be uint32 or uint64, got {dt}")
    if num_words < 0:
        raise ValueError(f"num_words must be >= 0, got {num_words}")
    nbytes = num_words * dt.itemsize
    out = bytearray(nbytes + 15)
    enc = _encryptor(key, algorithm)
    if nbytes:
        enc.update_into(bytes(nbytes), out)
    return np.frombuffer(out, dtype=dt, count=num_words).copy()


def apply_masks(
    acc: np.ndarray,
    *,
    add_keys: Sequence[bytes] = (),
    sub_keys: Sequence[bytes] = (),
    algorithm: str = "aes128-ctr",
) -> None:
    """In place: ``acc += sum(PRG(k) for k in add_keys) - sum(PRG(k) for k in sub_keys)``.

    Arithmetic wraps modulo 2^32 or 2^64 (numpy unsigned overflow), i.e. it is exact in
    the ring. ``acc`` must be a contiguous 1-D ``uint32``/``uint64`` array. The masks are
    generated chunk by chunk (each key's cipher context continues its stream), so the
    result equals adding the full :func:`keystream` vectors.
    """
    if acc.ndim != 1 or acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"acc must be a 1-D uint32/uint64 array, got {acc.dtype} with shape {acc.shape}")
    if not acc.flags.c_contiguous:
        raise ValueError("acc must be C-contiguous")
    streams = [(_encryptor(k, algorithm), np.add) for k in add_keys]
    streams += [(_encryptor(k, algorithm), np.subtract) for k in sub_keys]
    if not streams or acc.size == 0:
        return
    itemsize = acc.dtype.itemsize
    chunk_words = _CHUNK_BYTES // itemsize
    zeros = bytes(chunk_words * itemsize)
    buf = bytearray(chunk_words * itemsize + 15)
    words = np.frombuffer(buf, dtype=acc.dtype, count=chunk_words)
    n = acc.size
    for start in range(0, n, chunk_words):
        m = min(chunk_words, n - start)
        src = zeros if m == chunk_words else zeros[: m * itemsize]
        view = acc[start : start + m]
        w = words if m == chunk_words else words[:m]
        for enc, op in streams:
            enc.update_into(src, buf)
            op(view, w, out=view)
