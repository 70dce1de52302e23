"""Text-overlap metrics for reconstruction and extraction attacks.

ROUGE-1/2/L F1 (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004) via
Google's ``rouge-score`` package; token precision/recall on token-id multisets (the metric
of gradient-inversion work on text, e.g. Balunovic et al., "LAMP", NeurIPS 2022, and
Gupta et al., "Recovering Private Text in Federated Learning of Language Models", NeurIPS
2022); exact match; Hungarian matching of reconstructions to references (a batch attack
recovers a set of texts in unknown order); and the verbatim PII recovery rate (Lukas et
al., "Analyzing Leakage of Personally Identifiable Information in Language Models", IEEE
S&P 2023).

Threat model: none of its own -- these functions score an attack's output against the
ground truth, which only the evaluator holds.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from fedsecure.metrics._checks import MetricInputError

__all__ = [
    "ROUGE_TYPES",
    "TokenOverlap",
    "exact_match",
    "hungarian_match",
    "matched_text_scores",
    "pii_recovery_rate",
    "rouge_f1",
    "rouge_matrix",
    "token_precision_recall",
]

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
"""The ROUGE variants reported (F1 of each)."""

TokenizerName = Literal["rouge", "unicode"]


class _UnicodeTokenizer:
    """Lower-cased ``\\w+`` runs: keeps non-ASCII letters and digits (the rouge default drops them)."""

    _pattern = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text.lower())


@functools.lru_cache(maxsize=8)
def _scorer(use_stemmer: bool, tokenizer: str) -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - rouge-score is a dependency
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from exc
    tok = _UnicodeTokenizer() if tokenizer == "unicode" else None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=tok)


def _text(value: Any, *, name: str) -> str:
    if not isinstance(value, str):
        raise MetricInputError(f"{name}: expected a str, got {type(value).__name__}; decode token ids first")
    return value


def _texts(values: Any, *, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise MetricInputError(f"{name}: expected a sequence of str (a list), got {type(values).__name__}")
    return [_text(v, name=f"{name}[{i}]") for i, v in enumerate(values)]


def _check_tokenizer(tokenizer: str) -> str:
    if tokenizer not in ("rouge", "unicode"):
        raise MetricInputError(f"tokenizer: must be 'rouge' or 'unicode', got {tokenizer!r}")
    return tokenizer


def rouge_f1(
    *, prediction: str, reference: str, use_stemmer: bool = False, tokenizer: TokenizerName = "rouge"
) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of one prediction against one reference.

    Parameters
    ----------
    prediction, reference
        The texts.
    use_stemmer
        Porter-stem tokens before matching (``rouge-score`` option).
    tokenizer
        ``"rouge"``: the package's default (lower-case, ``[a-z0-9]+`` runs only -- non-ASCII
        letters are dropped, so "Zoë" becomes "zo"); ``"unicode"``: lower-cased ``\\w+`` runs.

    Returns
    -------
    dict
        ``{"rouge1": f1, "rouge2": f1, "rougeL": f1}``, each in [0, 1]; 0 when either text has
        no tokens.
    """
    scorer = _scorer(bool(use_stemmer), _check_tokenizer(tokenizer))
    scores = scorer.score(_text(reference, name="reference"), _text(prediction, name="prediction"))
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def rouge_matrix(
    *,
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_type: str = "rougeL",
    use_stemmer: bool = False,
    tokenizer: TokenizerName = "rouge",
) -> np.ndarray:
    """F1 of ``rouge_type`` for every (prediction, reference) pair.

    Returns an array of shape ``(len(predictions), len(references))``, the input of
    :func:`hungarian_match`.
    """
    if rouge_type not in ROUGE_TYPES:
        raise MetricInputError(f"rouge_type: must be one of {', '.join(ROUGE_TYPES)}, got {rouge_type!r}")
    preds = _texts(predictions, name="predictions")
    refs = _texts(references, name="references")
    scorer = _scorer(bool(use_stemmer), _check_tokenizer(tokenizer))
    out = np.zeros((len(preds), len(refs)))
    for i, p in enumerate(preds):
        for j, r in enumerate(refs):
            out[i, j] = scorer.score(r, p)[rouge_type].fmeasure
    return out


class TokenOverlap(NamedTuple):
    """Multiset overlap of predicted and reference token ids."""

    precision: float
    recall: float
    f1: float


def _token_ids(values: Any, *, name: str) -> list[int]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise MetricInputError(f"{name}: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise MetricInputError(f"{name}: token ids must be integers, got dtype {arr.dtype}")
    return [int(v) for v in arr.tolist()]


def token_precision_recall(*, predicted_ids: Any, reference_ids: Any) -> TokenOverlap:
    """Precision, recall and F1 of predicted token ids against reference ids, as multisets.

    A predicted id counts as correct as many times as it occurs in both (order ignored):
    ``overlap = sum_t min(count_pred(t), count_ref(t))``; precision = overlap / len(pred),
    recall = overlap / len(ref). An empty prediction has precision 0.

    Parameters
    ----------
    predicted_ids, reference_ids
        1-D integer sequences (lists, numpy arrays or CPU tensors). ``reference_ids`` must be
        non-empty.
    """
    pred = _token_ids(predicted_ids, name="predicted_ids")
    ref = _token_ids(reference_ids, name="reference_ids")
    if not ref:
        raise MetricInputError("reference_ids: is empty; recall is undefined without reference tokens")
    overlap = sum((Counter(pred) & Counter(ref)).values())
    precision = overlap / len(pred) if pred else 0.0
    recall = overlap / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if overlap else 0.0
    return TokenOverlap(float(precision), float(recall), float(f1))


def exact_match(*, prediction: str, reference: str, normalize_whitespace: bool = False) -> bool:
    """Whether the prediction equals the reference character for character.

    With ``normalize_whitespace`` both are stripped and inner whitespace runs collapse to one
    space first; case and punctuation always matter.
    """
    p = _text(prediction, name="prediction")
    r = _text(reference, name="reference")
    if normalize_whitespace:
        p, r = " ".join(p.split()), " ".join(r.split())
    return p == r


def hungarian_match(scores_matrix: Any, *, maximize: bool = True) -> list[tuple[int, int]]:
    """Optimal one-to-one assignment of rows (reconstructions) to columns (references).

    Parameters
    ----------
    scores_matrix
        2-D finite array; entry (i, j) scores reconstruction i against reference j (e.g.
        :func:`rouge_matrix`). Rectangular matrices match min(rows, cols) pairs.
    maximize
        Maximise the total score (similarities); False minimises (distances).

    Returns
    -------
    list of (row, col)
        Sorted by row; ``scipy.optimize.linear_sum_assignment``.
    """
    m = np.asarray(scores_matrix, dtype=np.float64)
    if m.ndim != 2:
        raise MetricInputError(f"scores_matrix: expected a 2-D array, got shape {m.shape}")
    if m.size and not np.isfinite(m).all():
        raise MetricInputError("scores_matrix: contains NaN or inf; replace them with finite scores")
    if m.size == 0:
        return []
    rows, cols = linear_sum_assignment(m, maximize=bool(maximize))
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def matched_text_scores(
    *,
    predictions: Sequence[str],
    references: Sequence[str],
    match_on: str = "rougeL",
    use_stemmer: bool = False,
    tokenizer: TokenizerName = "rouge",
) -> dict[str, Any]:
    """Match a batch of reconstructions to references (Hungarian on ``match_on`` F1), then score.

    Returns
    -------
    dict
        ``{"rouge1", "rouge2", "rougeL", "exact_match"}`` averaged over the **references**
        (a reference left unmatched because there are fewer predictions scores 0), plus
        ``"pairs"``: the matched (prediction index, reference index) list.
    """
    preds = _texts(predictions, name="predictions")
    refs = _texts(references, name="references")
    if not refs:
        raise MetricInputError("references: is empty; nothing to score against")
    sim = rouge_matrix(
        predictions=preds, references=refs, rouge_type=match_on, use_stemmer=use_stemmer, tokenizer=tokenizer
    )
    pairs = hungarian_match(sim, maximize=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    exact = 0
    for i, j in pairs:
        scores = rouge_f1(
            prediction=preds[i], reference=refs[j], use_stemmer=use_stemmer, tokenizer=tokenizer
        )
        for k in ROUGE_TYPES:
            totals[k] += scores[k]
        exact += exact_match(prediction=preds[i], reference=refs[j])
    out: dict[str, Any] = {k: v / len(refs) for k, v in totals.items()}
    out["exact_match"] = exact / len(refs)
    out["pairs"] = [list(p) for p in pairs]
    return out


def pii_recovery_rate(*, reconstructions: Sequence[str], pii_values: Sequence[str]) -> float:
    """Fraction of distinct PII strings that occur verbatim in at least one reconstruction.

    Matching is case-sensitive substring search (``value in text``); duplicate PII values
    count once. Every PII value must be a non-empty string (an empty one would always match).
    """
    texts = _texts(reconstructions, name="reconstructions")
    values = _texts(pii_values, name="pii_values")
    if not values:
        raise MetricInputError("pii_values: is empty; pass the PII strings planted in the training data")
    for i, v in enumerate(values):
        if not v:
            raise MetricInputError(f"pii_values[{i}]: is the empty string, which matches anything; drop it")
    distinct = set(values)
    found = sum(1 for v in distinct if any(v in t for t in texts))
    return found / len(distinct)
