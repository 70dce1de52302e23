"""Scoring reconstructions against the examples a client really trained on.

Reconstructions are matched one-to-one to references by the Hungarian algorithm on
ROUGE-L F1 (:func:`fedsecure.metrics.text.hungarian_match`); every figure is then averaged
over ``denominator`` references (the number of sequences behind the update), so a missing
reconstruction scores 0. Texts are the *trained* token sequences (after chat templating
and truncation to ``max_length``) decoded without special tokens, so a perfect
reconstruction scores 1 exactly.

Ground truth is read here only; the attack's guess never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsecure.metrics.text import (
    ROUGE_TYPES,
    hungarian_match,
    pii_recovery_rate,
    rouge_f1,
    rouge_matrix,
    token_precision_recall,
)


def pii_strings(example: Mapping[str, Any], trained_text: str) -> list[str]:
    """The example's PII values (``example["pii"]``) that occur verbatim in the trained text."""
    pii = example.get("pii") or {}
    out = []
    for value in pii.values():
        v = str(value).strip()
        if v and v in trained_text:
            out.append(v)
    return out


def score_reconstruction(
    tokenizer: Any,
    *,
    sequences: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    reference_examples: Sequence[Mapping[str, Any]] | None = None,
    recovered_token_set: Sequence[int] = (),
    denominator: int | None = None,
    keep: int = 4,
) -> dict[str, Any]:
    """Match and score reconstructions.

    Parameters
    ----------
    tokenizer:
        Decodes token ids to text.
    sequences:
        Reconstructed token id sequences.
    references:
        The trained token id sequences (candidates for matching).
    reference_examples:
        The examples behind ``references`` (for their ``"pii"``), same order.
    recovered_token_set:
        The token set the attack recovered (for token-set precision/recall).
    denominator:
        How many references the update holds (default: all ``references``).
    keep:
        How many matched pairs to return as text in ``details``.

    Returns
    -------
    dict
        ``metrics`` (rouge1/2/L F1, token precision/recall on id multisets, token-set
        precision/recall, exact_match on ids, pii_recovery, counts) and ``pairs`` (text).
    """
    if not references:
        raise ValueError("score_reconstruction: no references to score against")
    denom = max(1, min(denominator or len(references), len(references)))
    preds = [tokenizer.decode(list(s), skip_special_tokens=True) for s in sequences]
    refs = [tokenizer.decode(list(r), skip_special_tokens=True) for r in references]
    pairs: list[tuple[int, int]] = []
    if preds:
        pairs = hungarian_match(rouge_matrix(predictions=preds, references=refs, rouge_type="rougeL"))
        pairs = sorted(pairs, key=lambda p: -rouge_f1(prediction=preds[p[0]], reference=refs[p[1]])["rougeL"])
        pairs = pairs[:denom]
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    tp = tr = 0.0
    exact = 0
    pii_found = 0
    pii_total = 0
    shown = []
    matched_refs = set()
    for i, j in pairs:
        matched_refs.add(j)
        scores = rouge_f1(prediction=preds[i], reference=refs[j])
        for k in ROUGE_TYPES:
            totals[k] += scores[k]
        overlap = token_precision_recall(predicted_ids=list(sequences[i]), reference_ids=list(references[j]))
        tp += overlap.precision
        tr += overlap.recall
        exact += int(tuple(sequences[i]) == tuple(references[j]))
        values: list[str] = []
        if reference_examples is not None:
            values = pii_strings(reference_examples[j], refs[j])
            if values:
                found = round(pii_recovery_rate(reconstructions=[preds[i]], pii_values=values) * len(set(values)))
                pii_found += found
                pii_total += len(set(values))
        if len(shown) < keep:
            shown.append({"reconstruction": preds[i][:400], "reference": refs[j][:400], "rougeL": scores["rougeL"]})
    # references never matched still count in the PII denominator
    if reference_examples is not None:
        unmatched = [j for j in range(len(refs)) if j not in matched_refs]
        for j in unmatched[: max(0, denom - len(pairs))]:
            pii_total += len(set(pii_strings(reference_examples[j], refs[j])))
    truth = {t for j in (matched_refs or range(len(references))) for t in references[j]}
    got = set(recovered_token_set)
    metrics: dict[str, Any] = {k: v / denom for k, v in totals.items()}
    metrics.update(
        token_precision=tp / denom,
        token_recall=tr / denom,
        tokenset_precision=len(got & truth) / len(got) if got else 0.0,
        tokenset_recall=len(got & truth) / len(truth) if truth else 0.0,
        exact_match=exact / denom,
        pii_recovery=pii_found / pii_total if pii_total else float("nan"),
        pii_total=pii_total,
        num_reconstructions=len(preds),
        num_references=denom,
    )
    return {"metrics": metrics, "pairs": shown}
