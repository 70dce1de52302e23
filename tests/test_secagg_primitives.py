"""SecAgg+ primitives: PRG masks, Shamir sharing, fixed-point quantisation, AEAD/KDF, neighbour graph."""

from __future__ import annotations

import math
import os
from itertools import combinations

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsecure._hazmat import agreement as ka
from fedsecure._hazmat import prg, shamir
from fedsecure._hazmat.quantisation import (
    FixedPoint,
    dequantise,
    fits,
    no_wrap_scale,
    quantise,
    sum_error_bound,
)
from fedsecure.defenses.secagg.graph import (
    _hg_tail,
    check_graph,
    derive_graph,
    graph_failure_bounds,
    neighbours_of,
)


# ---- PRG ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", prg.PRG_ALGORITHMS)
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_chunked_masks_equal_full_keystreams(algorithm, dtype):
    n = (1 << 17) // np.dtype(dtype).itemsize * 3 + 17  # several chunks plus a ragged tail
    keys = [os.urandom(prg.key_bytes(algorithm)) for _ in range(5)]
    acc = np.arange(n, dtype=dtype)
    expected = acc.copy()
    with np.errstate(over="ignore"):
        for k in keys[:3]:
            expected += prg.keystream(k, n, dtype, algorithm=algorithm)
        for k in keys[3:]:
            expected -= prg.keystream(k, n, dtype, algorithm=algorithm)
    prg.apply_masks(acc, add_keys=keys[:3], sub_keys=keys[3:], algorithm=algorithm)
    assert np.array_equal(acc, expected)
    # a mask added and removed cancels exactly (ring arithmetic)
    prg.apply_masks(acc, add_keys=keys[3:], sub_keys=keys[:3], algorithm=algorithm)
    assert np.array_equal(acc, np.arange(n, dtype=dtype))


def test_keystream_is_the_aes_ctr_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16))
    ref = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    assert prg.keystream(key, 16, np.uint32).tobytes() == ref
    assert not np.array_equal(prg.keystream(key, 16, np.uint32), prg.keystream(os.urandom(16), 16, np.uint32))


def test_prg_rejects_bad_arguments():
    with pytest.raises(ValueError, match="16-byte key"):
        prg.keystream(b"short", 4, np.uint32)
    with pytest.raises(ValueError, match="unknown PRG"):
        prg.key_bytes("rc4")
    with pytest.raises(ValueError, match="uint32/uint64"):
        prg.apply_masks(np.zeros(4, np.int32), add_keys=[os.urandom(16)])


# ---- Shamir ---------------------------------------------------------------------------------
def test_field_is_prime_and_holds_32_byte_secrets():
    assert sympy.isprime(shamir.PRIME)
    assert shamir.PRIME > 2**256 and shamir.PRIME.bit_length() == 257
    secret = b"\xff" * 32
    shares = shamir.split(secret, threshold=2, xs=[1, 2, 3])
    assert shamir.combine({1: shares[1], 3: shares[3]}, threshold=2) == secret


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), m=st.integers(1, 9), data=st.data())
def test_any_t_shares_recover_the_secret(secret, m, data):
    t = data.draw(st.integers(1, m))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=m, max_size=m, unique=True))
    shares = shamir.split(secret, threshold=t, xs=xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=m, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, threshold=t) == secret


def test_fewer_than_t_shares_reveal_nothing_and_are_refused():
    # with t-1 shares every candidate secret is equally consistent: the t-1 shares of two
    # different secrets, for the same coins, can be made identical by shifting the polynomial.
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(shamir.ShareError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    # any 2 shares plus a guessed third give *some* 32-byte or field value, never a check
    ys = [int.from_bytes(s, "big") for s in shares.values()]
    assert len(set(ys)) == 4
    # shares are fresh: the same secret is shared differently each time
    again = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4])
    assert all(again[x] != shares[x] for x in shares)


def test_tampered_surplus_share_is_detected():
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    bad = dict(shares)
    bad[5] = (int.from_bytes(bad[5], "big") ^ 1).to_bytes(33, "big")
    with pytest.raises(shamir.ShareError, match="inconsistent"):
        shamir.combine(bad, threshold=3)
    assert shamir.combine(bad, threshold=3, check_consistency=False) == secret  # the first 3 are intact
    for subset in combinations([1, 2, 3, 4], 3):
        assert shamir.combine({x: shares[x] for x in subset}, threshold=3) == secret


def test_shamir_input_validation():
    with pytest.raises(shamir.ShareError, match="32 bytes"):
        shamir.split(b"x", threshold=1, xs=[1])
    with pytest.raises(shamir.ShareError, match="distinct"):
        shamir.split(bytes(32), threshold=1, xs=[1, 1])
    with pytest.raises(shamir.ShareError, match="threshold"):
        shamir.split(bytes(32), threshold=3, xs=[1, 2])
    with pytest.raises(shamir.ShareError, match="x-coordinates"):
        shamir.split(bytes(32), threshold=1, xs=[0])
    with pytest.raises(shamir.ShareError, match="33 bytes"):
        shamir.combine({1: b"\0" * 32}, threshold=1)


# ---- quantisation ---------------------------------------------------------------------------
def test_quantise_hand_computed():
    spec = FixedPoint(ring_bits=32, scale=4.0, clip_range=1.0)
    x = np.array([0.3, -0.3, 2.0, -5.0, 0.0625, -0.0625], np.float32)
    q, clipped = quantise(x, weight=2.0, spec=spec)
    # x * w * s = [2.4, -2.4, 16 (clipped 8), -40 (clipped -8), 0.5, -0.5] -> nearest-even
    assert clipped == 2
    assert q.dtype == np.uint32
    assert q.view(np.int32).tolist() == [2, -2, 8, -8, 0, 0]
    assert q.tolist()[1] == 2**32 - 2
    total = q + q  # two identical clients, ring addition
    assert dequantise(total, spec=spec).tolist() == [1.0, -1.0, 4.0, -4.0, 0.0, 0.0]


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000])
def test_no_wrap_at_the_worst_case(ring_bits, n):
    w, c = 5000.0, 0.7
    s = no_wrap_scale(ring_bits=ring_bits, clip_range=c, num_clients=n, max_weight=w)
    spec = FixedPoint(ring_bits=ring_bits, scale=s, clip_range=c)
    assert fits(spec=spec, num_clients=n, max_weight=w)
    assert not fits(spec=FixedPoint(ring_bits, s * 1.001, c), num_clients=n, max_weight=w)
    for sign in (1.0, -1.0):
        for stochastic in (None, os.urandom(16)):
            x = np.full(3, sign * 10.0, np.float32)  # clipped to the bound
            q, _ = quantise(x, weight=w, spec=spec, stochastic_key=stochastic)
            total = np.zeros(3, spec.dtype)
            with np.errstate(over="ignore"):
                for _ in range(n):
                    total += q
            exact = n * int(q.view(spec.signed_dtype)[0])
            assert abs(exact) < 2 ** (ring_bits - 1)
            assert int(total.view(spec.signed_dtype)[0]) == exact
            got = dequantise(total, spec=spec)[0]
            err = abs(got - sign * n * w * c)
            assert err <= sum_error_bound(
                spec=spec, num_clients=n, max_weight=w, stochastic=stochastic is not None
            )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
    stochastic=st.booleans(),
    ring_bits=st.sampled_from([32, 64]),
)
def test_decoded_sum_within_bound(n, seed, stochastic, ring_bits):
    rng = np.random.default_rng(seed)
    c, wmax = float(rng.uniform(0.01, 10)), float(rng.integers(1, 10_000))
    spec = FixedPoint(
        ring_bits, no_wrap_scale(ring_bits=ring_bits, clip_range=c, num_clients=n, max_weight=wmax), c
    )
    total = np.zeros(64, spec.dtype)
    exact = np.zeros(64)
    for _ in range(n):
        x = (rng.standard_normal(64) * c).astype(np.float32)
        w = float(rng.integers(1, int(wmax) + 1))
        q, _ = quantise(x, weight=w, spec=spec, stochastic_key=os.urandom(16) if stochastic else None)
        with np.errstate(over="ignore"):
            total += q
        exact += w * np.clip(x.astype(np.float64), -c, c)
    err = np.abs(dequantise(total, spec=spec) - exact).max()
    assert err <= sum_error_bound(spec=spec, num_clients=n, max_weight=wmax, stochastic=stochastic)


def test_stochastic_rounding_is_unbiased():
    spec = FixedPoint(32, 1.0, 10.0)
    x = np.full(200_000, 0.3, np.float32)
    q, _ = quantise(x, weight=1.0, spec=spec, stochastic_key=os.urandom(16))
    vals = q.view(np.int32)
    assert set(np.unique(vals).tolist()) == {0, 1}
    # mean 0.3 (float32 0.3 = 0.30000001192...), sd of the mean sqrt(0.21 / 2e5) ~ 0.001
    assert abs(vals.mean() - float(np.float32(0.3))) < 0.005
    q2, _ = quantise(x, weight=1.0, spec=spec)
    assert (q2.view(np.int32) == 0).all()  # nearest rounding is biased here


def test_quantise_rejects_non_finite_and_bad_weights():
    spec = FixedPoint(32, 4.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.array([np.nan], np.float32), weight=1.0, spec=spec)
    with pytest.raises(ValueError, match="weight"):
        quantise(np.zeros(2, np.float32), weight=0.0, spec=spec)
    with pytest.raises(ValueError, match="ring_bits"):
        FixedPoint(16, 1.0, 1.0)


# ---- agreement / AEAD -----------------------------------------------------------------------
def test_x25519_agreement_and_aead_tampering():
    a, b = ka.generate_x25519(), ka.generate_x25519()
    s_ab = ka.x25519_shared(a, ka.x25519_public_bytes(b))
    assert s_ab == ka.x25519_shared(b, ka.x25519_public_bytes(a))
    k = ka.hkdf(s_ab, name="test", salt=b"s" * 32, info=(1, 2), length=32)
    assert k != ka.hkdf(s_ab, name="test", salt=b"s" * 32, info=(2, 1), length=32)
    assert k != ka.hkdf(s_ab, name="other", salt=b"s" * 32, info=(1, 2), length=32)
    blob = ka.aead_encrypt(k, b"secret share", b"ad")
    assert ka.aead_decrypt(k, blob, b"ad") == b"secret share"
    assert ka.aead_encrypt(k, b"secret share", b"ad") != blob  # random nonce
    for bad_blob, ad in ((blob[:-1] + bytes([blob[-1] ^ 1]), b"ad"), (blob, b"ad2"), (blob[:10], b"ad")):
        with pytest.raises(ka.DecryptionError):
            ka.aead_decrypt(k, bad_blob, ad)
    with pytest.raises(ValueError):  # small-order / zero public key
        ka.x25519_shared(a, bytes(32))
    sk = ka.x25519_from_private_bytes(ka.x25519_private_bytes(a))
    assert ka.x25519_public_bytes(sk) == ka.x25519_public_bytes(a)


def test_encode_parts_is_unambiguous_and_signatures_verify():
    assert ka.encode_parts(b"ab", b"c") != ka.encode_parts(b"a", b"bc")
    assert ka.encode_parts(1) != ka.encode_parts(b"\x01")
    with pytest.raises(TypeError):
        ka.encode_parts(True)
    sk = ka.generate_ed25519()
    pk = ka.ed25519_public_bytes(sk)
    sig = ka.sign(sk, b"msg")
    assert ka.verify(pk, sig, b"msg") and not ka.verify(pk, sig, b"msh") and not ka.verify(b"", sig, b"msg")


# ---- graph ----------------------------------------------------------------------------------
def test_hypergeometric_tail_hand_computed():
    # population 9, 1 marked, 4 draws: P[X >= 1] = 4/9
    assert _hg_tail(9, 1, 4, 1) == pytest.approx(4 / 9)
    assert _hg_tail(9, 1, 4, 2) == 0.0
    assert _hg_tail(10, 5, 3, 3) == pytest.approx(math.comb(5, 3) / math.comb(10, 3))


@pytest.mark.parametrize(
    ("n", "k", "t"),
    [(4, 3, 2), (10, 4, 3), (20, 6, 4), (50, 12, 7), (100, 22, 12)],
)
def test_derived_graph_parameters(n, k, t):
    g = derive_graph(n, max_dropout_fraction=0.1, max_corrupt_fraction=0.1)
    assert (g.neighbours, g.threshold) == (k, t)
    assert g.log2_privacy_failure <= -40 and g.log2_correctness_failure <= -30
    # minimality: the next smaller even degree fails for every majority threshold
    if k > 2 and k != n - 1:
        smaller = k - 2
        assert all(
            graph_failure_bounds(n, smaller, tt, max_dropouts=g.max_dropouts, max_corrupt=g.max_corrupt)[0]
            > 2**-40
            or graph_failure_bounds(n, smaller, tt, max_dropouts=g.max_dropouts, max_corrupt=g.max_corrupt)[1]
            > 2**-30
            for tt in range(smaller // 2 + 1, smaller + 1)
        )


def test_larger_populations_use_logarithmic_degree():
    ks = [
        derive_graph(n, max_dropout_fraction=0.05, max_corrupt_fraction=0.05).neighbours
        for n in (200, 1000, 5000)
    ]
    assert ks == sorted(ks) and ks[-1] < 0.05 * 5000


def test_derive_graph_explains_impossible_settings():
    with pytest.raises(ValueError, match="lower one of those fractions"):
        derive_graph(3, max_dropout_fraction=0.1, max_corrupt_fraction=0.1)
    with pytest.raises(ValueError, match="at least 2 clients"):
        derive_graph(1, max_dropout_fraction=0.1, max_corrupt_fraction=0.1)


@pytest.mark.parametrize(("n", "k"), [(10, 4), (11, 6), (30, 8), (5, 4), (7, 6)])
def test_ring_lattice_is_k_regular_and_symmetric(n, k):
    ids = [3 * i + 1 for i in range(n)]
    nonce = os.urandom(32)
    adj = neighbours_of(ids, nonce=nonce, k=k)
    assert set(adj) == set(ids)
    for u, vs in adj.items():
        assert len(vs) == min(k, n - 1) and u not in vs
        assert all(u in adj[v] for v in vs)
    assert neighbours_of(ids, nonce=nonce, k=k) == adj  # recomputable by every client
    if k < n - 1:
        assert any(neighbours_of(ids, nonce=os.urandom(32), k=k) != adj for _ in range(5))


def test_check_graph_messages():
    with pytest.raises(ValueError, match="even"):
        check_graph(10, 5, 3)
    with pytest.raises(ValueError, match="majority"):
        check_graph(10, 4, 2)
    check_graph(10, 9, 5)  # complete graph, odd degree allowed


def test_masks_are_uniform_statistically():
    v = prg.keystream(os.urandom(16), 1 << 18, np.uint32)
    for shift in (0, 8, 16, 24):
        counts = np.bincount(((v >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-6
