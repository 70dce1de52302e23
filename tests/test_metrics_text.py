"""Text-overlap metrics on hand-computed strings and token ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsecure.metrics import (
    MetricInputError,
    exact_match,
    hungarian_match,
    matched_text_scores,
    pii_recovery_rate,
    rouge_f1,
    rouge_matrix,
    token_precision_recall,
)


def test_rouge_hand_computed():
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> 5/6; bigrams: the-cat, on-the, the-mat of 5 -> 3/5;
    # LCS "the cat on the mat" = 5 -> 5/6
    got = rouge_f1(prediction="the cat is on the mat", reference="the cat sat on the mat")
    assert got == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    # same bag of words, no shared bigram, LCS 3 of 4
    got = rouge_f1(prediction="a b c d", reference="a c b d")
    assert got == pytest.approx({"rouge1": 1.0, "rouge2": 0.0, "rougeL": 0.75})
    # different lengths: pred 2 tokens, ref 4, overlap 2 -> P = 1, R = 1/2, F1 = 2/3
    got = rouge_f1(prediction="alice smith", reference="alice smith lives here")
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 2 * (1 * 1 / 3) / (1 + 1 / 3), "rougeL": 2 / 3})
    assert rouge_f1(prediction="", reference="x") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    perfect = {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_f1(prediction="Hello, World!", reference="hello world") == perfect


def test_rouge_tokenizer_and_stemmer_options():
    # the rouge-score default drops non-ASCII letters: "Zoë" and "Zoé" both become "zo"
    assert rouge_f1(prediction="Zoë", reference="Zoé")["rouge1"] == 1.0
    assert rouge_f1(prediction="Zoë", reference="Zoé", tokenizer="unicode")["rouge1"] == 0.0
    assert rouge_f1(prediction="Zoë", reference="zoë", tokenizer="unicode")["rouge1"] == 1.0
    assert rouge_f1(prediction="running dogs", reference="run dog")["rouge1"] == 0.0
    assert rouge_f1(prediction="running dogs", reference="run dog", use_stemmer=True)["rouge1"] == 1.0
    with pytest.raises(MetricInputError, match="tokenizer"):
        rouge_f1(prediction="a", reference="a", tokenizer="bpe")


def test_token_precision_recall_multisets():
    # pred {1,1,2,3}, ref {1,2,2,4}: overlap min counts = 1 (for 1) + 1 (for 2) = 2
    got = token_precision_recall(predicted_ids=[1, 1, 2, 3], reference_ids=[1, 2, 2, 4])
    assert got.precision == 0.5 and got.recall == 0.5 and got.f1 == 0.5
    got = token_precision_recall(predicted_ids=[5, 6], reference_ids=[6, 5, 7, 8])  # order ignored
    assert (got.precision, got.recall) == (1.0, 0.5) and got.f1 == pytest.approx(2 / 3)
    assert token_precision_recall(predicted_ids=[], reference_ids=[1]) == (0.0, 0.0, 0.0)
    # tensors and arrays work (a tensor's elements must not be hashed by identity)
    got = token_precision_recall(predicted_ids=torch.tensor([3, 3, 9]), reference_ids=np.array([3, 9, 9]))
    assert got.precision == pytest.approx(2 / 3) and got.recall == pytest.approx(2 / 3)
    with pytest.raises(MetricInputError, match="reference_ids"):
        token_precision_recall(predicted_ids=[1], reference_ids=[])
    with pytest.raises(MetricInputError, match="integers"):
        token_precision_recall(predicted_ids=[1.5], reference_ids=[1])


@settings(max_examples=100, deadline=None)
@given(
    pred=st.lists(st.integers(0, 6), max_size=20),
    ref=st.lists(st.integers(0, 6), min_size=1, max_size=20),
)
def test_token_overlap_properties(pred, ref):
    got = token_precision_recall(predicted_ids=pred, reference_ids=ref)
    assert 0.0 <= got.precision <= 1.0 and 0.0 <= got.recall <= 1.0
    if pred:
        swapped = token_precision_recall(predicted_ids=ref, reference_ids=pred)
        assert swapped.precision == pytest.approx(got.recall) and swapped.recall == pytest.approx(
            got.precision
        )
    assert token_precision_recall(predicted_ids=ref, reference_ids=ref) == (1.0, 1.0, 1.0)


def test_exact_match():
    assert exact_match(prediction="SSN 123-45-6789", reference="SSN 123-45-6789")
    assert not exact_match(prediction="ssn 123-45-6789", reference="SSN 123-45-6789")
    assert not exact_match(prediction=" a  b ", reference="a b")
    assert exact_match(prediction=" a \n b ", reference="a b", normalize_whitespace=True)


def test_hungarian_match_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for rows, cols in ((4, 4), (3, 5), (5, 3)):
        m = rng.random((rows, cols))
        pairs = hungarian_match(m)
        assert len(pairs) == min(rows, cols) and pairs == sorted(pairs)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        total = sum(m[r, c] for r, c in pairs)
        if rows <= cols:
            best = max(
                sum(m[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows)
            )
        else:
            best = max(
                sum(m[p[j], j] for j in range(cols)) for p in itertools.permutations(range(rows), cols)
            )
        assert total == pytest.approx(best)
    # greedy would take (0, 0) = 0.9 and be forced into (1, 1) = 0; the optimum is 0.8 + 0.8
    assert hungarian_match([[0.9, 0.8], [0.8, 0.0]]) == [(0, 1), (1, 0)]
    assert hungarian_match([[0.9, 0.8], [0.8, 0.0]], maximize=False) == [(0, 0), (1, 1)]
    assert hungarian_match(np.zeros((0, 3))) == []
    with pytest.raises(MetricInputError, match="NaN"):
        hungarian_match([[np.nan]])


def test_matched_text_scores_recovers_the_permutation():
    refs = ["Alice lives in Paris.", "the dog barked", "an unrecovered sentence"]
    preds = ["the dog barked", "alice lives in paris"]
    m = rouge_matrix(predictions=preds, references=refs)
    assert m.shape == (2, 3) and m[0, 1] == 1.0 and m[1, 0] == 1.0
    out = matched_text_scores(predictions=preds, references=refs)
    assert out["pairs"] == [[0, 1], [1, 0]]
    # two references perfectly recovered (ROUGE 1), the third unmatched (0): mean 2/3
    assert out["rouge1"] == pytest.approx(2 / 3) and out["rougeL"] == pytest.approx(2 / 3)
    assert out["exact_match"] == pytest.approx(1 / 3)  # only "the dog barked" is character-exact


def test_pii_recovery_rate():
    recon = ["Contact John Doe at john.doe@example.com", "card 4111 1111 1111 1111 expired"]
    pii = ["john.doe@example.com", "4111 1111 1111 1111", "555-0100", "John Doe", "john doe", "555-0100"]
    # distinct: 5 values; found: email, card, "John Doe" (case-sensitive: "john doe" is not)
    assert pii_recovery_rate(reconstructions=recon, pii_values=pii) == pytest.approx(3 / 5)
    assert pii_recovery_rate(reconstructions=[], pii_values=["x"]) == 0.0
    with pytest.raises(MetricInputError, match=r"pii_values\[1\]"):
        pii_recovery_rate(reconstructions=["a"], pii_values=["a", ""])
    with pytest.raises(MetricInputError, match="reconstructions"):
        pii_recovery_rate(reconstructions="a single string", pii_values=["a"])
