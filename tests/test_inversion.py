"""Gradient inversion of LoRA updates (fedsecure.attacks.inversion) on the tiny model.

The updates are real: one (or a few) SGD/Adam steps of peft LoRA on q/v, float32, from an
adapter the server sent; the attack only sees the update and the sent adapter.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsecure.attacks.base import AttackResult, RoundObservation
from fedsecure.attacks.inversion import (
    GradientInversion,
    InversionSettings,
    TrainFacts,
    craft_adapter,
    invert_update,
    score_reconstruction,
    span_check,
    vocabulary_atoms,
)
from fedsecure.attacks.inversion._layout import LoraLayout, noise_floor, quantisation_noise, stacked_rows
from fedsecure.attacks.inversion._model import PrefixStack
from fedsecure.attacks.inversion.recovery import row_space
from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, set_adapter_state
from fedsecure.models.loss import per_sequence_loss
from fedsecure.registry import ATTACKS
from fedsecure.types import RoundContext, View

TEXTS = (
    "Ann Lee, age 34, MRN-1234-5678, lives in Oslo.",
    "Bo Kim: +1 555 0100, bo.kim@example.org",
)


def _all(ids):
    return list(ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    return model, tok


def make_peft(tiny, rank):
    _, tok = tiny
    torch.manual_seed(0)
    # a fresh copy of the base weights per adapter (attach_lora wraps in place)
    fresh, _ = load_model("tiny")
    return attach_lora(fresh, LoraSettings(rank=rank, alpha=2.0 * rank)), tok


def later_adapter(pm, seed=1):
    """An adapter as after some training: peft's A, Gaussian B (B != 0)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v) for k, v in get_adapter_state(pm).items()
    }


def plain_rows(tok, n_tokens, texts=TEXTS[:1]):
    return [list(tok(t, add_special_tokens=False)["input_ids"])[:n_tokens] for t in texts]


def client_update(pm, tok, glob, rows, *, lr=0.1, steps=1, optimizer="sgd", weight_decay=0.0):
    """The client's real update from ``glob``: ``steps`` optimizer steps on the batch ``rows``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        lab[i, : len(r)] = torch.tensor(r)
    set_adapter_state(pm, glob)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = cls(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        (per_sequence_loss(pm, {"input_ids": ids, "attention_mask": att, "labels": lab}).sum() / len(rows)).backward()
        opt.step()
    pm.eval()
    trained = get_adapter_state(pm)
    set_adapter_state(pm, glob)
    return {k: trained[k] - glob[k] for k in trained}


def attack(pm, tok, delta, glob, rows, **facts):
    return invert_update(
        pm,
        tok,
        delta=delta,
        global_state=glob,
        facts=TrainFacts(batch_size=len(rows), max_length=max(map(len, rows)), **facts),
        expected_sequences=len(rows),
        label_fn=_all,
    )


# --------------------------------------------------------------------------- exactness
def test_exact_recovery_of_a_short_record_in_a_later_round(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = later_adapter(pm)
    rows = plain_rows(tok, 24)
    before = get_adapter_state(pm)
    delta = client_update(pm, tok, glob, rows)
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert rec.sequences == [tuple(rows[0])]
    assert rec.in_regime and rec.certified and rec.route == "A" and rec.token_set.method == "span"
    assert rec.reasons == []
    # the attack restores the model's adapter
    after = get_adapter_state(pm)
    assert all(torch.equal(after[k], before[k]) or torch.equal(after[k], glob[k]) for k in after)
    scored = score_reconstruction(tok, sequences=rec.sequences, references=rows)
    assert scored["metrics"]["rougeL"] == 1.0 and scored["metrics"]["exact_match"] == 1.0


def test_exact_recovery_of_a_batch_of_two(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = later_adapter(pm)
    rows = plain_rows(tok, 12, TEXTS)
    delta = client_update(pm, tok, glob, rows)
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert sorted(rec.sequences) == sorted(tuple(r) for r in rows)
    assert rec.in_regime and rec.certified


def test_sparse_recovery_goes_beyond_the_span_bound(tiny):
    pm, tok = make_peft(tiny, 8)  # q, v at layer 0: 16 rows
    glob = later_adapter(pm)
    rows = plain_rows(tok, 24)
    truth = set(rows[0][:-1])  # the last token has no gradient of its own
    assert len(truth) > 16  # beyond the span bound
    delta = client_update(pm, tok, glob, rows)
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert rec.token_set.method == "sparse"
    got = set(rec.token_set.token_ids)
    assert got == truth
    assert rec.token_set.certified
    # the plain span check cannot do it: the row space is saturated (rank = rows)
    lay = LoraLayout.of(delta)
    noise = quantisation_noise(delta, glob)
    y = stacked_rows(delta, lay.at_site("attn", 0), noise=noise)
    space = row_space(y, rank_tol=1e-6, floor=noise_floor(y, whitened=True))
    assert space.saturated
    set_adapter_state(pm, glob)
    plain = span_check(y, vocabulary_atoms(pm), space, whitened=True)
    assert not plain.certified and len(set(plain.token_ids) & truth) < len(truth)
    # and the order is not claimed to be exact
    assert not rec.order_exact and not rec.in_regime


def test_exact_recovery_at_the_span_bound(tiny):
    """Positions with a gradient == distinct tokens == stacked rows (2 x r): the spans are saturated
    (rank == rows) yet still exactly the inputs' spans, so the span check and the checked order hold."""
    pm, tok = make_peft(tiny, 8)  # q, v at every layer: 16 rows per site
    glob = later_adapter(pm)
    rows = plain_rows(tok, 17, ("Sharon Griffiths takes amlodipine 5 mg once daily for essential hypertension",))
    assert len(rows[0]) == 17 and len(set(rows[0][:-1])) == 16
    delta = client_update(pm, tok, glob, rows)
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert rec.token_set.rank == rec.token_set.rows == 16  # saturated
    assert rec.token_set.method == "span" and rec.token_set.certified
    assert set(rec.token_set.token_ids) == set(rows[0][:-1])
    assert rec.order_exact and rec.in_regime and rec.certified
    assert rec.sequences == [tuple(rows[0])]


def test_round_one_with_b_zero_declares_itself_outside_its_regime(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = get_adapter_state(pm)  # peft's init: B = 0
    assert all(float(v.abs().max()) == 0 for k, v in glob.items() if "lora_B" in k)
    rows = plain_rows(tok, 24)
    delta = client_update(pm, tok, glob, rows)
    a0 = [v for k, v in delta.items() if "layers.0." in k and "lora_A" in k]
    assert all(float(v.abs().max()) == 0.0 for v in a0)  # dL/dA = 0 exactly
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert not rec.in_regime and not rec.certified
    assert rec.route == "B" and rec.sequences == []
    assert any("B = 0" in r for r in rec.reasons)


def test_round_one_b_route_identifies_fewer_tokens_than_r(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = get_adapter_state(pm)
    rows = [plain_rows(tok, 6)[0]]
    truth = set(rows[0][:-1])
    assert len(truth) < 16
    delta = client_update(pm, tok, glob, rows)
    rec = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1)
    assert rec.route == "B" and rec.token_set.method == "b-span"
    assert rec.token_set.certified and set(rec.token_set.token_ids) == truth


def test_malicious_server_makes_round_one_exact(tiny):
    pm, tok = make_peft(tiny, 16)
    crafted = craft_adapter(get_adapter_state(pm), craft="quiet", seed=3)
    rows = plain_rows(tok, 24)
    delta = client_update(pm, tok, crafted, rows)
    rec = attack(pm, tok, delta, crafted, rows, optimizer="sgd", lr=0.1)
    assert rec.sequences == [tuple(rows[0])] and rec.in_regime and rec.certified


def test_quiet_craft_linearises_one_adam_step_but_honest_adam_is_outside(tiny):
    pm, tok = make_peft(tiny, 16)
    rows = plain_rows(tok, 24)
    honest = later_adapter(pm)
    delta = client_update(pm, tok, honest, rows, optimizer="adam", lr=1e-3)
    rec = attack(pm, tok, delta, honest, rows, optimizer="adam", lr=1e-3)
    assert not rec.in_regime and any("Adam" in r for r in rec.reasons)
    crafted = craft_adapter(get_adapter_state(pm), craft="quiet", seed=3)
    delta = client_update(pm, tok, crafted, rows, optimizer="adam", lr=1e-3)
    rec = attack(pm, tok, delta, crafted, rows, optimizer="adam", lr=1e-3)
    assert rec.sequences == [tuple(rows[0])] and rec.in_regime


def test_multi_step_sgd_with_weight_decay(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = later_adapter(pm)
    rows = plain_rows(tok, 16)
    delta = client_update(pm, tok, glob, rows, steps=3, weight_decay=0.1)
    facts = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.1, "local_steps": 3}
    rec = attack(pm, tok, delta, glob, rows, **facts)
    truth = set(rows[0][:-1])
    assert set(rec.token_set.token_ids) == truth  # the token set stays exact over several steps
    scored = score_reconstruction(tok, sequences=rec.sequences, references=rows)
    assert scored["metrics"]["rougeL"] >= 0.9
    # without undoing the decay the A-update carries A itself and the span check breaks
    no_wd = attack(pm, tok, delta, glob, rows, optimizer="sgd", lr=0.1, local_steps=3)
    assert set(no_wd.token_set.token_ids) != truth or not no_wd.token_set.certified


def test_incremental_first_block_matches_the_forward_pass(tiny):
    pm, tok = make_peft(tiny, 4)
    set_adapter_state(pm, later_adapter(pm))
    assert PrefixStack(pm, depth=2).self_check(plain_rows(tok, 10)[0]) < 1e-4


# --------------------------------------------------------------------------- observer
def test_registered_and_validates_its_arguments():
    assert ATTACKS.get("inversion") is GradientInversion
    with pytest.raises(ValueError, match="rounds"):
        GradientInversion(rounds="1")
    with pytest.raises(ValueError, match="craft"):
        GradientInversion(craft="loud")
    with pytest.raises(ValueError, match="token_method"):
        GradientInversion(token_method="magic")
    with pytest.raises(ValueError, match="target_client"):
        GradientInversion(target_client=-1)


def test_not_applicable_under_secagg_with_the_reason():
    strict = GradientInversion(on_aggregate=False)
    reason = strict.applicability(frozenset({View.SERVER_AGGREGATE}), transport_name="secagg")
    assert "secagg" in reason and "sum" in reason
    assert GradientInversion().applicability(frozenset({View.SERVER_AGGREGATE}), transport_name="secagg") == ""
    assert strict.applicability(frozenset({View.SERVER_PER_CLIENT}), transport_name="plain") == ""
    # an observer that gets no per-client update and may not use the aggregate reports why
    obs = RoundObservation(
        ctx=RoundContext(round=1, num_rounds=2, sampled_clients=(0, 1), num_clients=2, seed=0),
        views=frozenset({View.SERVER_AGGREGATE}),
        global_before={},
        aggregate={},
        updates=(),
        model=object(),
        tokenizer=object(),
    )
    strict.observe_round(obs)
    res = strict.finish()
    assert isinstance(res, AttackResult) and not res.applicable
    assert "no per-client update" in res.reason


def _chat_observation(pm, tok, glob, examples_per_client, *, aggregate_only, lr=0.1):
    from fedsecure.config import config_from_dict
    from fedsecure.data.tokenize import encode_example

    cfg = config_from_dict(
        {
            "model": {"name": "tiny"},
            "lora": {"rank": 16, "alpha": 32},
            "data": {"dataset": "private-records", "max_length": 40},
            "federation": {"rounds": 2, "local_steps": 1, "batch_size": 1, "lr": lr, "optimizer": "sgd"},
        }
    )
    deltas = {}
    for cid, exs in examples_per_client.items():
        feats = [encode_example(tok, ex, max_length=40) for ex in exs]
        rows = [f["input_ids"] for f in feats]
        labels = [f["labels"] for f in feats]
        ids = torch.tensor(rows)
        set_adapter_state(pm, glob)
        pm.train()
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
        opt.zero_grad()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels)}
        per_sequence_loss(pm, batch).mean().backward()
        opt.step()
        pm.eval()
        trained = get_adapter_state(pm)
        deltas[cid] = {k: trained[k] - glob[k] for k in trained}
    set_adapter_state(pm, glob)
    from fedsecure.types import ClientUpdate

    updates = [ClientUpdate(client_id=c, round=1, delta=d, num_examples=1) for c, d in deltas.items()]
    mean = {k: sum(d[k] for d in deltas.values()) / len(deltas) for k in glob}
    views = frozenset({View.SERVER_AGGREGATE}) if aggregate_only else frozenset({View.SERVER_PER_CLIENT})
    return RoundObservation(
        ctx=RoundContext(round=1, num_rounds=2, sampled_clients=tuple(deltas), num_clients=len(deltas), seed=0),
        views=views,
        global_before=glob,
        aggregate=mean,
        updates=() if aggregate_only else updates,
        model=pm,
        tokenizer=tok,
        train_config=cfg,
        ground_truth=examples_per_client,
    )


EXAMPLES = {
    0: [{"prompt": "Ann?", "response": "Ann Lee, 34.", "id": "a", "pii": {"name": "Ann Lee", "age": "34"}}],
    1: [{"prompt": "Bo?", "response": "Bo Kim, 71.", "id": "b", "pii": {"name": "Bo Kim", "age": "71"}}],
}


def test_observer_attacks_a_client_update_and_restores_the_model(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = later_adapter(pm)
    obs = _chat_observation(pm, tok, glob, {0: EXAMPLES[0]}, aggregate_only=False)
    att = GradientInversion(rounds=[1])
    set_adapter_state(pm, glob)
    before = get_adapter_state(pm)
    att.observe_round(obs)
    after = get_adapter_state(pm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    res = att.finish()
    assert res.applicable and res.metrics["view"] == "client"
    for key in ("rouge1", "rouge2", "rougeL", "token_precision", "token_recall", "exact_match", "pii_recovery"):
        assert key in res.metrics and 0.0 <= res.metrics[key] <= 1.0
    assert isinstance(res.metrics["in_regime"], bool)
    # the token set of the chat-templated record is recovered (span check, rank < rows)
    assert res.metrics["tokenset_precision"] == 1.0 and res.metrics["tokenset_recall"] >= 0.9
    rec = res.details["attacks"][0]
    assert rec["clients"] == [0] and rec["pairs"]


def test_observer_runs_on_the_aggregate_when_per_client_updates_are_hidden(tiny):
    pm, tok = make_peft(tiny, 16)
    glob = later_adapter(pm)
    obs = _chat_observation(pm, tok, glob, EXAMPLES, aggregate_only=True)
    att = GradientInversion(rounds=[1])
    att.observe_round(obs)
    res = att.finish()
    assert res.applicable and res.metrics["view"] == "aggregate"
    assert "aggregate" in res.reason
    rec = res.details["attacks"][0]
    assert rec["clients"] == [0, 1] and any("aggregate of 2 clients" in n for n in rec["notes"])
    # both clients' tokens are in the mean update: the union is recovered
    assert res.metrics["tokenset_precision"] == 1.0


def test_craft_global_only_when_malicious_and_b_is_zero(tiny):
    pm, _ = make_peft(tiny, 4)
    fresh = get_adapter_state(pm)
    assert GradientInversion().craft_global(fresh, 0) is None
    evil = GradientInversion(malicious=True)
    assert evil.attacked_rounds() == (0,)
    ctx = RoundContext(round=0, num_rounds=2, sampled_clients=(0,), num_clients=1, seed=0)
    crafted = evil.craft_global(fresh, ctx)
    assert crafted is not None and set(crafted) == set(fresh)
    assert all(float(v.abs().max()) == 0 for k, v in crafted.items() if "lora_A" in k)
    assert all(0 < float(v.abs().max()) < 1e-9 for k, v in crafted.items() if "lora_B" in k)
    assert evil.craft_global(later_adapter(pm), 0) is None  # B != 0: no need
    assert evil.craft_global(fresh, 1) is None  # not an attacked round


# --------------------------------------------------------------------------- metrics
class _Tok:
    """Decodes ids to words: id i -> WORDS[i]."""

    WORDS = ("", "ann", "lee", "age", "34", "bo", "kim", "71", "x")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[i] for i in ids if self.WORDS[i])


def test_metrics_against_hand_computed_cases():
    tok = _Tok()
    refs = [[1, 2, 3, 4], [5, 6, 3, 7]]
    examples = [{"pii": {"name": "ann lee", "age": "34"}}, {"pii": {"name": "bo kim", "age": "71"}}]
    # perfect, in the other order: Hungarian matching undoes the permutation
    m = score_reconstruction(tok, sequences=[refs[1], refs[0]], references=refs, reference_examples=examples)["metrics"]
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == m["exact_match"] == m["pii_recovery"] == 1.0
    # one reconstruction "ann lee age x" for two references:
    # vs ref0 (ann lee age 34): 3 of 4 unigrams -> P = R = F1 = 3/4; bigrams 2 of 3 -> 2/3; LCS 3 -> 3/4
    # averaged over the 2 references (the second scores 0)
    m = score_reconstruction(
        tok, sequences=[[1, 2, 3, 8]], references=refs, reference_examples=examples, recovered_token_set=[1, 2, 3, 8]
    )["metrics"]
    assert m["rouge1"] == pytest.approx(0.75 / 2)
    assert m["rouge2"] == pytest.approx((2 / 3) / 2)
    assert m["rougeL"] == pytest.approx(0.75 / 2)
    assert m["token_precision"] == pytest.approx(0.75 / 2) and m["token_recall"] == pytest.approx(0.75 / 2)
    assert m["exact_match"] == 0.0
    # PII: "ann lee" recovered; "34", "bo kim", "71" not -> 1 / 4
    assert m["pii_recovery"] == pytest.approx(0.25)
    # token set {1, 2, 3, 8} against the matched reference's {1, 2, 3, 4}
    assert m["tokenset_precision"] == pytest.approx(0.75) and m["tokenset_recall"] == pytest.approx(0.75)
    assert math.isnan(
        score_reconstruction(tok, sequences=[], references=refs)["metrics"]["pii_recovery"]
    )


def test_settings_validation():
    with pytest.raises(ValueError, match="order_threshold"):
        InversionSettings(order_threshold=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainFacts(optimizer="lion")
