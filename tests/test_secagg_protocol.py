"""SecAgg+ protocol: oracle sums under dropouts at every stage, aborts, tampering, model mismatch,
uniformity of masked vectors, freshness and secrecy of round keys.

The helper ``run_round`` drives the client/server state machines through a whole round,
passing every message through ``to_bytes``/``from_bytes`` as a distributed engine would.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsecure._hazmat import agreement as ka
from fedsecure._hazmat.quantisation import dequantise, no_wrap_scale, sum_error_bound
from fedsecure.defenses.secagg.graph import derive_graph
from fedsecure.defenses.secagg.protocol import (
    STAGES,
    AdvertiseKeys,
    ClientStage,
    ForwardedShares,
    MaskedInput,
    MessageFormatError,
    ModelMismatchError,
    NeighbourKeys,
    ProtocolStateError,
    RoundSetup,
    SecAggAbortError,
    SecAggClient,
    SecAggIntegrityError,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    new_nonce,
)


# ---- driver -------------------------------------------------------------------------------
def wire(msg: Any) -> Any:
    """Serialise and parse a message; checks ``nbytes`` against the real size."""
    data = msg.to_bytes()
    assert msg.nbytes == len(data)
    return type(msg).from_bytes(data)


@dataclass
class Round:
    setup: RoundSetup
    server: SecAggServer
    clients: dict[int, SecAggClient]
    messages: dict[str, dict[int, Any]] = field(default_factory=dict)


def make_round(
    n: int,
    num_params: int,
    *,
    k: int,
    t: int,
    clip: float = 1.0,
    max_weight: float = 100.0,
    ring_bits: int = 32,
    stochastic: bool = False,
    hashes: Mapping[int, str] | None = None,
    round_: int = 0,
    signed: bool = False,
    identities: Mapping[int, Any] | None = None,
    prg: str = "aes128-ctr",
) -> Round:
    setup = RoundSetup(
        run_id="test-run",
        round=round_,
        nonce=new_nonce(),
        client_ids=tuple(range(n)),
        neighbours=k,
        threshold=t,
        ring_bits=ring_bits,
        scale=no_wrap_scale(ring_bits=ring_bits, clip_range=clip, num_clients=n, max_weight=max_weight),
        clip_range=clip,
        max_weight=max_weight,
        num_params=num_params,
        stochastic_rounding=stochastic,
        prg=prg,
        signed=signed,
    )
    pki = None
    if signed:
        from fedsecure._hazmat import agreement as ka

        assert identities is not None
        pki = {c: ka.ed25519_public_bytes(identities[c]) for c in range(n)}
    hashes = dict(hashes or {})
    server = SecAggServer(setup, global_hash="model-v1", peer_identities=pki)
    clients = {
        c: SecAggClient(
            c,
            setup,
            global_hash=hashes.get(c, "model-v1"),
            identity_key=(identities or {}).get(c),
            peer_identities=pki,
        )
        for c in range(n)
    }
    return Round(setup, server, clients)


Hook = Callable[[str, dict[int, Any]], dict[int, Any]]


def run_round(
    rnd: Round,
    xs: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    *,
    drops: Mapping[str, set[int]] | None = None,
    use_wire: bool = True,
    tamper: Hook | None = None,
) -> np.ndarray:
    """Run stages 1-4; returns the decoded float64 weighted sum. ``tamper`` may edit messages in flight."""
    drops = {s: set(v) for s, v in (drops or {}).items()}
    w = wire if use_wire else (lambda m: m)

    def hop(stage: str, msgs: dict[int, Any]) -> dict[int, Any]:
        msgs = {c: w(m) for c, m in msgs.items()}
        if tamper is not None:
            msgs = tamper(stage, msgs)
        rnd.messages[stage] = msgs
        return msgs

    ids = sorted(rnd.clients)
    adv: dict[int, AdvertiseKeys] = {
        c: rnd.clients[c].advertise_keys() for c in ids if c not in drops.get("advertise_keys", set())
    }
    routed: dict[int, NeighbourKeys] = hop(
        "neighbour_keys", rnd.server.receive_advertise(hop("advertise", adv))
    )
    shares: dict[int, ShareKeys] = {
        c: rnd.clients[c].share_keys(m) for c, m in routed.items() if c not in drops.get("share_keys", set())
    }
    fwd: dict[int, ForwardedShares] = hop("forwarded", rnd.server.receive_shares(hop("share_keys", shares)))
    masked: dict[int, MaskedInput] = {
        c: rnd.clients[c].masked_input(m, xs[c], weight=weights[c])
        for c, m in fwd.items()
        if c not in drops.get("masked_input", set())
    }
    for m in hop("masked_input", masked).values():
        rnd.server.add_masked_input(m)
    reqs: dict[int, UnmaskRequest] = hop("unmask_request", rnd.server.unmask_requests())
    resps: dict[int, UnmaskResponse] = {
        c: rnd.clients[c].unmask(r) for c, r in reqs.items() if c not in drops.get("unmask", set())
    }
    ring = rnd.server.receive_unmask(hop("unmask", resps))
    return dequantise(ring, spec=rnd.setup.fixed_point)


def expected_sum(xs: Mapping[int, np.ndarray], weights: Mapping[int, float], ids, clip: float) -> np.ndarray:
    out = np.zeros(next(iter(xs.values())).size, dtype=np.float64)
    for c in ids:
        out += weights[c] * np.clip(xs[c].astype(np.float64), -clip, clip)
    return out


def bound(rnd: Round, num_survivors: int) -> float:
    s = rnd.setup
    return sum_error_bound(
        spec=s.fixed_point,
        num_clients=num_survivors,
        max_weight=s.max_weight,
        stochastic=s.stochastic_rounding,
    )


def random_inputs(
    n: int, p: int, seed: int, scale: float = 0.3
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    rng = np.random.default_rng(seed)
    xs = {c: (rng.standard_normal(p) * scale).astype(np.float32) for c in range(n)}
    ws = {c: float(rng.integers(1, 100)) for c in range(n)}
    return xs, ws


def check_sum(rnd: Round, out: np.ndarray, xs, ws, included) -> None:
    assert rnd.server.survivors == frozenset(included)
    err = np.abs(out - expected_sum(xs, ws, included, rnd.setup.clip_range)).max()
    assert err <= bound(rnd, len(included)), (err, bound(rnd, len(included)))


# ---- oracle sums ---------------------------------------------------------------------------
def test_no_dropout_sum_matches_plain_sum_over_the_wire():
    n, p = 8, 300
    g = derive_graph(n, max_dropout_fraction=0.1, max_corrupt_fraction=0.1)
    rnd = make_round(n, p, k=g.neighbours, t=g.threshold)
    xs, ws = random_inputs(n, p, 0)
    out = run_round(rnd, xs, ws)
    check_sum(rnd, out, xs, ws, range(n))
    # the bound is tight enough to matter: 8 clients, weights < 100, 32-bit ring
    assert bound(rnd, n) < 1e-5


@pytest.mark.parametrize("stage", STAGES)
def test_dropout_at_each_stage(stage):
    n, p = 10, 257
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 1)
    out = run_round(rnd, xs, ws, drops={stage: {3}})
    # A client that never sent its masked input is out of the sum; one that dropped at unmask is in it.
    included = range(n) if stage == "unmask" else [c for c in range(n) if c != 3]
    check_sum(rnd, out, xs, ws, included)
    if stage == "masked_input":
        assert rnd.server.needed_keys == frozenset({3})
        # only the masks between the dropped client and its surviving neighbours are regenerated
        assert rnd.server.masks_regenerated == (n - 1) + len(rnd.server.share_holders[3])


def test_dropouts_at_all_stages_at_once_complete_graph():
    n, p = 12, 64
    rnd = make_round(n, p, k=11, t=6)  # Bonawitz et al.: complete graph
    xs, ws = random_inputs(n, p, 2)
    drops = {"advertise_keys": {0}, "share_keys": {1}, "masked_input": {2}, "unmask": {3}}
    out = run_round(rnd, xs, ws, drops=drops)
    check_sum(rnd, out, xs, ws, [c for c in range(n) if c not in (0, 1, 2)])


STAGE_OR_NONE = st.sampled_from((None, *STAGES))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(4, 12),
    p=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
    stochastic=st.booleans(),
)
def test_property_sum_within_bound_for_dropouts_within_the_design_bound(n, p, seed, data, stochastic):
    g = derive_graph(n, max_dropout_fraction=0.2, max_corrupt_fraction=0.1)
    rnd = make_round(n, p, k=g.neighbours, t=g.threshold, clip=1.5, stochastic=stochastic)
    rng = np.random.default_rng(seed)
    xs = {c: (rng.standard_normal(p) * rng.uniform(0.01, 3)).astype(np.float32) for c in range(n)}
    ws = {c: float(data.draw(st.integers(1, 100))) for c in range(n)}
    dropouts = data.draw(st.lists(st.sampled_from(range(n)), unique=True, max_size=g.max_dropouts))
    drops: dict[str, set[int]] = {s: set() for s in STAGES}
    for c in dropouts:
        drops[data.draw(st.sampled_from(STAGES))].add(c)
    out = run_round(rnd, xs, ws, drops=drops)
    gone = drops["advertise_keys"] | drops["share_keys"] | drops["masked_input"]
    check_sum(rnd, out, xs, ws, [c for c in range(n) if c not in gone])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 10), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_property_any_dropout_pattern_gives_the_exact_sum_or_a_clean_abort(n, seed, data):
    p = 16
    k = min(4, n - 1) if n - 1 > 4 else n - 1
    t = k // 2 + 1
    rnd = make_round(n, p, k=k, t=t)
    xs, ws = random_inputs(n, p, seed)
    stage_of = {c: data.draw(st.sampled_from((None, None, *STAGES))) for c in range(n)}
    drops = {s: {c for c, sc in stage_of.items() if sc == s} for s in STAGES}
    try:
        out = run_round(rnd, xs, ws, drops=drops)
    except SecAggAbortError:
        assert rnd.server.stage != "done"
        return
    gone = drops["advertise_keys"] | drops["share_keys"] | drops["masked_input"]
    check_sum(rnd, out, xs, ws, [c for c in range(n) if c not in gone])


@pytest.mark.parametrize("prg_name", ["aes128-ctr", "chacha20"])
def test_ring64_and_both_prgs(prg_name):
    n, p = 5, 100
    rnd = make_round(n, p, k=4, t=3, ring_bits=64, max_weight=1e6, prg=prg_name)
    xs, ws = random_inputs(n, p, 3)
    ws = {c: w * 1e4 for c, w in ws.items()}
    out = run_round(rnd, xs, ws, drops={"masked_input": {4}})
    check_sum(rnd, out, xs, ws, range(4))
    assert rnd.messages["masked_input"][0].vector.dtype == np.uint64


def test_extreme_inputs_do_not_wrap():
    # every client at the clip bound with the max weight: the worst case of the no-wrap proof
    n, p = 12, 8
    rnd = make_round(n, p, k=6, t=4, clip=0.5, max_weight=1000)
    xs = {c: np.array([5.0, -5.0, 0.5, -0.5, 0.4999, -0.4999, 0.0, 1e-30], np.float32) for c in range(n)}
    ws = dict.fromkeys(range(n), 1000.0)
    out = run_round(rnd, xs, ws)
    check_sum(rnd, out, xs, ws, range(n))
    assert out[0] == pytest.approx(n * 1000 * 0.5, rel=1e-8) and out[1] == pytest.approx(
        -n * 1000 * 0.5, rel=1e-8
    )


# ---- aborts below threshold -----------------------------------------------------------------
def test_abort_before_any_share_is_requested_when_holders_dropped_before_unmask():
    n, p = 10, 32
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 4)
    with pytest.raises(SecAggAbortError, match="before any share is requested"):
        run_round(rnd, xs, ws, drops={"masked_input": {0, 1, 2, 3, 4, 5}})
    # no client revealed anything: all survivors are still waiting for an unmask request
    assert all(c.stage is ClientStage.MASKED for c in rnd.clients.values() if c.client_id >= 6)
    assert "unmask" not in rnd.messages


def test_abort_without_output_when_holders_drop_during_unmask():
    n, p = 10, 32
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 5)
    with pytest.raises(SecAggAbortError, match=r"fewer for .*Aborting without output"):
        run_round(rnd, xs, ws, drops={"unmask": {0, 1, 2, 3, 4}})
    assert rnd.server.stage == "aborted" and rnd.server._acc is None


def test_abort_at_advertise_stage_and_client_side_refusals():
    n, p = 10, 8
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 6)
    with pytest.raises(SecAggAbortError, match="advertise_keys"):
        run_round(rnd, xs, ws, drops={"advertise_keys": set(range(6))})
    # a client refuses to deal shares to fewer than t neighbours
    rnd = make_round(n, p, k=4, t=3)
    c0 = rnd.clients[0]
    c0.advertise_keys()
    with pytest.raises(SecAggAbortError, match="threshold"):
        c0.share_keys(NeighbourKeys(0, 0, ()))


def test_client_refuses_malicious_unmask_requests():
    n, p = 8, 8
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 7)
    seen: dict[str, Any] = {}

    def grab(stage, msgs):
        seen[stage] = msgs
        if stage == "unmask_request":
            raise _Stop
        return msgs

    with pytest.raises(_Stop):
        run_round(rnd, xs, ws, tamper=grab)
    w, req = next(iter(seen["unmask_request"].items()))
    client = rnd.clients[w]
    both = UnmaskRequest(req.round, w, req.alive, req.alive[:1])
    with pytest.raises(SecAggIntegrityError, match="both alive and dropped"):
        client.unmask(both)
    with pytest.raises(SecAggAbortError, match="refusing to unmask"):
        client.unmask(UnmaskRequest(req.round, w, req.alive[:1], req.alive[1:]))
    with pytest.raises(SecAggIntegrityError, match="does not hold"):
        client.unmask(UnmaskRequest(req.round, w, (*req.alive, 10**6), ()))
    client.unmask(req)
    with pytest.raises(ProtocolStateError):  # a second unmask request of the round is refused
        client.unmask(UnmaskRequest(req.round, w, (), req.alive))


class _Stop(Exception):
    pass


class caplog_at_warning:
    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        logging.getLogger("fedsecure").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("fedsecure").removeHandler(self.handler)


# ---- tampering and malicious-server checks --------------------------------------------------
def test_tampered_share_ciphertext_is_detected_before_masking():
    n, p = 6, 8
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 8)

    def flip(stage, msgs):
        if stage == "forwarded":
            m = msgs[2]
            sender, ct = m.ciphertexts[0]
            bad = ct[:20] + bytes([ct[20] ^ 1]) + ct[21:]
            msgs[2] = ForwardedShares(m.round, m.receiver, ((sender, bad), *m.ciphertexts[1:]))
        return msgs

    with pytest.raises(SecAggIntegrityError, match="failed authentication"):
        run_round(rnd, xs, ws, tamper=flip)
    assert rnd.clients[2].stage is ClientStage.SHARED  # nothing was sent


def test_redirected_share_ciphertext_is_detected():
    n, p = 6, 8
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 9)

    def swap(stage, msgs):
        if stage == "forwarded":
            m = msgs[1]
            (s0, c0), (s1, c1), *rest = m.ciphertexts
            msgs[1] = ForwardedShares(m.round, m.receiver, ((s0, c1), (s1, c0), *rest))
        return msgs

    with pytest.raises(SecAggIntegrityError, match="failed authentication"):
        run_round(rnd, xs, ws, tamper=swap)


@pytest.mark.parametrize("spare", [True, False])
def test_tampered_unmask_share_is_detected(spare, caplog):
    n, p = 10, 16
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 10)
    # with no other dropout every secret has 4 holders (one spare share); dropping a neighbour
    # of the victim at unmask leaves exactly t, so a bad share cannot be tolerated any more.
    victim_holder: dict[str, int] = {}

    def corrupt(stage, msgs):
        if stage == "unmask":
            w = min(msgs)
            m = msgs[w]
            owner, share = m.seed_shares[0]
            bad = share[:-1] + bytes([share[-1] ^ 0x55])
            msgs[w] = UnmaskResponse(m.round, w, ((owner, bad), *m.seed_shares[1:]), m.key_shares)
            victim_holder["owner"], victim_holder["holder"] = owner, w
        return msgs

    drops: dict[str, set[int]] = {}
    if not spare:
        # find the first responder and the owner of its first seed share, then drop another holder
        order = sorted(rnd.clients)
        w = order[0]
        first_owner = min(rnd.clients[w].neighbours)
        other = next(h for h in sorted(rnd.clients[first_owner].neighbours) if h != w)
        drops = {"unmask": {other}}
    with caplog.at_level(logging.WARNING):
        if spare:
            out = run_round(rnd, xs, ws, tamper=corrupt)
            check_sum(rnd, out, xs, ws, range(n))
            assert "does not match its commitment" in caplog.text
        else:
            with pytest.raises(SecAggAbortError, match="does not match its commitment"):
                run_round(rnd, xs, ws, drops=drops, tamper=corrupt)


def test_response_with_unrequested_shares_is_ignored():
    # a client that also reveals the seed share of a dropped neighbour: the server must not use it
    # (it discards that client's whole answer; k=6 leaves enough other holders)
    n, p = 8, 8
    rnd = make_round(n, p, k=6, t=4)
    xs, ws = random_inputs(n, p, 11)

    def extra(stage, msgs):
        if stage == "unmask":
            w = min(c for c, m in msgs.items() if m.key_shares)  # a holder of the dropped client's shares
            m = msgs[w]
            msgs[w] = UnmaskResponse(m.round, w, m.seed_shares + m.key_shares, ())
        return msgs

    with caplog_at_warning() as records:
        out = run_round(rnd, xs, ws, drops={"masked_input": {7}}, tamper=extra)
    check_sum(rnd, out, xs, ws, range(7))
    assert any("answered a different request" in r.getMessage() for r in records)


def test_different_global_models_are_detected():
    n, p = 6, 8
    rnd = make_round(n, p, k=4, t=3, hashes={4: "model-v1-backdoored"})
    xs, ws = random_inputs(n, p, 12)
    with pytest.raises(ModelMismatchError, match="different global adapters"):
        run_round(rnd, xs, ws)
    # nobody sent a masked input
    assert "masked_input" not in rnd.messages


def test_pairwise_masks_bind_the_model_hash():
    # even without the AEAD check, masks of clients with different models do not cancel
    from fedsecure.defenses.secagg.protocol import model_digest, pairwise_mask_key

    shared, session = bytes(range(32)), bytes(32)
    k1 = pairwise_mask_key(shared, session=session, a=1, b=2, model=model_digest("m"), algorithm="aes128-ctr")
    k2 = pairwise_mask_key(shared, session=session, a=2, b=1, model=model_digest("m"), algorithm="aes128-ctr")
    k3 = pairwise_mask_key(
        shared, session=session, a=1, b=2, model=model_digest("m'"), algorithm="aes128-ctr"
    )
    assert k1 == k2 and k1 != k3


def test_signed_keys_stop_key_substitution():
    n, p = 6, 8
    ids = {c: ka.generate_ed25519() for c in range(n)}
    rnd = make_round(n, p, k=4, t=3, signed=True, identities=ids)
    xs, ws = random_inputs(n, p, 13)
    out = run_round(rnd, xs, ws)
    check_sum(rnd, out, xs, ws, range(n))

    rnd = make_round(n, p, k=4, t=3, signed=True, identities=ids)
    evil = ka.generate_x25519()

    def substitute(stage, msgs):
        if stage == "neighbour_keys":
            m = msgs[0]
            e = m.entries[0]
            forged = AdvertiseKeys(e.round, e.sender, ka.x25519_public_bytes(evil), e.enc_public, e.signature)
            msgs[0] = NeighbourKeys(m.round, 0, (forged, *m.entries[1:]))
        return msgs

    with pytest.raises(SecAggIntegrityError, match="not signed"):
        run_round(rnd, xs, ws, tamper=substitute)


def test_clients_reject_a_setup_that_could_wrap_or_a_foreign_graph():
    base = make_round(6, 8, k=4, t=3).setup
    from dataclasses import replace

    with pytest.raises(SecAggIntegrityError, match="wrap"):
        SecAggClient(0, replace(base, scale=base.scale * 4), global_hash="m")
    with pytest.raises(SecAggIntegrityError, match="majority"):
        SecAggClient(0, replace(base, threshold=2), global_hash="m")
    rnd = make_round(6, 8, k=4, t=3)
    c = rnd.clients[0]
    c.advertise_keys()
    outsider = next(v for v in range(6) if v != 0 and v not in c.neighbours)
    other = make_round(6, 8, k=4, t=3).clients[outsider].advertise_keys()
    with pytest.raises(SecAggIntegrityError, match="not its neighbour"):
        c.share_keys(NeighbourKeys(0, 0, (other,)))


def test_stage_order_is_enforced():
    rnd = make_round(4, 4, k=3, t=2)
    c = rnd.clients[0]
    with pytest.raises(ProtocolStateError):
        c.share_keys(NeighbourKeys(0, 0, ()))
    with pytest.raises(ProtocolStateError):
        rnd.server.unmask_requests()


# ---- the masked vector reveals nothing obvious ---------------------------------------------
def test_masked_vectors_are_uniform_over_the_ring():
    n, p = 5, 200_000
    rnd = make_round(n, p, k=4, t=3)
    # highly structured inputs: zeros, a constant, a ramp
    xs = {
        0: np.zeros(p, np.float32),
        1: np.full(p, 0.25, np.float32),
        2: np.linspace(-1, 1, p, dtype=np.float32),
        3: np.zeros(p, np.float32),
        4: np.zeros(p, np.float32),
    }
    ws = dict.fromkeys(range(n), 10.0)
    run_round(rnd, xs, ws)
    for c in (0, 1, 2):
        v = rnd.messages["masked_input"][c].vector
        for shift in (0, 12, 24):  # low, middle and top byte of each 32-bit word
            counts = np.bincount((v >> np.uint32(shift)).astype(np.uint8), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6, (c, shift)
        assert abs(stats.pearsonr(v.astype(np.float64), xs[2].astype(np.float64)).statistic) < 0.02
    # the detector is not blind: the unmasked quantised input fails it at once
    from fedsecure._hazmat.quantisation import quantise

    q, _ = quantise(xs[2], weight=10.0, spec=rnd.setup.fixed_point)
    counts = np.bincount((q >> np.uint32(24)).astype(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue < 1e-12


# ---- freshness and secrecy --------------------------------------------------------------
def _capture_secrets(rnd: Round) -> list[bytes]:
    out = []
    for c in rnd.clients.values():
        if c._mask_sk is not None:
            out.append(ka.x25519_private_bytes(c._mask_sk))
            out.append(ka.x25519_private_bytes(c._enc_sk))
        if c._self_seed:
            out.append(c._self_seed)
    return out


def test_keys_and_seeds_are_fresh_per_round_and_never_logged_or_sent(caplog, monkeypatch):
    # no numpy / stdlib / torch RNG may be used for keys, seeds or masks
    import torch

    def banned(*a, **k):
        raise AssertionError("non-cryptographic RNG used")

    for mod, names in (
        (np.random, ("default_rng", "rand", "randint", "random", "seed", "RandomState")),
        (random, ("random", "getrandbits", "randbytes", "randint")),
        (torch, ("rand", "randint", "randn")),
    ):
        for name in names:
            monkeypatch.setattr(mod, name, banned)
    n, p = 6, 64
    xs = {c: np.linspace(-0.5, 0.5, p, dtype=np.float32) * (c + 1) for c in range(n)}
    ws = dict.fromkeys(range(n), 3.0)
    secrets_by_round: list[list[bytes]] = []
    publics: list[set[bytes]] = []
    caplog.set_level(logging.DEBUG, logger="fedsecure")
    for r in range(2):
        rnd = make_round(n, p, k=4, t=3, round_=r)
        grabbed: list[bytes] = []

        def grab(stage, msgs, rnd=rnd, grabbed=grabbed):
            if stage == "forwarded":  # after share_keys: both key pairs and the seed exist
                grabbed.extend(_capture_secrets(rnd))
            return msgs

        out = run_round(rnd, xs, ws, tamper=grab, drops={"masked_input": {5}})
        check_sum(rnd, out, xs, ws, range(5))
        assert len(grabbed) == 3 * n and len(set(grabbed)) == 3 * n
        secrets_by_round.append(grabbed)
        publics.append({m.mask_public for m in rnd.messages["advertise"].values()})
        # secrets are gone from the clients once used (client 5 dropped before using them: wipe it)
        rnd.clients[5].wipe()
        assert all(c._mask_sk is None and not c._self_seed and not c._held_seed for c in rnd.clients.values())
        # nothing the server received contains a private key or a seed in the clear
        sent = b"".join(m.to_bytes() for msgs in rnd.messages.values() for m in msgs.values())
        for s in grabbed:
            assert s not in sent
        for c in rnd.clients.values():
            assert "_sk" not in repr(c) and "seed" not in repr(c)
            with pytest.raises(TypeError):
                __import__("pickle").dumps(c)
    assert not set(secrets_by_round[0]) & set(secrets_by_round[1])
    assert not publics[0] & publics[1]
    assert "secagg round" in caplog.text  # the protocol does log, but no secret
    for s in secrets_by_round[0] + secrets_by_round[1]:
        for form in (s.hex(), repr(s), str(list(s))[:40]):
            assert form not in caplog.text


# ---- messages -------------------------------------------------------------------------------
def test_messages_round_trip_and_reject_garbage():
    rnd = make_round(4, 10, k=3, t=2)
    s = rnd.setup
    assert RoundSetup.from_bytes(s.to_bytes()) == s and s.nbytes == len(s.to_bytes())
    xs, ws = random_inputs(4, 10, 14)
    run_round(rnd, xs, ws)  # every hop already went through bytes
    m = rnd.messages["masked_input"][0]
    back = MaskedInput.from_bytes(m.to_bytes())
    assert np.array_equal(back.vector, m.vector) and back.weight == m.weight
    assert m.nbytes == len(m.to_bytes()) == 4 * 10 + 38
    data = m.to_bytes()
    with pytest.raises(MessageFormatError, match="truncated"):
        MaskedInput.from_bytes(data[:-1])
    with pytest.raises(MessageFormatError, match="trailing"):
        MaskedInput.from_bytes(data + b"\0")
    with pytest.raises(MessageFormatError, match="not a ShareKeys"):
        ShareKeys.from_bytes(data)
    for cls in (AdvertiseKeys, NeighbourKeys, ForwardedShares, UnmaskRequest, UnmaskResponse):
        with pytest.raises(MessageFormatError):
            cls.from_bytes(b"FSA1")


def test_a_server_never_holds_plaintext_inputs():
    # the server object only ever receives messages; its state has no float vectors
    n, p = 5, 50
    rnd = make_round(n, p, k=4, t=3)
    xs, ws = random_inputs(n, p, 15)
    run_round(rnd, xs, ws)
    for value in vars(rnd.server).values():
        if isinstance(value, np.ndarray):
            assert value.dtype.kind == "u"
