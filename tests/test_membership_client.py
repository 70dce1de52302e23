"""Server-side client-level membership: gradient alignment with per-client updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsecure.attacks.base import RoundObservation
from fedsecure.attacks.client_membership import ClientMembershipAttack, update_alignment_scores
from fedsecure.types import ClientUpdate, RoundContext, View

MAX_LEN = 48


@pytest.fixture(scope="module")
def plain_round():
    """AdamW (the project's default client optimizer), 3 local steps of batch 4."""
    return make_plain_round(local_steps=3, lr=5e-3, optimizer="adamw", batch_size=4)


def make_plain_round(*, local_steps: int = 1, lr: float = 0.1, optimizer: str = "sgd", batch_size: int = 12):
    """One plain FedAvg round on the tiny model: two clients, each ``local_steps`` optimizer steps
    on batches of its 12 records from a shared global LoRA adapter."""
    from fedsecure.data import encode_dataset, make_loader, private_records
    from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, set_adapter_state
    from fedsecure.models.loss import per_sequence_loss

    # iid: members and non-members of one distribution (no site shift a text classifier could use)
    ds = private_records(num_clients=2, examples_per_client=12, num_eval=2, num_nonmembers=24,
                         canary_repetitions=(), partition="iid", seed=0)
    base, tok = load_model("tiny")
    model = attach_lora(base, LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    # A global adapter after some rounds: B is no longer zero.
    global_state = {k: v + (0.05 * torch.randn(v.shape, generator=g) if "lora_B" in k else 0)
                    for k, v in get_adapter_state(model).items()}
    updates = []
    for c in range(2):
        set_adapter_state(model, global_state)
        feats = encode_dataset(tok, list(ds.clients[c]), max_length=MAX_LEN)
        loader = make_loader(feats, batch_size=batch_size, seed=c, num_steps=local_steps,
                             pad_token_id=tok.pad_token_id)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
        for batch in loader:
            loss = per_sequence_loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = get_adapter_state(model)
        updates.append(ClientUpdate(client_id=c, round=0, num_examples=len(feats),
                                    delta={k: trained[k] - global_state[k] for k in global_state}))
    set_adapter_state(model, {k: torch.zeros_like(v) for k, v in global_state.items()})  # "current" state
    return model, tok, ds, global_state, updates


def _obs(plain_round, views, updates=None) -> RoundObservation:
    model, tok, ds, global_state, ups = plain_round
    ctx = RoundContext(round=0, num_rounds=1, sampled_clients=(0, 1), num_clients=2, seed=0)
    return RoundObservation(ctx=ctx, views=frozenset(views), global_before=global_state, aggregate={},
                            updates=ups if updates is None else updates, model=model, tokenizer=tok,
                            ground_truth={c: list(ds.clients[c]) for c in range(2)})


def test_client_level_auc_high_on_plain_updates(plain_round):
    from fedsecure.models import get_adapter_state

    model, _, ds, _, _ = plain_round
    attack = ClientMembershipAttack(records_per_client=12, max_length=MAX_LEN, num_bootstrap=200)
    attack.setup(dataset=ds)  # non-member candidates from the dataset's held-out records
    assert len(attack.candidates_nonmembers) == 24
    before = get_adapter_state(model)
    attack.observe_round(_obs(plain_round, {View.SERVER_PER_CLIENT, View.SERVER_AGGREGATE}))
    after = get_adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared model is restored
    res = attack.finish()
    assert res.applicable, res.reason
    m = res.metrics
    assert m["auc"] >= 0.9, m
    assert m["blind_baseline_auc"] < 0.8, m  # the text alone does not explain the attack's success
    assert m["num_members"] == 24 and m["num_nonmembers"] == 24
    assert set(m["tpr_at_fpr"]) == {"0.01", "0.001", "0.0"}
    assert m["rounds_attacked"] == [0]
    assert {d["client_id"] for d in res.details["per_client"]} == {0, 1}
    # The plain cosine test is far weaker on the same updates (12 records per update).
    cos = ClientMembershipAttack(records_per_client=12, max_length=MAX_LEN, num_bootstrap=50, method="cosine")
    cos.setup(dataset=ds)
    cos.observe_round(_obs(plain_round, {View.SERVER_PER_CLIENT}))
    assert cos.finish().metrics["auc"] < m["auc"]


def test_decomposition_recovers_sgd_members_exactly():
    """With plain SGD the update is a non-negative combination of member gradients (drifting
    slightly over 3 steps): the decomposition puts (almost) all weight on the members."""
    pr = make_plain_round(local_steps=3, lr=0.1, optimizer="sgd", batch_size=4)
    attack = ClientMembershipAttack(records_per_client=12, max_length=MAX_LEN, num_bootstrap=50,
                                    precondition="none")
    attack.setup(dataset=pr[2])
    attack.observe_round(_obs(pr, {View.SERVER_PER_CLIENT}))
    res = attack.finish()
    assert res.metrics["auc"] >= 0.97, res.metrics
    members = np.array(res.details["scores_members"])
    assert members.sum() > 0.9 * 2  # two updates, each share sums to 1


def test_alignment_score_is_cosine_with_minus_update(plain_round):
    from fedsecure.attacks.scoring import iter_adapter_gradients
    from fedsecure.models import get_adapter_state, set_adapter_state

    model, tok, ds, global_state, updates = plain_round
    saved = get_adapter_state(model)
    set_adapter_state(model, global_state)
    try:
        ex = [ds.clients[0][0], ds.nonmembers[0]]
        raw = update_alignment_scores(model, tok, ex, delta=updates[0].delta, max_length=MAX_LEN, center=False)
        centered = update_alignment_scores(model, tok, ex, delta=updates[0].delta, max_length=MAX_LEN)
        grads = list(iter_adapter_gradients(model, tok, ex, max_length=MAX_LEN))
    finally:
        set_adapter_state(model, saved)
    d = -torch.cat([updates[0].delta[k].reshape(-1) for k in global_state])
    expected = [float(torch.nn.functional.cosine_similarity(gr, d, dim=0)) for gr in grads]
    np.testing.assert_allclose(raw, expected, atol=1e-5)
    mean = (grads[0] + grads[1]) / 2
    expected_c = [float(torch.nn.functional.cosine_similarity(gr - mean, d, dim=0)) for gr in grads]
    np.testing.assert_allclose(centered, expected_c, atol=1e-5)
    assert -1.0 <= raw.min() and raw.max() <= 1.0


def test_not_applicable_under_secure_aggregation(plain_round):
    attack = ClientMembershipAttack(records_per_client=4, max_length=MAX_LEN)
    # Under secagg/ckks the server sees only the aggregate and receives no per-client updates.
    attack.observe_round(_obs(plain_round, {View.SERVER_AGGREGATE}, updates=()))
    res = attack.finish()
    assert not res.applicable
    assert "server_per_client" in res.reason and "server_aggregate" in res.reason
    assert attack.applicability(frozenset({View.SERVER_AGGREGATE, View.RELEASED_MODEL}), transport_name="secagg")


def test_validation():
    with pytest.raises(ValueError, match="records_per_client"):
        ClientMembershipAttack(records_per_client=0)
    with pytest.raises(ValueError, match="max_rounds"):
        ClientMembershipAttack(max_rounds=0)
    with pytest.raises(ValueError, match="method"):
        ClientMembershipAttack(method="magic")
    with pytest.raises(ValueError, match="precondition"):
        ClientMembershipAttack(precondition="adam")
    assert ClientMembershipAttack.when == "round"
    assert ClientMembershipAttack.needs == frozenset({View.SERVER_PER_CLIENT})


@pytest.mark.parametrize("transport", ["plain", "secagg"])
def test_through_the_experiment(tiny_config, transport):
    """End to end through the Experiment: a real plain run's per-client updates are attacked;
    under secagg the result says why it cannot be."""
    from fedsecure.experiment import Experiment

    cfg = tiny_config(**{"transport": {"name": transport}, "data.num_clients": 3, "data.partition": "iid",
                         "data.num_nonmembers": 24, "federation.rounds": 1,
                         "attacks": [{"name": "client-membership", "records_per_client": 8}]})
    res = Experiment(cfg).run()
    (entry,) = [a for a in res.attacks if a["name"] == "client-membership"]
    if transport == "secagg":
        assert entry["applicable"] is False
        assert "server_per_client" in entry["reason"] and "secagg" in entry["reason"]
        return
    assert entry["applicable"], entry["reason"]
    m = entry["metrics"]
    assert m["num_members"] == m["num_nonmembers"] == 3 * 8
    assert m["auc"] >= 0.8, m
    assert m["blind_baseline_auc"] < 0.8, m
