"""End-to-end federations: secure transports reach the plain transport's adapter."""

from __future__ import annotations

import pytest

from fedsecure.experiment import CompatibilityError, Experiment
from fedsecure.models import get_adapter_state


def _final(cfg):
    exp = Experiment(cfg)
    res = exp.run()
    return get_adapter_state(exp.model), res


@pytest.fixture(scope="module")
def plain_run():
    from fedsecure.config import config_from_dict
    from tests.conftest import tiny_tree

    return _final(config_from_dict(tiny_tree(**{"data.num_clients": 3})))


@pytest.mark.parametrize(
    ("transport", "atol"),
    [({"name": "ckks"}, 1e-5), ({"name": "secagg"}, 1e-3)],
    ids=["ckks", "secagg"],
)
def test_secure_transport_matches_plain(tiny_config, plain_run, transport, atol):
    plain_state, _ = plain_run
    state, res = _final(tiny_config(**{"data.num_clients": 3}, transport=transport))
    worst = max(float((state[k] - plain_state[k]).abs().max()) for k in state)
    assert worst <= atol, worst
    assert res.federation["transport"] == transport["name"]
    assert res.cost["transport"], "the transport's cost report is in results.json"
    assert res.cost["bytes_up_per_client_per_round"] > 0


@pytest.mark.parametrize("transport", ["ckks", "secagg"])
def test_robust_aggregator_rejected_with_secure_transport(tiny_config, transport):
    with pytest.raises(CompatibilityError, match="needs per-client updates"):
        Experiment(tiny_config(transport={"name": transport}, aggregator={"name": "median"}))


def test_per_client_attack_not_applicable_under_ckks(tiny_config):
    from fedsecure.attacks.base import Attack
    from fedsecure.types import View

    class PerClient(Attack):
        name = "per-client-probe"
        threat_model = "honest-but-curious server reading each update"
        needs = frozenset({View.SERVER_PER_CLIENT})
        when = "round"

    exp = Experiment(tiny_config(transport={"name": "ckks"}))
    reason = PerClient().applicability(frozenset(exp.transport.exposes), transport_name="ckks")
    assert "server_per_client" in reason and "ckks" in reason


def test_secagg_round_with_too_many_dropouts_aborts_and_run_goes_on(tiny_config):
    """Below the share threshold the round aborts (global adapter kept); later rounds proceed."""
    cfg = tiny_config(**{"data.num_clients": 4, "federation.rounds": 1},
                      transport={"name": "secagg", "max_dropout_fraction": 0.0,
                                 "stage_dropout_rates": {"masked_input": 0.5}})
    res = Experiment(cfg).run()
    r0 = res.rounds[0]
    assert r0["aggregated"] == []
    assert any("round aborted" in x["reason"] for x in r0["rejected"])
    assert res.utility["eval_loss"] == pytest.approx(res.utility["eval_loss_initial"])
