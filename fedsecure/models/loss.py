"""Per-sequence causal-LM loss.

Hugging Face's built-in loss is a token mean over the whole batch, which weights each
example by its number of supervised tokens; per-sample gradients (DP-SGD) and
membership scores need one loss per sequence: the mean over *that* sequence's
supervised tokens (labels != -100).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next-token labels and their mask, both ``[B, T-1]``."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def per_sequence_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence over supervised tokens, shape ``[B]``."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = (shift_labels != IGNORE_INDEX).float()
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    count = mask.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("a sequence has no supervised tokens (all labels are -100); drop it or lengthen max_length")
    return (tok * mask).sum(dim=1) / count


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder backbone, output head) of a (peft / Opacus-wrapped) causal LM, if it exposes them."""
    inner = getattr(model, "_module", model)  # Opacus GradSampleModule
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    input_ids = batch["input_ids"]
    pos = batch.get("position_ids")
    if pos is None:
        attn = batch.get("attention_mask")
        if attn is not None:
            pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        else:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    return pos.contiguous()


def supervised_token_nll(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every supervised next token and its row index: ``(nll [K], row [K])``.

    The output head (the largest matrix of a small LM: vocabulary x hidden) is applied
    only at supervised positions, not at every position of the batch. ``position_ids``
    are passed explicitly per row (not broadcast; Opacus#841).
    """
    input_ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    labels = batch["labels"]
    pos = _positions(batch)
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    parts = _split_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, :-1]
        sel = logits[mask].float()
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attn, position_ids=pos).last_hidden_state
        sel = head(hidden[:, :-1][mask]).float()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(shift_labels)[mask]
    nll = F.cross_entropy(sel, shift_labels[mask], reduction="none")
    return nll, rows


def per_sequence_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Forward ``batch`` (``input_ids``, ``attention_mask``, ``labels``) and return ``[B]`` losses:
    the mean next-token NLL over each sequence's supervised tokens."""
    nll, rows = supervised_token_nll(model, batch)
    b = batch["input_ids"].shape[0]
    sums = torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    counts = torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
    if bool((counts == 0).any()):
        raise ValueError("a sequence has no supervised tokens (all labels are -100); drop it or lengthen max_length")
    return sums / counts
