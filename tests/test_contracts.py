"""One contract suite parametrised over every registered transport, aggregator, defense and attack."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from fedsecure.attacks.base import Attack
from fedsecure.defenses.base import Defense
from fedsecure.federation.transport import Transport
from fedsecure.registry import AGGREGATORS, ATTACKS, DEFENSES, TRANSPORTS
from fedsecure.types import ClientUpdate, RoundContext, RunInfo, View, adapter_hash


def _default_constructible(cls):
    sig = inspect.signature(cls)
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
               for p in sig.parameters.values())


def _kw_only(cls):
    sig = inspect.signature(cls)
    return all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in sig.parameters.values())


@pytest.mark.parametrize("name", TRANSPORTS.names())
def test_transport_sums_like_plain(name):
    """Oracle: open(combine(encode(...))) equals the example-weighted plain sum."""
    cls = TRANSPORTS.get(name)
    assert issubclass(cls, Transport) and cls.name == name and cls.exposes
    assert _kw_only(cls), f"{name}: constructor arguments must be keyword-only"
    if not _default_constructible(cls):
        pytest.skip(f"{name} needs arguments")
    t = cls()
    g = torch.Generator().manual_seed(0)
    template = {"a.lora_A.weight": torch.zeros(4, 16), "a.lora_B.weight": torch.zeros(16, 4)}
    clients = (0, 1, 2)
    run = RunInfo(num_clients=3, num_rounds=1, clients_per_round=3, client_num_examples={0: 5, 1: 7, 2: 11},
                  batch_size=4, local_steps=1, seed=0, num_parameters=128)
    t.setup(run)
    ctx = RoundContext(round=0, num_rounds=1, sampled_clients=clients, num_clients=3, seed=0,
                       global_hash=adapter_hash(template))
    t.begin_round(ctx, template=template, client_ids=clients)
    updates = [
        ClientUpdate(client_id=c, round=0, num_examples=run.client_num_examples[c],
                     delta={k: 0.01 * torch.randn(v.shape, generator=g) for k, v in template.items()})
        for c in clients
    ]
    sealed = [t.encode(u, ctx=ctx) for u in updates]
    assert all(s.nbytes > 0 for s in sealed)
    if not t.exposes & {View.SERVER_PER_CLIENT, View.SERVER_PER_CLIENT_PARTIAL}:
        assert all(s.plaintext is None for s in sealed), f"{name} leaks per-client plaintext to the server"
    combined = t.combine(sealed, ctx=ctx, dropped=())
    opened = t.open(combined, ctx=ctx)
    for k in template:
        expected = sum(u.delta[k] * u.num_examples for u in updates)
        assert torch.allclose(opened[k], expected, atol=1e-3), (name, k, float((opened[k] - expected).abs().max()))
    assert combined.total_weight == pytest.approx(23)
    json.dumps(t.cost_report(), default=str)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_aggregator_contract(name):
    cls = AGGREGATORS.get(name)
    assert cls.name == name and _kw_only(cls) and _default_constructible(cls)
    agg = cls()
    ups = [ClientUpdate(client_id=i, round=0, delta={"w": torch.full((3,), float(i))}, num_examples=1)
           for i in range(5)]
    out = agg.aggregate(ups)
    assert out["w"].shape == (3,) and torch.isfinite(out["w"]).all()
    assert float(out["w"].min()) >= 0 and float(out["w"].max()) <= 4


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_contract(name):
    cls = DEFENSES.get(name)
    assert issubclass(cls, Defense) and cls.name == name
    assert _kw_only(cls), f"{name}: constructor arguments must be keyword-only"
    assert (cls.__doc__ or "").strip(), f"{name} needs a docstring"
    if _default_constructible(cls):
        try:
            d = cls()
        except ValueError as err:  # a defense whose parameters have no safe default must say which
            assert any(w in str(err) for w in ("set", "must", "needs", "required")), err
            return
        json.dumps(d.state_dict(), default=str)
        assert isinstance(d.conflicts(transport=TRANSPORTS.get("plain")(), aggregator=AGGREGATORS.get("fedavg")(),
                                      config=None), list)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_contract(name):
    cls = ATTACKS.get(name)
    assert issubclass(cls, Attack) and cls.name == name
    assert _kw_only(cls), f"{name}: constructor arguments must be keyword-only"
    assert cls.threat_model.strip(), f"{name} must state its threat model"
    assert cls.needs and all(isinstance(v, View) for v in cls.needs)
    assert cls.when in ("round", "final")
    if _default_constructible(cls):
        a = cls()
        reason = a.applicability(frozenset(), transport_name="x")
        assert reason and "needs" in reason
        assert a.applicability(frozenset(View), transport_name="plain") == ""
