"""The TAG/LAMP-style optimisation baseline runs (double backward through attention) and is honest."""

from __future__ import annotations

import pytest
import torch

from fedsecure.attacks.inversion import optimisation_baseline
from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, set_adapter_state
from fedsecure.models.loss import per_sequence_loss


def test_optimisation_baseline_runs_and_restores_the_adapter():
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    pm = attach_lora(model, LoraSettings(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    glob = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v)
            for k, v in get_adapter_state(pm).items()}
    ids = torch.tensor([tok("Ann Lee, age 34", add_special_tokens=False)["input_ids"][:8]])
    set_adapter_state(pm, glob)
    params = [p for p in pm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        per_sequence_loss(pm, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).sum(), params
    )
    names = [n.replace(".default", "") for n, p in pm.named_parameters() if p.requires_grad]
    delta = {n: -0.1 * gr for n, gr in zip(names, grads, strict=True)}
    before = {k: v.clone() for k, v in get_adapter_state(pm).items()}
    seqs = optimisation_baseline(pm, delta=delta, global_state=glob, length=8, batch=1, steps=3, lr=0.1)
    assert len(seqs) == 1 and len(seqs[0]) == 8
    vocab = pm.get_input_embeddings().weight.shape[0]
    assert all(0 <= t < vocab for t in seqs[0])
    after = get_adapter_state(pm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="length >= 2"):
        optimisation_baseline(pm, delta=delta, global_state=glob, length=1)


def test_reconstruction_table_in_the_summary():
    from fedsecure.experiment import Results
    from fedsecure.report.summary import reconstruction_rows, render_summary

    inv = {
        "name": "inversion", "threat_model": "server", "applicable": True, "reason": "",
        "metrics": {"rouge1": 0.5, "rougeL": 0.25, "token_recall": 0.75, "pii_recovery": 0.5, "exact_match": 0.0,
                    "in_regime": False, "view": "client"},
        "details": {"attacks": [{"reasons": ["order ranked, not checked"]}]},
    }
    mia = {"name": "loss", "threat_model": "released", "applicable": True, "reason": "", "metrics": {"auc": 0.7}}
    res = Results(name="x", config_hash="h", config={}, utility={}, privacy={}, attacks=[inv, mia], cost={},
                  federation={}, versions={})
    rows = reconstruction_rows(res)
    assert rows == [["inversion", "client", 0.5, 0.25, 0.75, 0.5, 0.0, "no", "order ranked, not checked"]]
    assert "| inversion | client | 0.5 | 0.25 |" in render_summary(res)
