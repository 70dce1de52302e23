"""CKKS transport: key roles, packing, oracle sums, selective encryption, integrity checks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tenseal")
import tenseal as ts

from fedsecure.defenses import ckks as ckks_mod
from fedsecure.defenses.ckks import (
    PRESETS,
    AggregateIntegrityError,
    CkksParameterError,
    CkksParameters,
    CkksTransport,
    select_encrypted_coordinates,
)
from fedsecure.federation.transport import PlainTransport, Sealed, Transport
from fedsecure.registry import TRANSPORTS
from fedsecure.types import ClientUpdate, InvalidUpdateError, RoundContext, View

TEMPLATE = {
    "layers.0.q_proj.lora_A.weight": torch.zeros(8, 64),
    "layers.0.q_proj.lora_B.weight": torch.zeros(64, 8),
    "layers.0.v_proj.lora_A.weight": torch.zeros(8, 64),
    "layers.0.v_proj.lora_B.weight": torch.zeros(32, 8),
}
N_TEMPLATE = sum(t.numel() for t in TEMPLATE.values())  # 1792


def _ctx(round_: int, clients: tuple[int, ...], run_id: str = "run") -> RoundContext:
    return RoundContext(
        round=round_, num_rounds=3, sampled_clients=clients, num_clients=max(clients) + 1, seed=0, run_id=run_id
    )


def _updates(round_, weights, *, template=TEMPLATE, scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            client_id=i,
            round=round_,
            delta={k: torch.randn(v.shape, generator=g) * scale for k, v in template.items()},
            num_examples=int(w),
        )
        for i, w in enumerate(weights)
    ]


def _oracle(updates) -> np.ndarray:
    """float64 weighted sum of the clients' fp32 deltas, flat in template order."""
    return sum(
        float(u.num_examples) * np.concatenate([t.double().reshape(-1).numpy() for t in u.delta.values()])
        for u in updates
    )


def _round(tr: Transport, updates, round_: int = 0, *, template=TEMPLATE):
    ctx = _ctx(round_, tuple(u.client_id for u in updates))
    tr.begin_round(ctx, template=template, client_ids=ctx.sampled_clients)
    sealed = [tr.encode(u, ctx=ctx) for u in updates]
    return ctx, sealed


# ---- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "security"),
    [
        ("n8192-add", 120, 192),
        ("n8192-add-wide", 180, 128),
        ("n8192", 200, 128),
        ("n8192-nvflare", 140, 192),
        ("n16384", 280, 192),
    ],
)
def test_presets_meet_he_standard(name, total, security):
    p = PRESETS[name]
    assert sum(p.coeff_mod_bit_sizes) == total
    assert total <= {8192: 218, 16384: 438}[p.poly_modulus_degree]
    assert p.security_bits == security
    assert p.slots == p.poly_modulus_degree // 2


@pytest.mark.parametrize(
    ("n", "bits", "scale", "reason"),
    [
        (8192, (60, 40, 40, 40, 60), 40, "240 bits exceeds 218"),
        (16384, (60,) * 8, 40, "480 bits exceeds 438"),
        (8192, (61, 60), 40, "20..60"),
        (5000, (60, 60), 40, "poly_modulus_degree must be one of"),
        (8192, (60,), 40, "at least two primes"),
        (8192, (60, 60), 55, "bits of value range"),
        (8192, (60, 60), 10, "scale_bits must be in 20..60"),
    ],
)
def test_bad_parameters_refused_with_reason(n, bits, scale, reason):
    with pytest.raises(CkksParameterError, match=reason):
        CkksParameters(poly_modulus_degree=n, coeff_mod_bit_sizes=bits, scale_bits=scale)


def test_transport_refuses_bad_configuration():
    with pytest.raises(CkksParameterError, match="exceeds 218"):
        CkksTransport(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60, 60, 60], scale_bits=40)
    with pytest.raises(CkksParameterError, match="need all of"):
        CkksTransport(poly_modulus_degree=8192)
    with pytest.raises(CkksParameterError, match="n8192-add"):
        CkksTransport(preset="n4096")
    with pytest.raises(ValueError, match="key_rotation"):
        CkksTransport(key_rotation="never")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="encrypt_fraction"):
            CkksTransport(encrypt_fraction=bad)
    with pytest.raises(ValueError, match="one selective-encryption criterion"):
        CkksTransport(encrypt_modules=["*q_proj*"], encrypt_fraction=0.5)
    with pytest.raises(ValueError, match="list of name patterns"):
        CkksTransport(encrypt_modules="*q_proj*")
    with pytest.raises(ValueError, match="flooding_std_coeff_units"):
        CkksTransport(flooding_std_coeff_units=-1.0)


def test_registered_as_transport():
    cls = TRANSPORTS.get("ckks")
    assert cls is CkksTransport and issubclass(cls, Transport)
    assert CkksTransport().exposes == frozenset({View.SERVER_AGGREGATE})
    assert CkksTransport().plaintext_fraction() == 0.0


def test_missing_tenseal_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install tenseal==0\.3\.18"):
        ckks_mod._tenseal()


# ---- key roles --------------------------------------------------------------------------------


def test_only_the_key_holder_holds_the_secret_key():
    tr = CkksTransport()
    ups = _updates(0, [5, 7])
    ctx, sealed = _round(tr, ups)
    agg_ctx = tr.aggregator.context
    assert agg_ctx.is_public() and not agg_ctx.has_secret_key()
    assert tr.client.context.is_public() and not tr.client.context.has_secret_key()
    assert tr.key_holder._secret_context.has_secret_key()
    # The published bytes carry no secret key (and no relinearisation / Galois keys).
    published = ts.context_from(tr.key_holder.public_key.context_bytes)
    assert not published.has_secret_key() and not published.has_relin_keys() and not published.has_galois_keys()
    with pytest.raises(ValueError, match=r"(?i)secret"):
        published.secret_key()
    # The aggregator cannot decrypt a client's ciphertext nor the aggregate: TenSEAL raises.
    _, blobs = ckks_mod._unframe(sealed[0].payload, ckks_mod._CLIENT_MAGIC)
    vec = ts.ckks_vector_from(agg_ctx, blobs[0])
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    combined = tr.combine(sealed, ctx=ctx)
    _, sum_blobs = ckks_mod._unframe(combined.payload, ckks_mod._SUM_MAGIC)
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(agg_ctx, sum_blobs[0]).decrypt()
    assert isinstance(sealed[0].payload, bytes) and isinstance(combined.payload, bytes)
    assert sealed[0].plaintext is None


def test_fresh_keys_every_round_and_per_run_option():
    tr = CkksTransport()
    fps = []
    for r in range(2):
        ctx = _ctx(r, (0, 1))
        tr.begin_round(ctx, template=TEMPLATE, client_ids=[0, 1])
        fps.append((tr.key_holder.public_key.fingerprint, tr.key_holder.public_key.context_bytes))
    assert fps[0][0] != fps[1][0] and fps[0][1] != fps[1][1]
    run = CkksTransport(key_rotation="run")
    seen = set()
    for r in range(2):
        run.begin_round(_ctx(r, (0, 1)), template=TEMPLATE, client_ids=[0, 1])
        seen.add(run.key_holder.public_key.fingerprint)
    assert len(seen) == 1


# ---- correctness ------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 70)), min_size=1, max_size=3),
    weights=st.lists(st.integers(1, 1000), min_size=1, max_size=5),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 5.0]),  # |delta * w| stays below value_bound / clients
    seed=st.integers(0, 2**16),
)
def test_decrypted_sum_equals_weighted_plain_sum(shapes, weights, scale, seed):
    template = {f"t{i}.lora_A.weight": torch.zeros(a, b) for i, (a, b) in enumerate(shapes)}
    ups = _updates(0, weights, template=template, scale=scale, seed=seed)
    tr = CkksTransport()
    ctx, sealed = _round(tr, ups, template=template)
    got = tr.open_flat(tr.combine(sealed, ctx=ctx), ctx=ctx)
    tol = tr.params.error_bound(num_clients=len(ups), flooding_std_coeff_units=16.0)
    err = np.abs(got - _oracle(ups)).max()
    assert err <= tol, (err, tol)


def test_multi_ciphertext_packing_and_match_with_plain_transport():
    template = {"a.lora_A.weight": torch.zeros(8, 576), "a.lora_B.weight": torch.zeros(576, 8)}  # 9216 values
    weights = [3, 50, 400, 17]
    tr, plain = CkksTransport(), PlainTransport()
    for r in range(2):
        ups = _updates(r, weights, template=template, seed=r)
        ctx, sealed = _round(tr, ups, r, template=template)
        assert tr.cost_report()["ciphertexts_per_client"] == math.ceil(9216 / 4096) == 3
        out = tr.open(tr.combine(sealed, ctx=ctx), ctx=ctx)
        ref = plain.open(plain.combine([plain.encode(u, ctx=ctx) for u in ups], ctx=ctx), ctx=ctx)
        tol = tr.params.error_bound(num_clients=4, flooding_std_coeff_units=16.0)
        for k in ref:
            assert out[k].dtype == torch.float32 and out[k].shape == ref[k].shape
            # CKKS tolerance plus fp32 rounding of both results (PlainTransport sums in fp32).
            assert torch.allclose(out[k].double(), ref[k].double(), atol=tol, rtol=4 * 2.0**-23), k
    rep = tr.cost_report()
    assert rep["rounds"] == 2 and rep["num_parameters"] == 9216
    assert rep["ciphertext_bytes_per_client_per_round"] > 3 * 2 * 8192 * 8  # 3 ciphertexts, 2 polys, 60-bit words
    assert sealed[0].nbytes == len(sealed[0].payload)
    # The mean over both rounds' messages; they differ only in header digits.
    assert rep["upload_bytes_per_client_per_round"] == pytest.approx(sealed[0].nbytes, abs=16)
    assert rep["bytes_ratio_fp32"] == pytest.approx(rep["upload_bytes_per_client_per_round"] / (4 * 9216))
    for key in ("encrypt_s_per_client", "aggregate_s_per_client", "decrypt_s_per_round", "keygen_s_per_round"):
        assert rep[key] > 0, key
    assert sealed[0].stage_bytes["context_download"] == rep["context_bytes_per_round"]


def test_flooding_noise_has_the_stated_magnitude():
    big = 2.0**20  # coefficient units; per-value std = 2^20 * sqrt(8192) / 2^40 ~ 8.6e-5
    tr = CkksTransport(flooding_std_coeff_units=big)
    template = {"w": torch.zeros(4096 * 4)}
    ups = [ClientUpdate(client_id=0, round=0, delta={"w": torch.zeros(4096 * 4)}, num_examples=1)]
    ctx, sealed = _round(tr, ups, template=template)
    got = tr.open_flat(tr.combine(sealed, ctx=ctx), ctx=ctx)
    want = tr.params.flooding_std_values(big)
    assert want == pytest.approx(big * math.sqrt(8192) / 2.0**40)
    assert np.std(got) == pytest.approx(want, rel=0.05)
    assert abs(np.mean(got)) < 5 * want / math.sqrt(got.size)


def test_secure_normal_is_standard_normal():
    z = ckks_mod._secure_normal(200_001)
    assert z.size == 200_001
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.005)


def test_out_of_range_update_is_refused_with_the_fix():
    tr = CkksTransport()
    ups = _updates(0, [1000, 1000])
    ups[1] = ClientUpdate(client_id=1, round=0, delta={k: v * 1e4 for k, v in ups[1].delta.items()}, num_examples=1000)
    ctx = _ctx(0, (0, 1))
    tr.begin_round(ctx, template=TEMPLATE, client_ids=[0, 1])
    tr.encode(ups[0], ctx=ctx)
    with pytest.raises(InvalidUpdateError, match=r"client 1: .*clip the update") as err:
        tr.encode(ups[1], ctx=ctx)
    assert err.value.client_id == 1


def test_encode_before_begin_round_and_unsampled_client():
    tr = CkksTransport()
    ups = _updates(0, [1, 2, 3])
    with pytest.raises(RuntimeError, match="begin_round"):
        tr.encode(ups[0], ctx=_ctx(0, (0, 1)))
    tr.begin_round(_ctx(0, (0, 1)), template=TEMPLATE, client_ids=[0, 1])
    with pytest.raises(InvalidUpdateError, match="client 2: was not sampled"):
        tr.encode(ups[2], ctx=_ctx(0, (0, 1)))
    bad = ClientUpdate(client_id=0, round=0, delta={"x": torch.zeros(3)}, num_examples=1)
    with pytest.raises(InvalidUpdateError, match="keys differ"):
        tr.encode(bad, ctx=_ctx(0, (0, 1)))


# ---- integrity --------------------------------------------------------------------------------


def _reframe(sealed: Sealed, **header_changes) -> Sealed:
    header, blobs = ckks_mod._unframe(sealed.payload, ckks_mod._CLIENT_MAGIC)
    header.pop("blob_lengths")
    header.update(header_changes)
    payload = ckks_mod._frame(ckks_mod._CLIENT_MAGIC, header, blobs)
    return Sealed(client_id=sealed.client_id, weight=sealed.weight, payload=payload, nbytes=len(payload))


def test_ciphertext_from_another_context_is_rejected():
    ups = _updates(0, [4, 9])
    tr = CkksTransport()
    ctx, sealed = _round(tr, ups)
    fingerprint = tr.key_holder.public_key.fingerprint
    # Other parameters (NVFlare's moduli): refused by fingerprint, and with a forged one SEAL refuses to parse.
    other = CkksTransport(preset="n8192-nvflare")
    _, foreign = _round(other, ups)
    with pytest.raises(InvalidUpdateError, match=r"client 1: .*fingerprint is not this round's"):
        tr.combine([sealed[0], foreign[1]], ctx=ctx)
    with pytest.raises(InvalidUpdateError, match="client 1: ciphertext 0 does not parse"):
        tr.combine([sealed[0], _reframe(foreign[1], fingerprint=fingerprint)], ctx=ctx)
    # Same parameters, another key: the fingerprint differs; forging it passes the server (it cannot
    # tell keys apart) but the key holder sees an out-of-range aggregate.
    same = CkksTransport()
    _, alien = _round(same, ups)
    with pytest.raises(InvalidUpdateError, match="fingerprint"):
        tr.combine([sealed[0], alien[1]], ctx=ctx)
    combined = tr.combine([sealed[0], _reframe(alien[1], fingerprint=fingerprint)], ctx=ctx)
    with pytest.raises(AggregateIntegrityError, match="another key"):
        tr.open(combined, ctx=ctx)


def test_stale_round_ciphertext_is_rejected():
    tr = CkksTransport()
    ups0 = _updates(0, [4, 9])
    ctx0, sealed0 = _round(tr, ups0, 0)
    tr.open(tr.combine(sealed0, ctx=ctx0), ctx=ctx0)
    ctx1, sealed1 = _round(tr, _updates(1, [4, 9]), 1)
    with pytest.raises(InvalidUpdateError, match=r"client 0: .*fingerprint"):
        tr.combine([sealed0[0], sealed1[1]], ctx=ctx1)


def test_malformed_and_inconsistent_messages_are_rejected():
    tr = CkksTransport()
    ups = _updates(0, [4, 9])
    ctx, sealed = _round(tr, ups)
    s0, s1 = sealed
    cases = [
        (Sealed(0, s0.weight, s0.payload[:-100], 0), "truncated"),
        (Sealed(0, s0.weight, b"not a ckks message", 0), "magic"),
        (Sealed(0, s0.weight, {"dict": 1}, 0), "must be bytes"),
        (Sealed(0, 5.0, s0.payload, 0), "weight"),
        (Sealed(1, s0.weight, s0.payload, 0), "header names client 0"),
        (_reframe(s0, round=7), "round 7"),
        (_reframe(s0, num_ciphertexts=2), "expected 1 ciphertexts"),
    ]
    for bad, reason in cases:
        others = [s1] if bad.client_id == 0 else [s0]
        with pytest.raises(InvalidUpdateError, match=reason):
            tr.combine([bad, *others], ctx=ctx)
    with pytest.raises(InvalidUpdateError, match="more than one update"):
        tr.combine([s0, s0], ctx=ctx)
    with pytest.raises(InvalidUpdateError, match="client 5: was not sampled"):
        tr.combine([s0, Sealed(5, 1.0, s1.payload, 0)], ctx=ctx)
    with pytest.raises(ValueError, match="no client update"):
        tr.combine([], ctx=ctx)
    # Nothing was lost: the intact messages still combine and open correctly.
    got = tr.open_flat(tr.combine(sealed, ctx=ctx), ctx=ctx)
    assert np.abs(got - _oracle(ups)).max() <= tr.params.error_bound(num_clients=2, flooding_std_coeff_units=16)


def test_wrong_size_or_scale_ciphertext_is_rejected():
    tr = CkksTransport()
    ups = _updates(0, [4, 9])
    ctx, sealed = _round(tr, ups)
    pub = tr.client.context

    def forged(vec_bytes: bytes) -> Sealed:
        header, _ = ckks_mod._unframe(sealed[1].payload, ckks_mod._CLIENT_MAGIC)
        header.pop("blob_lengths")
        payload = ckks_mod._frame(ckks_mod._CLIENT_MAGIC, header, [vec_bytes])
        return Sealed(1, sealed[1].weight, payload, len(payload))

    short = ts.ckks_vector(pub, np.zeros(100)).serialize()
    with pytest.raises(InvalidUpdateError, match=f"holds 100 values, expected {N_TEMPLATE}"):
        tr.combine([sealed[0], forged(short)], ctx=ctx)
    rescaled = ts.ckks_vector(pub, np.zeros(N_TEMPLATE), 2.0**30).serialize()
    with pytest.raises(InvalidUpdateError, match="scale 2\\^30"):
        tr.combine([sealed[0], forged(rescaled)], ctx=ctx)


def test_altered_ciphertext_bytes_are_detected():
    tr = CkksTransport()
    ups = _updates(0, [4, 9])
    ctx, sealed = _round(tr, ups)
    header, blobs = ckks_mod._unframe(sealed[1].payload, ckks_mod._CLIENT_MAGIC)
    header.pop("blob_lengths")
    ct = bytearray(blobs[0])
    mid = len(ct) // 2
    ct[mid : mid + 64] = bytes(b ^ 0xFF for b in ct[mid : mid + 64])  # 64 corrupted bytes
    payload = ckks_mod._frame(ckks_mod._CLIENT_MAGIC, header, [bytes(ct)])
    tampered = Sealed(1, sealed[1].weight, payload, len(payload))
    with pytest.raises((InvalidUpdateError, AggregateIntegrityError)):
        tr.open(tr.combine([sealed[0], tampered], ctx=ctx), ctx=ctx)


def test_in_range_malicious_values_are_not_detected():
    """The documented limit: a well-formed ciphertext of arbitrary in-range values passes."""
    tr = CkksTransport()
    ups = _updates(0, [4, 9])
    ctx, sealed = _round(tr, ups)
    evil = ClientUpdate(
        client_id=1, round=0, delta={k: torch.full_like(v, 3.0) for k, v in TEMPLATE.items()}, num_examples=9
    )
    got = tr.open_flat(tr.combine([sealed[0], tr.encode(evil, ctx=ctx)], ctx=ctx), ctx=ctx)
    assert np.abs(got - _oracle([ups[0], evil])).max() <= tr.params.error_bound(
        num_clients=2, flooding_std_coeff_units=16
    )


def test_key_holder_decrypts_one_aggregate_per_round():
    tr = CkksTransport()
    ctx, sealed = _round(tr, _updates(0, [4, 9]))
    combined = tr.combine(sealed, ctx=ctx)
    tr.open(combined, ctx=ctx)
    with pytest.raises(PermissionError, match="one aggregate per round"):
        tr.open(tr.combine(sealed[:1], ctx=ctx), ctx=ctx)


# ---- selective encryption ---------------------------------------------------------------------


def test_module_selective_encryption_exposes_the_plaintext_share():
    tr = CkksTransport(encrypt_modules=["*lora_B*"])
    ups = _updates(0, [4, 9, 2])
    ctx, sealed = _round(tr, ups)
    n_b = 64 * 8 + 32 * 8
    assert tr.plaintext_fraction() == pytest.approx((N_TEMPLATE - n_b) / N_TEMPLATE)
    assert View.SERVER_AGGREGATE in tr.exposes
    per_client = getattr(View, "SERVER_PER_CLIENT_PARTIAL", View.SERVER_PER_CLIENT)
    assert per_client in tr.exposes
    mask = tr.plaintext_mask()
    for s, u in zip(sealed, ups, strict=True):
        for k, v in u.delta.items():
            plain = "lora_A" in k
            assert bool(mask[k].all()) is plain and bool(mask[k].any()) is plain
            assert torch.equal(s.plaintext[k], v if plain else torch.zeros_like(v)), k
    got = tr.open_flat(tr.combine(sealed, ctx=ctx), ctx=ctx)
    # Plaintext coordinates are summed exactly from fp32 shares; encrypted ones within the CKKS tolerance.
    tol = tr.params.error_bound(num_clients=3, flooding_std_coeff_units=16) + 1e-6
    assert np.abs(got - _oracle(ups)).max() <= tol
    assert tr.cost_report()["plaintext_fraction_per_round"] == [pytest.approx(tr.plaintext_fraction())]


def test_module_patterns_must_match_something():
    tr = CkksTransport(encrypt_modules=["*gate_proj*"])
    with pytest.raises(ValueError, match="match no adapter tensor"):
        tr.begin_round(_ctx(0, (0,)), template=TEMPLATE, client_ids=[0])


def test_fraction_selective_mask_comes_from_the_previous_aggregate_only():
    tr = CkksTransport(encrypt_fraction=0.25)
    assert tr.plaintext_fraction() == pytest.approx(0.75)  # planned, before any round
    ups0 = _updates(0, [4, 9], seed=1)
    ctx0, sealed0 = _round(tr, ups0, 0)
    assert tr.cost_report()["plaintext_fraction_per_round"] == [0.0]  # round 0: everything encrypted
    assert all(s.plaintext is None for s in sealed0)
    agg = tr.open_flat(tr.combine(sealed0, ctx=ctx0), ctx=ctx0) / 13.0
    ctx1 = _ctx(1, (0, 1))
    tr.begin_round(ctx1, template=TEMPLATE, client_ids=[0, 1])
    k = math.ceil(0.25 * N_TEMPLATE)
    expected = np.sort(np.argsort(-np.abs(agg), kind="stable")[:k])
    assert np.array_equal(tr._layout.encrypted_index, expected)
    assert np.array_equal(select_encrypted_coordinates(agg, fraction=0.25), expected)
    # The mask is fixed before any round-1 update exists; two different update sets see the same mask.
    masks = []
    for seed in (2, 3):
        ups1 = _updates(1, [4, 9], seed=seed)
        sealed1 = [tr.encode(u, ctx=ctx1) for u in ups1]
        masks.append(
            {n: (s.plaintext[n] != 0) | (u.delta[n] == 0) for s, u in zip(sealed1[:1], ups1[:1]) for n in u.delta}
        )
    for n in TEMPLATE:
        assert torch.equal(masks[0][n], tr.plaintext_mask()[n]) and torch.equal(masks[1][n], masks[0][n])
    got = tr.open_flat(tr.combine(sealed1, ctx=ctx1), ctx=ctx1)
    assert np.abs(got - _oracle(ups1)).max() <= tr.params.error_bound(num_clients=2, flooding_std_coeff_units=16) + 1e-6
    assert tr.plaintext_fraction() == pytest.approx((N_TEMPLATE - k) / N_TEMPLATE)
    assert tr.cost_report()["download_bytes_per_client_per_round"] == (
        tr.cost_report()["context_bytes_per_round"] + math.ceil(N_TEMPLATE / 8)
    )
