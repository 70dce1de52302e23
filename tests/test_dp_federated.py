"""Federated DP: the dp-sgd per-client ledger grows only on participation and equals Opacus'
accountant; dp-fedavg clips, calibrates, accounts and combines with secure aggregation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsecure.defenses.base import TrainingSetup
from fedsecure.defenses.dp import DPConfigError
from fedsecure.models.loss import per_sequence_loss
from fedsecure.registry import AGGREGATORS, DEFENSES, TRANSPORTS
from fedsecure.types import ClientUpdate, RoundContext, RunInfo, l2_norm
from tests._dp_fixtures import PatternDataset, collate, tiny_lora, trainable


def _ctx(rnd: int, sampled: tuple[int, ...], n: int, rounds: int = 3) -> RoundContext:
    return RoundContext(round=rnd, num_rounds=rounds, sampled_clients=sampled, num_clients=n, seed=7)


# --------------------------------------------------------------------------------------
# dp-sgd
# --------------------------------------------------------------------------------------
def _run_client(defense, model, dataset, client_id: int, ctx: RoundContext) -> int:
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate, shuffle=True)
    setup = TrainingSetup(
        model=model,
        optimizer=torch.optim.Adam(trainable(model), lr=1e-2),
        data_loader=loader,
        loss_fn=per_sequence_loss,
    )
    setup = defense.wrap_training(setup, client_id=client_id, ctx=ctx)
    steps = 0
    try:
        for batch in setup.data_loader:
            setup.step_fn(batch)
            steps += 1
    finally:
        for closer in setup.close:
            closer()
    return steps


def test_dp_sgd_ledger_grows_only_on_participation() -> None:
    sizes = {0: 16, 1: 24, 2: 16}
    run = RunInfo(
        num_clients=3,
        num_rounds=3,
        clients_per_round=2,
        client_num_examples=sizes,
        batch_size=4,
        local_steps=2,
        seed=7,
    )
    dp = DEFENSES.get("dp-sgd")(target_epsilon=4.0, accountant="rdp", max_grad_norm=1.0)
    dp.setup(run)
    assert dp.planned_rounds == 3  # worst case: every round
    model = tiny_lora()
    data = {c: PatternDataset(n, seed=c, max_len=10) for c, n in sizes.items()}
    schedule = [(0, 1), (1, 2), (0, 1)]
    ledger = []
    for rnd, sampled in enumerate(schedule):
        for c in sampled:
            assert _run_client(dp, model, data[c], c, _ctx(rnd, sampled, 3)) == run.local_steps
        dp.account(ctx=_ctx(rnd, sampled, 3))
        ledger.append(dict(dp.report()["per_client_epsilon"]))
    # client 2 spends nothing before its first round and nothing after its only round
    assert ledger[0][2] == 0.0 and ledger[1][2] > 0 and ledger[2][2] == ledger[1][2]
    # client 0 does not spend in round 1, where it is not sampled
    assert ledger[1][0] == ledger[0][0] > 0 and ledger[2][0] > ledger[1][0]
    report = dp.report()
    assert report["rounds_trained"] == {0: 2, 1: 3, 2: 1}
    trained_steps = {0: 4, 1: 6, 2: 2}
    for c, steps in trained_steps.items():
        sigma, q = report["noise_multiplier"][c], 4 / sizes[c]
        assert dp.histories[c] == [[sigma, q, steps]]
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert report["per_client_epsilon"][c] == pytest.approx(acc.get_epsilon(delta=report["delta"][c]), rel=1e-9)
    # client 1 trained in all its planned rounds: it meets the target, tightly
    assert 3.9 <= report["per_client_epsilon"][1] <= 4.0
    assert report["clients_over_target"] == []
    assert report["epsilon_sample_level_max"] == max(report["per_client_epsilon"].values())
    # the shared model is clean for the next client: no Opacus attributes left
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    # resume: a fresh defense restored from state_dict reports the same ledger
    again = DEFENSES.get("dp-sgd")(target_epsilon=4.0, accountant="rdp", max_grad_norm=1.0)
    again.setup(run)
    again.load_state_dict(dp.state_dict())
    assert again.report()["per_client_epsilon"] == report["per_client_epsilon"]


def test_dp_sgd_expected_participation_flags_clients_over_target() -> None:
    run = RunInfo(
        num_clients=4,
        num_rounds=4,
        clients_per_round=2,
        client_num_examples={c: 40 for c in range(4)},
        batch_size=8,
        local_steps=3,
        seed=0,
    )
    dp = DEFENSES.get("dp-sgd")(target_epsilon=2.0, accountant="prv", participation="expected")
    dp.setup(run)
    assert dp.planned_rounds == 2
    sigma, q = dp.noise_multipliers[0], 0.2
    dp.histories[0] = [[sigma, q, 2 * 3]]  # as planned
    dp.histories[1] = [[sigma, q, 4 * 3]]  # sampled in every round: twice the plan
    rep = dp.report()
    acc = PRVAccountant()
    acc.history = [(sigma, q, 6)]
    assert rep["per_client_epsilon"][0] == pytest.approx(acc.get_epsilon(delta=rep["delta"][0]), rel=1e-9)
    assert rep["per_client_epsilon"][0] <= 2.0 < rep["per_client_epsilon"][1]
    assert rep["clients_over_target"] == [1]


@pytest.mark.parametrize(
    ("kwargs", "run_kw", "match"),
    [
        ({}, {}, "exactly one of target_epsilon or noise_multiplier"),
        ({"target_epsilon": 0.0}, {}, "target_epsilon must be > 0"),
        ({"target_epsilon": 1.0, "target_delta": 0.05}, {}, "client 0.*1/N"),
        ({"target_epsilon": 1.0}, {"batch_size": 50}, "client 0 has 20 examples, fewer than batch_size"),
        ({"target_epsilon": 1.0, "participation": "often"}, {}, "participation"),
    ],
)
def test_dp_sgd_invalid_parameters(kwargs: dict, run_kw: dict, match: str) -> None:
    base = {
        "num_clients": 2,
        "num_rounds": 2,
        "clients_per_round": 2,
        "client_num_examples": {0: 20, 1: 30},
        "batch_size": 4,
        "local_steps": 2,
        "seed": 0,
    }
    with pytest.raises(DPConfigError, match=match):
        d = DEFENSES.get("dp-sgd")(**kwargs)
        d.setup(RunInfo(**{**base, **run_kw}))


# --------------------------------------------------------------------------------------
# dp-fedavg
# --------------------------------------------------------------------------------------
_TEMPLATE = {"a.lora_A.weight": torch.zeros(8, 64), "a.lora_B.weight": torch.zeros(64, 8)}  # d = 1024


def _run(n: int = 10, m: int = 5, rounds: int = 4, dropout: float = 0.0) -> RunInfo:
    return RunInfo(
        num_clients=n,
        num_rounds=rounds,
        clients_per_round=m,
        client_num_examples={c: 30 + c for c in range(n)},
        batch_size=4,
        local_steps=2,
        seed=3,
        dropout_rate=dropout,
    )


def _update(c: int, scale: float, rnd: int = 0) -> ClientUpdate:
    g = torch.Generator().manual_seed(100 + c)
    delta = {k: scale * torch.randn(v.shape, generator=g) for k, v in _TEMPLATE.items()}
    return ClientUpdate(client_id=c, round=rnd, delta=delta, num_examples=30 + c)


def _flat(d) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in d.values()])


def test_dp_fedavg_clips_each_update_and_weights_uniformly() -> None:
    dp = DEFENSES.get("dp-fedavg")(noise_multiplier=1.0, clip_norm=0.5)
    dp.setup(_run())
    ctx = _ctx(0, (0, 1, 2, 3, 4), 10)
    big, small = _update(0, 1.0), _update(1, 1e-4)
    out_big, out_small = dp.transform_update(big, ctx=ctx), dp.transform_update(small, ctx=ctx)
    assert l2_norm(big.delta) > 0.5 and l2_norm(out_big.delta) == pytest.approx(0.5, rel=1e-6)
    cos = float(torch.nn.functional.cosine_similarity(_flat(big.delta), _flat(out_big.delta), dim=0))
    assert cos == pytest.approx(1.0, abs=1e-6)  # clipping scales, never rotates
    assert torch.allclose(_flat(out_small.delta), _flat(small.delta))
    assert out_big.num_examples == 1 == out_small.num_examples  # FedAvg weights become uniform


def test_dp_fedavg_central_noise_and_fixed_denominator() -> None:
    z, clip, m = 1.7, 0.4, 5
    dp = DEFENSES.get("dp-fedavg")(noise_multiplier=z, clip_norm=clip)
    dp.setup(_run(m=m))
    # 3 of 5 planned updates arrived; their uniform mean is 1.0 everywhere -> estimator = 3/5
    mean = {k: torch.ones_like(v) for k, v in _TEMPLATE.items()}
    noisy = []
    for rnd in range(8):
        out = dp.post_aggregate(mean, ctx=_ctx(rnd, (0, 1, 2, 3, 4), 10, rounds=8), num_updates=3)
        noisy.append(_flat(out) - 0.6)
    noise = torch.cat(noisy)
    n = noise.numel()
    assert abs(float(noise.mean())) < 6 * z * clip / m / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(z * clip / m, rel=6 * math.sqrt(1 / (2 * n)))


def test_dp_fedavg_client_level_epsilon_equals_opacus() -> None:
    run = _run(n=20, m=5, rounds=6)
    dp = DEFENSES.get("dp-fedavg")(target_epsilon=8.0, accountant="rdp", clip_norm=1.0)
    dp.setup(run)
    eps = []
    for rnd in range(run.num_rounds):
        ctx = _ctx(rnd, (0, 1, 2, 3, 4), 20, rounds=6)
        dp.post_aggregate({k: torch.zeros_like(v) for k, v in _TEMPLATE.items()}, ctx=ctx, num_updates=5)
        eps.append(dp.account(ctx=ctx)["epsilon_client_level"])
    acc = RDPAccountant()
    for _ in range(run.num_rounds):
        acc.step(noise_multiplier=dp.noise_multiplier, sample_rate=5 / 20)
    assert eps[-1] == pytest.approx(acc.get_epsilon(delta=dp.delta), rel=1e-9)
    assert all(a < b for a, b in itertools.pairwise(eps))  # reported every round, growing
    assert 7.8 <= eps[-1] <= 8.0
    assert dp.delta < 1 / 20


def test_dp_fedavg_distributed_noise_through_secure_aggregation() -> None:
    """Each client adds N(0, z²C²/n) before SecAgg; the server sees only the masked sum, whose
    noise matches the central mechanism; a round with dropouts is accounted at its real noise."""
    z, clip, n_clients, m = 1.2, 0.3, 6, 6
    run = _run(n=n_clients, m=m, rounds=2)
    dp = DEFENSES.get("dp-fedavg")(noise_multiplier=z, clip_norm=clip, mode="distributed", accountant="rdp")
    dp.setup(run)
    assert dp.honest_shares == m
    transport = TRANSPORTS.get("secagg")(clip_range=4.0)
    plain = TRANSPORTS.get("plain")()
    fedavg = AGGREGATORS.get("fedavg")()
    assert dp.conflicts(transport=transport, aggregator=fedavg, config=None) == []
    assert "secagg" in dp.conflicts(transport=plain, aggregator=fedavg, config=None)[0]
    transport.setup(run)
    clients = tuple(range(m))
    ctx = _ctx(0, clients, n_clients, rounds=2)
    transport.begin_round(ctx, template=_TEMPLATE, client_ids=clients)
    raw = [_update(c, 1.0) for c in clients]
    sent = [dp.transform_update(u, ctx=ctx) for u in raw]
    clipped_sum = sum(_flat(u.delta) * min(1.0, clip / l2_norm(u.delta)) for u in raw)
    # each share alone is large: a single update reveals little
    share = _flat(sent[0].delta) - _flat(raw[0].delta) * min(1.0, clip / l2_norm(raw[0].delta))
    assert float(share.std()) == pytest.approx(z * clip / math.sqrt(m), rel=0.15)
    sealed = [transport.encode(u, ctx=ctx) for u in sent]
    assert all(s.plaintext is None for s in sealed)  # the server never sees an individual update
    combined = transport.combine(sealed, ctx=ctx, dropped=())
    mean = fedavg.from_sum(transport.open(combined, ctx=ctx), total_weight=combined.total_weight)
    out = dp.post_aggregate(mean, ctx=ctx, num_updates=m)
    noise = _flat(out) - clipped_sum / m
    d = noise.numel()
    assert float(noise.std()) == pytest.approx(z * clip / m, rel=6 * math.sqrt(1 / (2 * d)) + 0.02)
    assert dp.history[-1] == [z, 1.0, 1]
    # round 1: two clients drop out after adding their shares -> only 4 honest shares in the sum
    out = dp.post_aggregate(mean, ctx=_ctx(1, clients, n_clients, rounds=2), num_updates=4)
    assert dp.history[-1][0] == pytest.approx(z * math.sqrt(4 / 6))
    assert dp.report()["adjacency"] == "zero-out"


def test_dp_fedavg_distributed_secure_mode_uses_exact_discrete_gaussian() -> None:
    z, clip, m = 1.0, 0.25, 4
    dp = DEFENSES.get("dp-fedavg")(noise_multiplier=z, clip_norm=clip, mode="distributed", secure_mode=True)
    dp.setup(_run(n=8, m=m))
    ctx = _ctx(0, (0, 1, 2, 3), 8)
    u = _update(0, 1.0)
    out = _flat(dp.transform_update(u, ctx=ctx).delta)
    from fedsecure.defenses.central_dp import make_grid

    grid = make_grid(sensitivity=clip, dim=1024, noise_multiplier=z, rounding=0.5, shares=m)
    steps = out / grid.step
    assert torch.allclose(steps, steps.round(), atol=1e-6)  # on the power-of-two grid
    share = out - _flat(u.delta) * (clip / l2_norm(u.delta))
    target = z * clip / math.sqrt(m)
    assert grid.variance * grid.step**2 >= target**2  # never less noise than calibrated
    assert float(share.std()) == pytest.approx(target, rel=0.15)


def test_dp_fedavg_adaptive_clipping_tracks_the_quantile() -> None:
    m = 20
    dp = DEFENSES.get("dp-fedavg")(
        noise_multiplier=0.5, clip_norm=0.05, adaptive_clipping=True, target_quantile=0.5, clip_learning_rate=0.3
    )
    run = _run(n=40, m=m, rounds=40)
    dp.setup(run)
    assert dp.count_stddev == m / 20
    z = dp.noise_multiplier
    assert dp.update_noise_multiplier == pytest.approx((z**-2 - (2 * dp.count_stddev) ** -2) ** -0.5)
    g = torch.Generator().manual_seed(0)
    for rnd in range(run.num_rounds):
        ctx = _ctx(rnd, tuple(range(m)), 40, rounds=40)
        for c in range(m):  # update norms ~ uniform on [0.5, 1.5]: median 1.0
            norm = 0.5 + float(torch.rand(1, generator=g))
            vec = torch.randn(1024, generator=g)
            vec = vec / vec.norm() * norm
            upd = ClientUpdate(
                client_id=c,
                round=rnd,
                num_examples=5,
                delta=dict(zip(_TEMPLATE, (vec[:512].view(8, 64), vec[512:].view(64, 8)), strict=True)),
            )
            dp.transform_update(upd, ctx=ctx)
        dp.post_aggregate({k: torch.zeros_like(v) for k, v in _TEMPLATE.items()}, ctx=ctx, num_updates=m)
    assert dp.clip_history[0] == 0.05
    assert 0.75 < dp.current_clip < 1.3  # moved from 0.05 to about the median norm 1.0
    assert len(dp.history) == 40 and dp.history[0][0] == pytest.approx(z)


@pytest.mark.parametrize(
    ("kwargs", "run_kw", "match"),
    [
        ({}, {}, "exactly one"),
        ({"noise_multiplier": 1.0, "target_delta": 0.2}, {}, "clients"),
        ({"noise_multiplier": 1.0, "mode": "distributed", "adaptive_clipping": True}, {}, "adaptive_clipping"),
        ({"noise_multiplier": 1.0, "mode": "local"}, {}, "mode"),
        ({"noise_multiplier": 1.0, "clip_norm": 0.0}, {}, "clip_norm"),
        ({"noise_multiplier": 4.0, "adaptive_clipping": True, "clipped_count_stddev": 1.0}, {}, "clipped_count"),
        ({"noise_multiplier": 1.0, "mode": "distributed", "colluding_clients": 5}, {}, "no honest noise share"),
    ],
)
def test_dp_fedavg_invalid_parameters(kwargs: dict, run_kw: dict, match: str) -> None:
    with pytest.raises(DPConfigError, match=match):
        d = DEFENSES.get("dp-fedavg")(**kwargs)
        d.setup(_run(**run_kw))


def test_dp_fedavg_requires_fedavg_aggregation() -> None:
    dp = DEFENSES.get("dp-fedavg")(noise_multiplier=1.0)

    class Median:
        name = "median"

    msgs = dp.conflicts(transport=TRANSPORTS.get("plain")(), aggregator=Median(), config=None)
    assert len(msgs) == 1 and "fedavg" in msgs[0]
    assert dp.conflicts(transport=TRANSPORTS.get("plain")(), aggregator=AGGREGATORS.get("fedavg")(), config=None) == []
