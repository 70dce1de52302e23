"""Shamir t-of-m secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297.

Raw primitive, no public API. Shamir, "How to share a secret", CACM 1979; used by
Bonawitz et al. (CCS'17) to share each client's self-mask seed b_u and mask key s_u^SK.

- p = 2^256 + 297 is the smallest prime above 2^256, so every 32-byte string is a field
  element and a share is one field element: 33 bytes big-endian.
- The polynomial's coefficients come from :mod:`secrets` (the OS CSPRNG).
- A share is evaluated at x = holder index (>= 1, distinct, < p); the x-coordinate is
  public and travels next to the share, not inside it.
- Any ``threshold`` shares reconstruct the secret (Lagrange at 0); fewer reveal nothing
  (information-theoretically). :func:`combine` optionally checks that surplus shares lie
  on the same polynomial, which detects a tampered share when more than t arrive.

Threat model: the dealer is honest; up to t-1 holders (and whoever sees their shares) learn
nothing about the secret; a holder may return a wrong share, which the caller must detect
(hash commitments in the secure-aggregation protocol, or the consistency check here).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33


class ShareError(ValueError):
    """Shares are malformed, too few, or inconsistent with each other."""


def _to_int(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise ShareError(f"a share has {SHARE_BYTES} bytes, got {len(share)}")
    y = int.from_bytes(share, "big")
    if y >= PRIME:
        raise ShareError("share value is not a field element")
    return y


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` (32 bytes) into one share per x in ``xs``; any ``threshold`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"the secret must have {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs):
        raise ShareError("share x-coordinates must be distinct")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}")
    if any(not 0 < x < PRIME for x in xs):
        raise ShareError("share x-coordinates must be in [1, p)")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def _lagrange_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """Evaluate the interpolating polynomial through ``points`` at ``at``."""
    total = 0
    xs = [x for x, _ in points]
    for j, (xj, yj) in enumerate(points):
        num = 1
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, bytes], *, threshold: int, check_consistency: bool = True) -> bytes:
    """Recover the 32-byte secret from at least ``threshold`` shares ``{x: share}``.

    With ``check_consistency`` every share beyond the first ``threshold`` must lie on the
    same polynomial; otherwise :class:`ShareError` is raised (a share was tampered with).
    """
    if threshold < 1:
        raise ShareError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    points = sorted((x, _to_int(s)) for x, s in shares.items())
    if any(not 0 < x < PRIME for x, _ in points):
        raise ShareError("share x-coordinates must be in [1, p)")
    base = points[:threshold]
    if check_consistency:
        for x, y in points[threshold:]:
            if _lagrange_at(base, x) != y:
                raise ShareError(f"share at x={x} is inconsistent with the others")
    value = _lagrange_at(base, 0)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShareError("reconstructed value is not a 32-byte secret (inconsistent shares)")
    return value.to_bytes(SECRET_BYTES, "big")
