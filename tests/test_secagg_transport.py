"""The ``secagg`` transport: oracle comparison with PlainTransport, dropouts, cost accounting, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsecure.defenses.secagg import (
    ModelMismatchError,
    SecAggAbortError,
    SecAggTransport,
)
from fedsecure.federation.transport import PlainTransport, Transport
from fedsecure.registry import TRANSPORTS
from fedsecure.types import ClientUpdate, InvalidUpdateError, RoundContext, RunInfo, View

TEMPLATE = {
    "layers.0.q_proj.lora_A.weight": torch.zeros(4, 32),
    "layers.0.q_proj.lora_B.weight": torch.zeros(32, 4),
    "layers.0.v_proj.lora_A.weight": torch.zeros(4, 32),
    "bias": torch.zeros(7),
}


def ctx_for(r: int, ids, global_hash: str = "global-v1") -> RoundContext:
    return RoundContext(
        round=r,
        num_rounds=3,
        sampled_clients=tuple(ids),
        num_clients=20,
        seed=11,
        global_hash=global_hash,
        run_id="run-test",
    )


def updates_for(ids, r: int, *, scale: float = 0.05) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(1000 * r + 7)
    return [
        ClientUpdate(
            client_id=c,
            round=r,
            delta={k: torch.randn(v.shape, generator=g) * scale for k, v in TEMPLATE.items()},
            num_examples=10 + 3 * c,
        )
        for c in ids
    ]


def plain_sum(updates: list[ClientUpdate], ctx: RoundContext) -> dict[str, torch.Tensor]:
    p = PlainTransport()
    return p.open(p.combine([p.encode(u, ctx=ctx) for u in updates], ctx=ctx), ctx=ctx)


def assert_close_to_plain(out, ref, bound: float) -> None:
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == torch.float32
        diff = (out[k].double() - ref[k].double()).abs().max().item()
        # quantisation bound + float32 rounding of both results
        tol = bound + 4 * 2.0**-24 * max(1.0, ref[k].abs().max().item())
        assert diff <= tol, (k, diff, tol)


def test_registered_and_declares_only_the_aggregate_view():
    cls = TRANSPORTS.get("secagg")
    assert cls is SecAggTransport and issubclass(cls, Transport)
    t = SecAggTransport()
    assert t.exposes == frozenset({View.SERVER_AGGREGATE})
    assert View.SERVER_PER_CLIENT not in t.exposes
    assert t.plaintext_fraction() == 0.0


def test_matches_plain_transport_over_rounds_with_dropouts():
    ids = [0, 2, 3, 5, 8, 9, 12, 13]
    tr = SecAggTransport(clip_range=1.0, max_weight=64, max_dropout_fraction=0.25)  # 2 of 8 may drop
    for r in range(3):
        ctx = ctx_for(r, ids)
        if r == 1:
            tr.simulate_dropouts(share_keys=[5], unmask=[9])
        tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
        ups = updates_for(ids, r)
        dropped = [3] if r == 2 else []
        sealed = [tr.encode(u, ctx=ctx) for u in ups if u.client_id not in dropped]
        assert all(s.plaintext is None for s in sealed)
        comb = tr.combine(sealed, ctx=ctx, dropped=dropped)
        out = tr.open(comb, ctx=ctx)
        included = [u for u in ups if u.client_id not in dropped and not (r == 1 and u.client_id == 5)]
        assert comb.client_ids == tuple(u.client_id for u in included)
        assert comb.total_weight == sum(u.num_examples for u in included)
        assert_close_to_plain(out, plain_sum(included, ctx), SecAggTransport.quantisation_error_bound(comb))
    rep = tr.cost_report()
    assert rep["rounds_ok"] == 3
    assert rep["rounds"][1]["dropped_at"]["share_keys"] == [5] and rep["rounds"][1]["dropped_at"][
        "unmask"
    ] == [9]
    assert rep["rounds"][2]["dropped_at"]["masked_input"] == [3]


def test_stochastic_rounding_and_chacha_also_match_plain():
    ids = list(range(6))
    tr = SecAggTransport(
        clip_range=0.5, max_weight=30, stochastic_rounding=True, prg="chacha20", signed_keys=True
    )
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    ups = updates_for(ids, 0)
    comb = tr.combine([tr.encode(u, ctx=ctx) for u in ups], ctx=ctx)
    assert_close_to_plain(tr.open(comb, ctx=ctx), plain_sum(ups, ctx), comb.cost["quantisation_error_bound"])


def test_clipping_is_applied_and_reported():
    ids = list(range(4))
    tr = SecAggTransport(clip_range=0.01, max_weight=30)
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    ups = updates_for(ids, 0, scale=1.0)
    with pytest.warns(UserWarning, match="clipped"):
        sealed = [tr.encode(u, ctx=ctx) for u in ups]
    out = tr.open(tr.combine(sealed, ctx=ctx), ctx=ctx)
    clipped = [
        ClientUpdate(u.client_id, 0, {k: v.clamp(-0.01, 0.01) for k, v in u.delta.items()}, u.num_examples)
        for u in ups
    ]
    assert_close_to_plain(out, plain_sum(clipped, ctx), 1e-6)
    assert tr.cost_report()["rounds"][0]["clipped_coordinates"] > 0


def test_stage_bytes_and_cost_report():
    ids = list(range(10))
    tr = SecAggTransport(max_weight=100)
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    sealed = [tr.encode(u, ctx=ctx) for u in updates_for(ids, 0)]
    p = sum(v.numel() for v in TEMPLATE.values())
    for s in sealed:
        assert s.nbytes == 4 * p + 38  # 32-bit ring: 1.0x the fp32 payload plus a 38-byte header
        assert s.stage_bytes["masked_input.sent"] == s.nbytes
        assert s.stage_bytes["advertise_keys.sent"] > 64 and s.stage_bytes["share_keys.sent"] > 0
        assert s.stage_bytes["masked_input.received"] > 0
    comb = tr.combine(sealed, ctx=ctx)
    rep = tr.cost_report()
    json.dumps(rep)  # results.json-ready
    rnd = rep["rounds"][0]
    g = tr.graph_parameters(10)
    assert (rnd["neighbours"], rnd["threshold"]) == (g.neighbours, g.threshold)
    per_client = rnd["bytes_per_client"]
    assert set(per_client) == {str(c) for c in ids}
    for c in ids:
        stages = per_client[str(c)]
        assert set(stages) == {"advertise_keys", "share_keys", "masked_input", "unmask"}
        # exact wire sizes (docs/secagg.md): k neighbours, no dropout
        k = g.neighbours
        assert stages["advertise_keys"]["sent"] == 89
        assert stages["share_keys"]["received"] == 25 + 76 * k
        assert stages["share_keys"]["sent"] == 61 + 210 * k
        assert stages["masked_input"]["received"] == 25 + 138 * k
        assert stages["masked_input"]["sent"] == 38 + 4 * p
        assert stages["unmask"]["received"] == 29 + 8 * k
        assert stages["unmask"]["sent"] == 29 + 41 * k
    assert rep["upload_ratio_vs_fp32"] == pytest.approx((4 * p + 38) / (4 * p))
    assert comb.cost["upload_bytes_per_client"] == 4 * p + 38
    lrb = tr.last_round_bytes
    assert lrb[3]["up"] == sum(v["sent"] for v in per_client["3"].values())
    assert lrb[3]["down"] == sum(v["received"] for v in per_client["3"].values())


def test_setup_derives_max_weight_and_rejects_conflicts():
    run = RunInfo(
        num_clients=20,
        num_rounds=2,
        clients_per_round=8,
        client_num_examples={c: 10 + c for c in range(20)},
        batch_size=4,
        local_steps=3,
        seed=0,
        dropout_rate=0.1,
    )
    tr = SecAggTransport()
    tr.setup(run)
    assert tr._max_weight() == 29.0
    assert tr.dropout_bound == pytest.approx(0.1)
    tr2 = SecAggTransport(stage_dropout_rates={"unmask": 0.05})
    tr2.setup(run)
    assert tr2.dropout_bound == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"max_dropout_fraction=0\.05 is below"):
        SecAggTransport(max_dropout_fraction=0.05).setup(run)
    with pytest.raises(ValueError, match="max_weight is unknown"):
        SecAggTransport().begin_round(ctx_for(0, [0, 1, 2, 3]), template=TEMPLATE, client_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="lower one of those fractions"):
        SecAggTransport(max_weight=10).begin_round(ctx_for(0, [0, 1]), template=TEMPLATE, client_ids=[0, 1])
    with pytest.raises(ValueError, match="sample at least 4 clients"):
        SecAggTransport(max_weight=10, max_dropout_fraction=0.1).graph_parameters(3)
    # unset max_dropout_fraction: a 3-client round keeps the privacy target, tolerates no dropout, says so
    with pytest.warns(UserWarning, match="using max_dropout_fraction=0"):
        g = SecAggTransport(max_weight=10).graph_parameters(3)
    assert (g.neighbours, g.threshold, g.max_dropouts, g.max_corrupt) == (2, 2, 0, 1)
    with pytest.raises(ValueError, match="would wrap"):
        SecAggTransport(max_weight=10, bits=29).begin_round(
            ctx_for(0, range(8)), template=TEMPLATE, client_ids=list(range(8))
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_range": 0}, "clip_range"),
        ({"clip_range": float("inf")}, "clip_range"),
        ({"ring_bits": 16}, "ring_bits"),
        ({"bits": 31}, "bits"),
        ({"neighbours": 5}, "neighbours"),
        ({"neighbours": 4, "threshold": 2}, "majority"),
        ({"threshold": 0}, "threshold"),
        ({"max_dropout_fraction": 1.0}, "max_dropout_fraction"),
        ({"max_corrupt_fraction": -0.1}, "max_corrupt_fraction"),
        ({"max_weight": 0}, "max_weight"),
        ({"prg": "rc4"}, "prg"),
        ({"security_bits": 0}, "security_bits"),
        ({"stage_dropout_rates": {"setup": 0.1}}, "stage_dropout_rates"),
        ({"stage_dropout_rates": {"unmask": 1.5}}, "unmask"),
    ],
)
def test_constructor_validation_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecAggTransport(**kwargs)


def test_explicit_graph_parameters_and_clamping():
    tr = SecAggTransport(neighbours=6, threshold=4, max_weight=10)
    g = tr.graph_parameters(20)
    assert (g.neighbours, g.threshold) == (6, 4)
    g = tr.graph_parameters(6)  # clamped to the complete graph
    assert (g.neighbours, g.threshold) == (5, 4)
    with pytest.warns(UserWarning, match="weaker than the targets"):
        SecAggTransport(neighbours=2, max_weight=10).graph_parameters(100)


def test_invalid_updates_are_rejected_with_the_client_named():
    ids = list(range(4))
    tr = SecAggTransport(max_weight=20)
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    u = updates_for(ids, 0)[0]
    with pytest.raises(InvalidUpdateError, match=r"client 0: num_examples=50 exceeds"):
        tr.encode(ClientUpdate(0, 0, u.delta, 50), ctx=ctx)
    bad = dict(u.delta)
    bad["bias"] = torch.full((7,), float("nan"))
    with pytest.raises(InvalidUpdateError, match="NaN"):
        tr.encode(ClientUpdate(0, 0, bad, 5), ctx=ctx)
    with pytest.raises(InvalidUpdateError, match="not sampled"):
        tr.encode(ClientUpdate(7, 0, u.delta, 5), ctx=ctx)
    with pytest.raises(RuntimeError, match="round 1"):
        tr.encode(u, ctx=ctx_for(1, ids))


def test_server_sending_different_models_is_detected():
    ids = list(range(6))
    tr = SecAggTransport(max_weight=30)
    ctx = ctx_for(0, ids)
    tr.simulate_model_hashes({2: "global-v1-with-backdoor"})
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    ups = updates_for(ids, 0)
    with pytest.raises(ModelMismatchError, match="different global adapters"):
        for u in ups:
            tr.encode(u, ctx=ctx)
    # the next round, with one model for everyone, works again
    ctx = ctx_for(1, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    comb = tr.combine([tr.encode(u, ctx=ctx) for u in ups], ctx=ctx)
    assert comb.client_ids == tuple(ids)
    rep = tr.cost_report()
    assert (rep["rounds_ok"], rep["rounds_aborted"]) == (1, 1)
    assert [r["status"] for r in rep["rounds"]] == ["aborted", "ok"]


def test_abort_below_threshold_gives_no_output_and_the_next_round_recovers():
    ids = list(range(10))
    tr = SecAggTransport(max_weight=50)
    ctx = ctx_for(0, ids)
    tr.simulate_dropouts(unmask=[0, 1, 2, 3, 4, 5])
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    ups = updates_for(ids, 0)
    sealed = [tr.encode(u, ctx=ctx) for u in ups]
    with pytest.raises(SecAggAbortError, match="Aborting without output"):
        tr.combine(sealed, ctx=ctx)
    assert tr.cost_report()["rounds_aborted"] == 1
    with pytest.raises(RuntimeError, match="before begin_round"):
        tr.combine(sealed, ctx=ctx)  # the round's secrets are gone
    ctx = ctx_for(1, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    comb = tr.combine([tr.encode(u, ctx=ctx) for u in ups], ctx=ctx)
    assert_close_to_plain(tr.open(comb, ctx=ctx), plain_sum(ups, ctx), comb.cost["quantisation_error_bound"])


def test_random_stage_dropouts_are_reproducible_and_tolerated():
    ids = list(range(40))
    rates = {"advertise_keys": 0.02, "share_keys": 0.02, "masked_input": 0.02, "unmask": 0.03}
    reports = []
    for _ in range(2):
        tr = SecAggTransport(max_weight=200, stage_dropout_rates=rates, max_dropout_fraction=0.2)
        ctx = ctx_for(0, ids)
        tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
        ups = updates_for(ids, 0)
        sealed = [tr.encode(u, ctx=ctx) for u in ups]
        comb = tr.combine(sealed, ctx=ctx)
        included = [u for u in ups if u.client_id in comb.client_ids]
        assert_close_to_plain(
            tr.open(comb, ctx=ctx), plain_sum(included, ctx), comb.cost["quantisation_error_bound"]
        )
        reports.append(tr.cost_report()["rounds"][0]["dropped_at"])
    assert reports[0] == reports[1]
    assert sum(len(v) for v in reports[0].values()) > 0
    gone_early = set(reports[0]["advertise_keys"]) | set(reports[0]["share_keys"])
    tr = SecAggTransport(max_weight=200, stage_dropout_rates=rates, max_dropout_fraction=0.2)
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    for u in updates_for(ids, 0):
        s = tr.encode(u, ctx=ctx)
        assert (s.payload is None) == (u.client_id in gone_early)


def test_masked_payload_is_not_the_update():
    ids = list(range(5))
    tr = SecAggTransport(max_weight=30)
    ctx = ctx_for(0, ids)
    tr.begin_round(ctx, template=TEMPLATE, client_ids=ids)
    zero = ClientUpdate(0, 0, {k: torch.zeros_like(v) for k, v in TEMPLATE.items()}, 5)
    s = tr.encode(zero, ctx=ctx)
    vec = s.payload.vector
    assert vec.dtype == np.uint32
    assert np.count_nonzero(vec) > 0.99 * vec.size  # a zero update is hidden under the masks


def test_scenario_toml_builds_and_per_client_parts_are_refused():
    import tomllib
    from pathlib import Path

    from fedsecure.attacks.base import Attack
    from fedsecure.config import config_from_dict
    from fedsecure.experiment import build_plugins, validate_combination

    tree = tomllib.loads((Path(__file__).parents[1] / "defenses" / "secagg.toml").read_text())
    cfg = config_from_dict(tree)
    transport, aggregator, defenses, _ = build_plugins(cfg)
    assert isinstance(transport, SecAggTransport)
    assert validate_combination(cfg, transport, aggregator, defenses) == []
    for robust in ("krum", "median", "trimmed-mean"):
        cfg = config_from_dict({**tree, "aggregator": {"name": robust}})
        transport, aggregator, defenses, _ = build_plugins(cfg)
        conflicts = validate_combination(cfg, transport, aggregator, defenses)
        assert len(conflicts) == 1 and "secagg" in conflicts[0] and robust in conflicts[0]

    class PerClientAttack(Attack):
        name = "per-client-probe"
        needs = frozenset({View.SERVER_PER_CLIENT})

    reason = PerClientAttack().applicability(
        frozenset(transport.exposes) | {View.RELEASED_MODEL}, transport_name="secagg"
    )
    assert "server_per_client" in reason and "secagg" in reason
