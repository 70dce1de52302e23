"""Utility evaluation: held-out loss and perplexity of the current global model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsecure.models.loss import supervised_token_nll


@torch.no_grad()
def example_nll(
    model: torch.nn.Module,
    features: Sequence[Mapping[str, Sequence[int]]],
    *,
    batch_size: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL over supervised tokens and the token counts (both ``[N]``)."""
    from fedsecure.data.tokenize import collate

    model.eval()
    sums, counts = [], []
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]), pad_token_id=pad_token_id)
        nll, rows = supervised_token_nll(model, batch)
        b = batch["input_ids"].shape[0]
        sums.append(torch.zeros(b).index_add(0, rows, nll.float()))
        counts.append(torch.zeros(b).index_add(0, rows, torch.ones_like(nll, dtype=torch.float32)))
    if not sums:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(sums), torch.cat(counts)


def evaluate(
    model: torch.nn.Module,
    features: Sequence[Mapping[str, Sequence[int]]],
    *,
    batch_size: int,
    pad_token_id: int,
    groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Token-weighted eval loss and perplexity, overall and per group (e.g. per locale)."""
    nll, cnt = example_nll(model, features, batch_size=batch_size, pad_token_id=pad_token_id)
    if cnt.numel() == 0:
        return {"eval_loss": math.nan, "eval_perplexity": math.nan}
    loss = float(nll.sum() / cnt.sum())
    out: dict[str, Any] = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    if groups is not None:
        per: dict[str, float] = {}
        for g in sorted(set(groups), key=str):
            idx = [i for i, x in enumerate(groups) if x == g]
            gl = float(nll[idx].sum() / cnt[idx].sum())
            per[str(g)] = gl
        out["eval_loss_by_group"] = per
    return out
