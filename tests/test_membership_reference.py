"""Reference-based attacks on LoRA targets: base-model reference, RMIA/LiRA adapters, GradNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsecure.attacks import membership
from fedsecure.attacks.base import AttackTarget
from fedsecure.attacks.membership import (
    GradNormAttack,
    LiraAttack,
    LossAttack,
    MinKPlusPlusAttack,
    ReferenceBaseAttack,
    RmiaAttack,
)
from fedsecure.attacks.scoring import ScoringError, compute_token_stats
from fedsecure.types import adapter_hash

MAX_LEN = 40


@pytest.fixture(scope="module")
def records():
    from fedsecure.data import private_records

    ds = private_records(num_clients=1, examples_per_client=8, num_eval=4, num_nonmembers=16,
                         canary_repetitions=(), seed=1)
    return ds.members()[:8], list(ds.nonmembers[:8]), list(ds.nonmembers[8:16])


@pytest.fixture(scope="module")
def lora_model():
    """The tiny model with a LoRA adapter whose B matrices are non-zero (it changes the model)."""
    from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, set_adapter_state

    base, tok = load_model("tiny")
    model = attach_lora(base, LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(3)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    model.eval()
    return model, tok


def _target(lora_model, records, **kw) -> AttackTarget:
    model, tok = lora_model
    members, nonmembers, population = records
    return AttackTarget(model=model, tokenizer=tok, members=members, nonmembers=nonmembers,
                        population=population, max_length=MAX_LEN, **kw)


def test_reference_base_is_target_minus_separately_loaded_base(lora_model, records):
    from fedsecure.models import load_model

    target = _target(lora_model, records)
    res = ReferenceBaseAttack(num_bootstrap=50).run(target)
    assert res.applicable
    base, tok = load_model("tiny")  # same seed -> the same weights as the peft model's base
    members = records[0]
    fine = compute_token_stats(lora_model[0], tok, members, max_length=MAX_LEN)
    ref = compute_token_stats(base, tok, members, max_length=MAX_LEN)
    expected = [f.mean_logprob - r.mean_logprob for f, r in zip(fine, ref, strict=True)]
    np.testing.assert_allclose(res.details["scores_members"], expected, atol=1e-5)
    assert max(abs(x) for x in expected) > 1e-4  # the adapter does change the model
    # LOSS on the same target reuses the cached target statistics (different scores, same pass).
    loss = LossAttack(num_bootstrap=50).run(target)
    np.testing.assert_allclose(loss.details["scores_members"], [f.mean_logprob for f in fine], atol=1e-6)


def test_reference_base_needs_a_peft_model(records):
    from fedsecure.models import load_model

    base, tok = load_model("tiny")
    target = AttackTarget(model=base, tokenizer=tok, members=records[0], nonmembers=records[1], max_length=MAX_LEN)
    with pytest.raises(ScoringError, match="peft"):
        ReferenceBaseAttack().run(target)


def test_rmia_and_lira_share_reference_adapters_and_restore_the_target(lora_model, records, monkeypatch):
    from fedsecure.models import get_adapter_state

    calls = []
    real = membership._train_adapter

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(membership, "_train_adapter", counting)
    target = _target(lora_model, records)
    before = adapter_hash(get_adapter_state(lora_model[0]))
    kw = {"num_reference_adapters": 2, "reference_steps": 2, "reference_batch_size": 4, "num_bootstrap": 50}
    rmia = RmiaAttack(**kw).run(target)
    lira = LiraAttack(**kw).run(target)
    assert adapter_hash(get_adapter_state(lora_model[0])) == before  # released adapter restored exactly
    assert len(calls) == 2 and len(set(calls)) == 2  # two references, trained once for both attacks
    for res in (rmia, lira):
        assert res.applicable, res.reason
        assert set(res.metrics["tpr_at_fpr"]) == {"0.01", "0.001", "0.0"}
        assert res.details["num_reference_adapters"] == 2
    scores = np.array(rmia.details["scores_members"] + rmia.details["scores_nonmembers"])
    assert ((0 <= scores) & (scores <= 1)).all()
    assert rmia.details["num_population_z"] == 4  # half of the 8 population records
    # The reference adapters differ from the target (trained from a fresh init on other data).
    (matrix,) = [v for v in target.extra[membership.REFERENCE_KEY].values()]
    fine = compute_token_stats(lora_model[0], lora_model[1], records[0], max_length=MAX_LEN)
    assert not np.allclose(matrix[0, :8], [f.mean_logprob for f in fine])


def test_gradnorm_is_minus_the_adapter_gradient_norm(lora_model, records):
    from fedsecure.data import collate
    from fedsecure.models.loss import per_sequence_loss

    model, tok = lora_model
    target = _target(lora_model, records)
    res = GradNormAttack(num_bootstrap=50).run(target)
    ex = records[0][0]
    from fedsecure.attacks.scoring import encode_examples

    batch = collate(encode_examples(tok, [ex], max_length=MAX_LEN), pad_token_id=tok.pad_token_id)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    loss = per_sequence_loss(model, batch).sum()
    grads = torch.autograd.grad(loss, params)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert res.details["scores_members"][0] == pytest.approx(-norm, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def _train(model, tok, examples, params, *, steps, lr):
    from fedsecure.data import encode_dataset, make_loader
    from fedsecure.models.loss import per_sequence_loss

    feats = encode_dataset(tok, examples, max_length=MAX_LEN)
    loader = make_loader(feats, batch_size=len(feats), seed=0, num_steps=steps, pad_token_id=tok.pad_token_id)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for batch in loader:
        loss = per_sequence_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.slow
def test_reference_attacks_beat_or_match_loss_when_base_knows_the_style():
    """Sanity: the base model is first fine-tuned on records of the members' distribution (it
    knows their style), then a LoRA adapter on the members. Subtracting a reference removes
    the per-record difficulty that LOSS cannot tell from memorisation."""
    from peft import LoraConfig, get_peft_model

    from fedsecure.data import private_records
    from fedsecure.models import load_model

    ds = private_records(num_clients=1, examples_per_client=32, num_eval=4, num_nonmembers=96,
                         canary_repetitions=(), seed=0)
    members, nonmembers, population = ds.members()[:32], list(ds.nonmembers[:32]), list(ds.nonmembers[32:96])
    torch.manual_seed(0)
    base, tok = load_model("tiny")
    _train(base, tok, population, list(base.parameters()), steps=10, lr=1e-2)  # the base learns the style
    modules = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=32, target_modules=modules))
    _train(model, tok, members, [p for p in model.parameters() if p.requires_grad], steps=40, lr=1e-2)
    target = AttackTarget(model=model, tokenizer=tok, members=members, nonmembers=nonmembers,
                          population=population, max_length=MAX_LEN)
    auc = {cls.name: cls(num_bootstrap=50).run(target).metrics["auc"]
           for cls in (LossAttack, MinKPlusPlusAttack, ReferenceBaseAttack)}
    ref_kw = {"num_reference_adapters": 1, "reference_steps": 40, "reference_lr": 1e-2,
              "reference_batch_size": 32, "reference_fraction": 1.0, "num_bootstrap": 50}
    auc["rmia"] = RmiaAttack(**ref_kw).run(target).metrics["auc"]
    auc["lira"] = LiraAttack(**ref_kw).run(target).metrics["auc"]
    print(auc)
    assert auc["reference-base"] >= auc["loss"] - 0.02, auc
    assert max(auc["rmia"], auc["lira"]) >= auc["loss"] - 0.02, auc
    assert auc["reference-base"] > 0.6, auc
