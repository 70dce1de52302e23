"""Released-model membership attacks: scoring oracles, hand-computed scores, an overfit model.

The overfit target is the tiny model fully fine-tuned on 32 records for 12 steps (full
batch): its LOSS AUC against 32 held-out records of the same distribution must be >= 0.9.
(The tiny model's LoRA cannot overfit in a few seconds: its tied, frozen output embedding
caps the logits near uniform, so the LoRA-specific tests live in test_membership_reference.py.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib

import numpy as np
import pytest
import torch

from fedsecure.attacks.base import AttackTarget
from fedsecure.attacks.membership import (
    LiraAttack,
    LossAttack,
    MinKAttack,
    MinKPlusPlusAttack,
    RmiaAttack,
    ZlibAttack,
    lira_offline_scores,
    rmia_scores,
)
from fedsecure.attacks.scoring import (
    CACHE_KEY,
    TokenStats,
    compute_token_stats,
    encode_examples,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    zlib_score,
)
from fedsecure.registry import ATTACKS

MAX_LEN = 48


def _train_full(model, tok, examples, *, steps: int, lr: float, max_length: int = MAX_LEN) -> None:
    from fedsecure.data import encode_dataset, make_loader
    from fedsecure.models.loss import per_sequence_loss

    feats = encode_dataset(tok, examples, max_length=max_length)
    loader = make_loader(feats, batch_size=len(feats), seed=0, num_steps=steps, pad_token_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for batch in loader:
        loss = per_sequence_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def overfit():
    from fedsecure.data import private_records
    from fedsecure.models import load_model

    ds = private_records(num_clients=1, examples_per_client=32, num_eval=4, num_nonmembers=32,
                         canary_repetitions=(), seed=0)
    members = ds.members()[:32]
    nonmembers = list(ds.nonmembers[:32])
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    _train_full(model, tok, members, steps=12, lr=2e-2)
    return model, tok, members, nonmembers


def _target(overfit, **kw) -> AttackTarget:
    model, tok, members, nonmembers = overfit
    return AttackTarget(model=model, tokenizer=tok, members=members, nonmembers=nonmembers, max_length=MAX_LEN, **kw)


@pytest.fixture(scope="module")
def shared_target(overfit):
    """One target whose score cache (in ``extra``) the tests share; ``dataclasses.replace`` keeps it."""
    return _target(overfit)


def test_loss_auc_on_overfit_model(shared_target):
    res = LossAttack(num_bootstrap=200).run(shared_target)
    m = res.metrics
    assert res.applicable and res.name == "loss"
    assert m["auc"] >= 0.9, m
    lo, hi = m["auc_ci"]
    assert lo <= m["auc"] <= hi and 0.0 <= lo and hi <= 1.0
    assert set(m["tpr_at_fpr"]) == {"0.01", "0.001", "0.0"}
    assert all(0.0 <= v <= 1.0 for v in m["tpr_at_fpr"].values())
    assert m["num_members"] == 32 and m["num_nonmembers"] == 32
    assert 0.0 <= m["blind_baseline_auc"] <= 1.0
    assert "epsilon" not in m  # no DP defense ran
    json.dumps(res.to_dict())
    # Higher = member: members' scores are minus their mean NLL, so larger on average.
    assert np.mean(res.details["scores_members"]) > np.mean(res.details["scores_nonmembers"])


def test_token_attacks_share_one_forward_pass(overfit):
    model = overfit[0]
    target = _target(overfit)
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        results = {cls.name: cls(num_bootstrap=50).run(target)
                   for cls in (LossAttack, ZlibAttack, MinKAttack, MinKPlusPlusAttack)}
    finally:
        handle.remove()
    assert len(calls) == 2 * math.ceil(32 / 8)  # members + non-members, batch 8, once for all four attacks
    assert len(target.extra[CACHE_KEY]) == 2
    for name, res in results.items():
        assert res.metrics["auc"] > 0.7, (name, res.metrics["auc"])
    # Min-K% (the rarest tokens: names, numbers) separates this overfit model best.
    assert results["min-k"].metrics["auc"] >= 0.93


def test_stats_match_per_sequence_loss_and_softmax(overfit):
    """Oracle: mean log-prob == -per_sequence_loss; mu/sigma == moments of the full softmax."""
    from fedsecure.data import collate
    from fedsecure.models.loss import per_sequence_loss

    model, tok, members, nonmembers = overfit
    examples = [members[0], nonmembers[1], members[2]]
    stats = compute_token_stats(model, tok, examples, max_length=MAX_LEN, batch_size=2)
    feats = encode_examples(tok, examples, max_length=MAX_LEN)
    batch = collate(feats, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        losses = per_sequence_loss(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, s in enumerate(stats):
        n_sup = sum(1 for x in feats[i]["labels"][1:] if x != -100)
        assert s.num_tokens == n_sup
        assert s.mean_logprob == pytest.approx(-float(losses[i]), abs=1e-5)
    # First supervised token of example 0, by hand from the full logits.
    labels = batch["labels"][0, 1:]
    p = int((labels != -100).nonzero()[0])
    logp = torch.log_softmax(full[0, p].double(), -1)
    mu = float((logp.exp() * logp).sum())
    sd = math.sqrt(float((logp.exp() * (logp - mu) ** 2).sum()))
    assert stats[0].logprobs[0] == pytest.approx(float(logp[labels[p]]), abs=1e-4)
    assert stats[0].mean_logprobs[0] == pytest.approx(mu, abs=1e-4)
    assert stats[0].std_logprobs[0] == pytest.approx(sd, abs=1e-3)


def test_hand_computed_scores():
    s = TokenStats(
        logprobs=np.array([-1.0, -5.0, -2.0, -3.0, -4.0]),
        mean_logprobs=np.array([-1.0, -1.0, -2.0, -1.0, -2.0]),
        std_logprobs=np.array([1.0, 2.0, 0.5, 1.0, 0.0]),
    )
    assert loss_score(s) == pytest.approx(-3.0)
    assert min_k_score(s, k_percent=40) == pytest.approx(-4.5)  # ceil(2.0) = 2 lowest: -5, -4
    assert min_k_score(s, k_percent=1) == pytest.approx(-5.0)  # at least one token
    assert min_k_score(s, k_percent=100) == pytest.approx(-3.0)
    # z = (logp - mu) / max(sigma, 1e-6) = [0, -2, 0, -2, -2e6]; lowest 40% -> 2 tokens: -2e6, -2
    assert min_k_plus_plus_score(s, k_percent=40) == pytest.approx((-2e6 - 2.0) / 2)
    text = "Jane Roe, MRN-1234-5678"
    assert zlib_score(s, text) == pytest.approx(-3.0 / len(zlib.compress(text.encode())))
    with pytest.raises(ValueError, match="k_percent"):
        min_k_score(s, k_percent=0)


def test_rmia_and_lira_formulas_by_hand():
    # Two references, three candidates, four z samples (log-probs per token).
    t = np.log(np.array([0.5, 0.2, 0.1]))
    r = np.log(np.array([[0.2, 0.2, 0.1], [0.2, 0.2, 0.1]]))
    tz = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    rz = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    a = 0.5
    # p(x) = ((1 + a) p_out + (1 - a)) / 2; ratio = p(x|theta) / p(x)
    px = 0.5 * (1.5 * np.array([0.2, 0.2, 0.1]) + 0.5)
    pz = 0.5 * (1.5 * np.array([0.1, 0.2, 0.3, 0.4]) + 0.5)
    rx_ = np.array([0.5, 0.2, 0.1]) / px
    rz_ = np.array([0.1, 0.2, 0.3, 0.4]) / pz
    expected = [(rx_[i] / rz_ > 1.0).mean() for i in range(3)]
    got = rmia_scores(target_logprobs=t, reference_logprobs=r, target_logprobs_z=tz, reference_logprobs_z=rz,
                      offline_a=a)
    np.testing.assert_allclose(got, expected)
    assert got[0] == 1.0 and got[2] < got[1]
    # gamma = 2: only z whose ratio is below half of x's count
    got2 = rmia_scores(target_logprobs=t, reference_logprobs=r, target_logprobs_z=tz, reference_logprobs_z=rz,
                       offline_a=a, gamma=2.0)
    np.testing.assert_allclose(got2, [(rx_[i] / rz_ > 2.0).mean() for i in range(3)])
    # LiRA: pooled deviation of the references around their per-candidate mean
    refs = np.array([[-2.0, -2.0, -3.0], [-2.2, -1.8, -3.4]])
    z, sigma = lira_offline_scores(target_logprobs=np.array([-1.0, -2.0, -3.0]), reference_logprobs=refs)
    mean = refs.mean(axis=0)
    pooled = math.sqrt(((refs - mean) ** 2).sum() / (1 * 3))
    assert sigma == pytest.approx(pooled)
    np.testing.assert_allclose(z, (np.array([-1.0, -2.0, -3.0]) - mean) / pooled)


def test_claimed_epsilon_reports_empirical_lower_bound(shared_target):
    target = dataclasses.replace(shared_target, claimed_epsilon=8.0)
    target.extra["delta"] = 1e-5
    m = MinKAttack(num_bootstrap=50).run(target).metrics
    assert m["epsilon"] == 8.0 and m["delta"] == 1e-5
    # Perfect separation of the 16 + 16 held-out half would give the largest bound this sample
    # size allows: Clopper-Pearson (97.5%) caps both error rates at 1 - 0.025 ** (1 / 16) = 0.206,
    # so eps >= log(0.794 / 0.206) = 1.35; an AUC of ~0.95 gets a clearly positive bound.
    assert m["auc"] >= 0.93
    assert 0.5 < m["epsilon_lower_bound"] <= 1.35 + 1e-9, m


def test_reference_attacks_not_applicable_without_population(overfit):
    for cls in (RmiaAttack, LiraAttack):
        res = cls().run(_target(overfit))
        assert not res.applicable and "population" in res.reason


def test_registry_and_validation(overfit):
    names = set(ATTACKS.names())
    assert {"loss", "zlib", "min-k", "min-k++", "reference-base", "gradnorm", "rmia", "lira",
            "canary-exposure", "client-membership"} <= names
    with pytest.raises(ValueError, match="k_percent"):
        MinKAttack(k_percent=0)
    with pytest.raises(ValueError, match="batch_size"):
        LossAttack(batch_size=0)
    with pytest.raises(ValueError, match="reference_steps"):
        RmiaAttack(reference_steps=0)
    with pytest.raises(ValueError, match="offline_a"):
        RmiaAttack(offline_a=1.5)
    model, tok, members, _ = overfit
    with pytest.raises(ValueError, match="non-member"):
        LossAttack().run(AttackTarget(model=model, tokenizer=tok, members=members, nonmembers=[]))
    with pytest.raises(ValueError, match="prompt"):
        LossAttack().run(AttackTarget(model=model, tokenizer=tok, members=[{"text": "x"}], nonmembers=members[:1]))


def test_target_delta_accepts_per_client_mappings(overfit):
    from fedsecure.attacks.membership import target_delta

    assert target_delta(_target(overfit)) == 1e-5
    assert target_delta(_target(overfit, extra={"delta": 3e-6})) == 3e-6
    # DP-SGD reports one delta per client: the largest keeps the lower bound valid for all.
    assert target_delta(_target(overfit, extra={"delta": {0: 1e-6, 1: 4e-6}})) == 4e-6
