"""Fixed-point quantisation of weighted updates into Z_{2^32} / Z_{2^64} without wrap-around.

Raw primitive, no public API. Secure aggregation sums integers modulo 2^R; the sum must be
recovered exactly, so the encoding must never wrap (Bonawitz et al., CCS'17, sec. 3).

Encoding of one client's delta x (float32 vector) with public weight 0 < w <= W_max:

    q = round(clip(x, -c, c) * w * s)        (nearest, or stochastic: unbiased)
    sent as q mod 2^R (two's complement)

Decoding of the ring sum S = sum_i q_i mod 2^R: read S as a signed R-bit integer, divide by s.

No wrap-around, proof. With deterministic rounding |q_i| <= c*w_i*s*(1+3u) + 1/2, with
stochastic rounding |q_i| < c*w_i*s*(1+3u) + 1 (u = 2^-53, three float64 roundings at most).
:func:`no_wrap_scale` chooses s <= L / (n * W_max * c) with L = 2^(R-1)(1 - 2^-40) - 1 - 2n,
hence |sum_i q_i| <= L(1+3u) + n < 2^(R-1) - 1 - n (as 3u*2^(R-1) < 2^(R-1-40)), so the
signed R-bit reading of S is the true integer sum. :func:`fits` re-checks the inequality
for any given s (every client verifies the server's choice). With n clients the opened
sum is within

    n * (r + 4u * c * W_max * s) / s,   r = 1/2 (nearest) or 1 (stochastic)

of sum_i w_i * clip(x_i, -c, c), per coordinate (:func:`sum_error_bound`; the fourth u
covers the final int -> float64 conversion of the sum).

Threat model: all parameters (ring, scale, clip, max weight) are public; the encoding hides
nothing by itself (the masks do). An honest client's value is bounded by construction; a
malicious client can encode any ring element (no range proof), which can poison the sum but
not reveal anyone's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsecure._hazmat import prg

_U = 2.0**-53


@dataclass(frozen=True)
class FixedPoint:
    """Public fixed-point parameters of one round."""

    ring_bits: int
    scale: float
    """Integer units per unit of weighted delta."""
    clip_range: float
    """Per-coordinate bound on the unweighted delta."""

    def __post_init__(self) -> None:
        if self.ring_bits not in (32, 64):
            raise ValueError(f"ring_bits must be 32 or 64, got {self.ring_bits}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive finite number, got {self.clip_range}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def signed_dtype(self) -> np.dtype:
        return np.dtype(np.int32 if self.ring_bits == 32 else np.int64)

    @property
    def word_bytes(self) -> int:
        return self.ring_bits // 8


def no_wrap_scale(*, ring_bits: int, clip_range: float, num_clients: int, max_weight: float) -> float:
    """The largest scale s for which ``num_clients`` inputs never wrap the ring (see module doc)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    # (1 - 2^-40): headroom for float64 rounding of 2^63-sized limits in a 64-bit ring
    limit = 2.0 ** (ring_bits - 1) * (1 - 2.0**-40) - 1 - 2 * num_clients
    s = limit / (num_clients * float(max_weight) * float(clip_range))
    return math.nextafter(s, 0.0)  # round down: s*n*W*c <= limit despite division rounding


def worst_case_sum(*, spec: FixedPoint, num_clients: int, max_weight: float) -> float:
    """Upper bound on |sum_i q_i| for ``num_clients`` inputs of weight <= ``max_weight``."""
    return num_clients * (spec.clip_range * max_weight * spec.scale * (1 + 3 * _U) + 1)


def fits(*, spec: FixedPoint, num_clients: int, max_weight: float) -> bool:
    """True iff the sum of ``num_clients`` encodings provably does not wrap."""
    return (
        worst_case_sum(spec=spec, num_clients=num_clients, max_weight=max_weight)
        < 2.0 ** (spec.ring_bits - 1) - 1
    )


def sum_error_bound(*, spec: FixedPoint, num_clients: int, max_weight: float, stochastic: bool) -> float:
    """Max abs error per coordinate of the decoded sum vs sum_i w_i*clip(x_i) (module doc)."""
    r = 1.0 if stochastic else 0.5
    return num_clients * (r + 4 * _U * spec.clip_range * max_weight * spec.scale) / spec.scale


def quantise(
    x: np.ndarray, *, weight: float, spec: FixedPoint, stochastic_key: bytes | None = None
) -> tuple[np.ndarray, int]:
    """Encode ``weight * clip(x)`` as ring elements; returns (vector, number of clipped coordinates).

    ``stochastic_key`` (16 fresh random bytes) switches to unbiased stochastic rounding, with
    coins from the AES-CTR keystream of that key.
    """
    if x.ndim != 1:
        raise ValueError(f"quantise expects a 1-D vector, got shape {x.shape}")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive finite number, got {weight}")
    if not np.isfinite(x).all():
        raise ValueError("the update contains NaN or Inf")
    c = spec.clip_range
    clipped = int(np.count_nonzero(np.abs(x) > c))
    ws = float(weight) * spec.scale
    bound = c * ws
    v = np.multiply(x, ws, dtype=np.float64)
    if clipped:
        np.clip(v, -bound, bound, out=v)
    if stochastic_key is None:
        np.rint(v, out=v)
    else:
        floor = np.floor(v)
        np.subtract(v, floor, out=v)  # fractional part in [0, 1)
        coins = prg.keystream(stochastic_key, x.size, np.uint32).astype(np.float64)
        coins *= 2.0**-32
        np.add(floor, coins < v, out=v)
    return v.astype(spec.signed_dtype).view(spec.dtype), clipped


def dequantise(ring_sum: np.ndarray, *, spec: FixedPoint) -> np.ndarray:
    """Decode a ring sum into float64: signed reading, divided by the scale."""
    if ring_sum.dtype != spec.dtype:
        raise ValueError(f"ring sum has dtype {ring_sum.dtype}, expected {spec.dtype}")
    return ring_sum.view(spec.signed_dtype).astype(np.float64) / spec.scale
