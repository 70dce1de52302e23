"""Secret Sharer canary exposure: candidate sampling, and a memorised vs an unseen canary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsecure.attacks.base import AttackTarget
from fedsecure.attacks.canaries import CanaryExposureAttack, candidate_secrets
from fedsecure.data import Canary

MAX_LEN = 64


def _canary(**kw) -> Canary:
    base = {"canary_id": "c0", "prompt": "What is the code of Ann Lee?", "prefix": "The code of Ann Lee is ",
            "secret": "4821", "alphabet": "0123456789", "length": 4, "repetitions": 1, "client_id": 0}
    base.update(kw)
    return Canary(**base)


def test_candidates_are_distinct_valid_and_exclude_the_secret():
    c = _canary()
    cands = candidate_secrets(c, num_candidates=200, seed=0)
    assert len(cands) == 200 == len(set(cands))
    assert c.secret not in cands
    assert all(len(s) == 4 and set(s) <= set("0123456789") for s in cands)
    assert cands == candidate_secrets(c, num_candidates=200, seed=0)  # deterministic
    assert cands != candidate_secrets(c, num_candidates=200, seed=1)
    # A small randomness space is enumerated exactly: 2**3 - 1 other secrets.
    small = _canary(secret="010", alphabet="01", length=3)
    assert sorted(candidate_secrets(small, num_candidates=100, seed=0)) == [
        "000", "001", "011", "100", "101", "110", "111"]


def test_not_applicable_without_inserted_canaries():
    from fedsecure.models import load_model

    model, tok = load_model("tiny")
    ex = [{"prompt": "a", "response": "b"}]
    target = AttackTarget(model=model, tokenizer=tok, members=ex, nonmembers=ex)
    res = CanaryExposureAttack().run(target)
    assert not res.applicable and "canary_repetitions" in res.reason
    target.canaries = [_canary(repetitions=0, client_id=-1)]
    res = CanaryExposureAttack().run(target)
    assert not res.applicable and "repetitions 0" in res.reason
    with pytest.raises(ValueError, match="num_candidates"):
        CanaryExposureAttack(num_candidates=5)


def test_memorised_canary_has_high_exposure_and_unseen_low():
    """Full fine-tune of the tiny model on 16 records plus 8 copies of each of two canaries; the
    data module's two reference canaries (same format, never inserted) are the control."""
    from fedsecure.data import encode_dataset, make_loader, private_records
    from fedsecure.models import load_model
    from fedsecure.models.loss import per_sequence_loss

    ds = private_records(num_clients=1, examples_per_client=16, num_eval=2, num_nonmembers=8,
                         canary_repetitions=(8,), canaries_per_repetition=2, seed=0)
    inserted = {c.canary_id for c in ds.canaries if c.repetitions == 8}
    reference = {c.canary_id for c in ds.canaries if c.repetitions == 0}
    assert len(inserted) == 2 and len(reference) == 2
    train = list(ds.clients[0])
    assert sum(1 for ex in train if ex.get("canary_id") in inserted) == 16
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    feats = encode_dataset(tok, train, max_length=MAX_LEN)
    loader = make_loader(feats, batch_size=len(feats), seed=0, num_steps=20, pad_token_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for batch in loader:
        loss = per_sequence_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    target = AttackTarget(model=model, tokenizer=tok, members=ds.members(), nonmembers=list(ds.nonmembers),
                          canaries=list(ds.canaries), max_length=MAX_LEN, claimed_epsilon=2.0)
    res = CanaryExposureAttack(num_candidates=63, num_bootstrap=50).run(target)
    assert res.applicable
    rows = res.details["canaries"]
    ins = [c for c in rows if c["canary_id"] in inserted]
    ref = [c for c in rows if c["canary_id"] in reference]
    for c in rows:
        assert c["exposure_rank_max"] == pytest.approx(6.0)  # log2(64)
        assert c["exposure_rank"] == pytest.approx(6.0 - math.log2(c["rank"]))
    for c in ins:  # memorised: the most likely of all 64 secrets, and the fitted tail goes beyond 6 bits
        assert c["rank"] == 1 and c["exposure_skew_normal"] > 6.0, c
        assert c["log_perplexity"] < c["candidates_mean_log_perplexity"]
    for c in ref:  # unseen: an ordinary rank (uniform: 1.44 bits expected)
        assert c["rank"] > 1 and c["exposure_skew_normal"] < 4.0, c
    m = res.metrics
    assert m["exposure_by_repetition"]["8"] > m["exposure_by_repetition"]["0"] + 4.0, m
    assert m["exposure_by_repetition"]["0"] < 3.0, m
    assert m["exposure_rank_by_repetition"]["8"] == pytest.approx(6.0)
    # Membership view: inserted secrets (members) against every candidate and the reference secrets.
    assert m["num_members"] == 2 and m["num_nonmembers"] == 4 * 63 + 2
    assert m["tpr_at_fpr"]["0.0"] == 1.0 and m["auc"] == 1.0
    assert m["epsilon"] == 2.0 and m["epsilon_lower_bound"] >= 0.0
    assert m["blind_baseline_auc"] is None
    assert np.isfinite([c["log_perplexity"] for c in rows]).all()
