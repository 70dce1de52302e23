"""Shared scoring for membership attacks: one forward pass, many scores.

Every released-model attack of :mod:`fedsecure.attacks.membership` is a function of the
per-token statistics of the supervised (response) tokens of an example under a model:

- ``logprob_t = log p(x_t | x_<t)``: LOSS (Yeom et al., CSF 2018), zlib ratio (Carlini et
  al., USENIX Security 2021), Min-K% (Shi et al., ICLR 2024), reference-based attacks
  (Carlini et al. 2021; Mattern et al., ACL Findings 2023);
- ``mu_t = E_{z ~ p(.|x_<t)} log p(z | x_<t)`` and ``sigma_t`` (the standard deviation of
  ``log p(z | x_<t)`` under the same distribution): Min-K%++ (Zhang et al., ICLR 2025).

:func:`compute_token_stats` computes all three in one forward pass per batch, and
:func:`cached_token_stats` memoises them per (model state, examples) on a run's
:class:`~fedsecure.attacks.base.AttackTarget` (in ``target.extra``), so running five
attacks costs one forward pass over the evaluation texts (two with the base-model
reference). :func:`iter_adapter_gradients` yields per-example gradients of the adapter
parameters, in the order of :func:`fedsecure.models.get_adapter_state` (used by the
gradient-norm attack and the server's client-level attack).

Score convention (the project's): every *score* function returns **higher = more likely
member**.

Threat model: whoever calls these functions can run the model (released-model view) and,
for gradients, differentiate it (white-box access to the adapter).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsecure.data.tokenize import DEFAULT_SYSTEM, collate, encode_example
from fedsecure.models.loss import IGNORE_INDEX, per_sequence_loss

__all__ = [
    "CACHE_KEY",
    "ScoringError",
    "TokenStats",
    "adapter_parameters",
    "adapter_trainable",
    "base_model",
    "cached_token_stats",
    "compute_token_stats",
    "encode_examples",
    "examples_digest",
    "iter_adapter_gradients",
    "loss_score",
    "min_k_plus_plus_score",
    "min_k_score",
    "model_fingerprint",
    "zlib_score",
]

CACHE_KEY = "_fedsecure_score_cache"
"""Key of the score cache inside ``AttackTarget.extra``."""


class ScoringError(ValueError):
    """Invalid input to a scoring function; the message names the parameter and the fix."""


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one example's supervised tokens (natural logs).

    Attributes
    ----------
    logprobs:
        ``log p(x_t | x_<t)`` of each supervised token, shape ``[n]``.
    mean_logprobs:
        ``mu_t``, the expected log-probability under the model's next-token distribution.
    std_logprobs:
        ``sigma_t``, the standard deviation of the log-probability under that distribution.
    """

    logprobs: np.ndarray
    mean_logprobs: np.ndarray
    std_logprobs: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.logprobs.size)

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability per supervised token (minus the LOSS)."""
        return float(self.logprobs.mean())

    @property
    def total_nll(self) -> float:
        """Summed negative log-likelihood of the supervised tokens (nats)."""
        return float(-self.logprobs.sum())


# --------------------------------------------------------------------------- encoding


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM,
) -> list[dict[str, list[int]]]:
    """Tokenise examples with response-only labels (:func:`fedsecure.data.encode_example`).

    Raises
    ------
    ScoringError
        If an example is not a mapping with string ``prompt`` and ``response`` fields.
    """
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or not isinstance(ex.get("prompt"), str) or not isinstance(
            ex.get("response"), str
        ):
            raise ScoringError(
                f"examples[{i}]: expected a mapping with string 'prompt' and 'response' fields, got "
                f"{type(ex).__name__} with keys {sorted(ex)[:5] if isinstance(ex, Mapping) else '-'}"
            )
        item = {"prompt": ex["prompt"], "response": ex["response"], "id": ex.get("id", str(i))}
        out.append(encode_example(tokenizer, item, max_length=max_length, system_prompt=system_prompt))
    return out


def examples_digest(examples: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 over the prompt/response texts of ``examples``, in order (cache key)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.get("prompt", ""), ex.get("response", "")]).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _forward_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, first: int = 0) -> torch.Tensor:
    """Logits of positions ``first .. T-1`` (``[B, T - first, V]``).

    Models that accept Hugging Face's ``logits_to_keep`` compute the output head only there
    (the prompt positions are skipped); others are sliced after a full forward.
    """
    attn = batch["attention_mask"]
    ids = batch["input_ids"]
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0).contiguous()
    keep = ids.shape[1] - first
    if first > 0:
        try:
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep
            logits = None
        if logits is not None and logits.shape[1] == keep:
            return logits
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    return logits[:, first:, :]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- forward statistics


def compute_token_stats(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = 8,
    system_prompt: str | None = DEFAULT_SYSTEM,
) -> list[TokenStats]:
    """Per-token log-probabilities and next-token distribution moments, one forward pass.

    Parameters
    ----------
    model:
        A causal LM (a peft model scores with its active adapter).
    tokenizer:
        Its tokenizer.
    examples:
        Mappings with ``prompt`` and ``response``; only response tokens are scored.
    max_length:
        Truncation length in tokens (as in training).
    batch_size:
        Sequences per forward pass.
    system_prompt:
        The system prompt used in training (:data:`fedsecure.data.DEFAULT_SYSTEM`).

    Returns
    -------
    list of TokenStats
        One per example, in order.
    """
    if batch_size < 1:
        raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    features = encode_examples(tokenizer, examples, max_length=max_length, system_prompt=system_prompt)
    device = _model_device(model)
    pad = _pad_id(tokenizer)
    out: list[TokenStats] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size], pad_token_id=pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            for row in range(labels.shape[0]):
                if not bool(mask[row].any()):
                    raise ScoringError(
                        f"examples[{start + row}] has no supervised token after truncation to "
                        f"max_length={max_length}; raise max_length"
                    )
            # Position p of the logits predicts label p + 1: only positions from the first
            # supervised one on are needed.
            first = int(mask.any(dim=0).nonzero(as_tuple=True)[0][0])
            logits = _forward_logits(model, batch, first=first)
            for row in range(labels.shape[0]):
                pos = mask[row].nonzero(as_tuple=True)[0]
                logp = torch.log_softmax(logits[row, pos - first, :].float(), dim=-1)  # [n, V]
                tok = logp.gather(-1, labels[row, pos].unsqueeze(-1)).squeeze(-1)
                p = logp.exp()
                mu = (p * logp).sum(-1)
                second = (p * logp.square()).sum(-1)
                sigma = (second - mu.square()).clamp(min=0.0).sqrt()
                out.append(
                    TokenStats(
                        logprobs=tok.double().cpu().numpy(),
                        mean_logprobs=mu.double().cpu().numpy(),
                        std_logprobs=sigma.double().cpu().numpy(),
                    )
                )
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identity of a model's current trainable state: object id plus the adapter's hash.

    For a peft model the hash covers the active adapter's tensors, so a cache entry goes
    stale as soon as the adapter changes (e.g. while reference adapters are trained).
    """
    from fedsecure.types import adapter_hash

    try:
        from fedsecure.models import get_adapter_state

        state = get_adapter_state(model)
    except Exception:  # noqa: BLE001 - not a peft model: hash the trainable parameters instead
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return f"{id(model)}:{adapter_hash(state)}"


@contextlib.contextmanager
def base_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context in which ``model`` computes as its base model (peft ``disable_adapter``).

    Raises
    ------
    ScoringError
        If ``model`` is not a peft model (there is no adapter to disable).
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ScoringError(
            f"the base-model reference needs a peft model (with disable_adapter()), got {type(model).__name__}; "
            "attach the adapter with peft or fedsecure.models.attach_lora"
        )
    with disable():
        yield model


def cached_token_stats(
    target: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    reference: str = "target",
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[TokenStats]:
    """:func:`compute_token_stats` on ``target.model``, memoised in ``target.extra``.

    Parameters
    ----------
    target:
        An :class:`~fedsecure.attacks.base.AttackTarget`.
    examples:
        The examples to score.
    reference:
        ``"target"`` (the released adapter) or ``"base"`` (the same model with its adapter
        disabled).
    batch_size:
        Forward batch size (does not change the result; not part of the key).
    max_length:
        Truncation length; defaults to ``target.max_length``.
    """
    if reference not in ("target", "base"):
        raise ScoringError(f"reference must be 'target' or 'base', got {reference!r}")
    length = int(max_length if max_length is not None else target.max_length)
    system_prompt = target.extra.get("system_prompt", DEFAULT_SYSTEM)
    cache = target.extra.setdefault(CACHE_KEY, {})
    fingerprint = model_fingerprint(target.model)
    key = (reference, fingerprint, examples_digest(examples), length, system_prompt)
    if key not in cache:
        if reference == "base":
            with base_model(target.model) as m:
                stats = compute_token_stats(
                    m, target.tokenizer, examples, max_length=length, batch_size=batch_size,
                    system_prompt=system_prompt,
                )
        else:
            stats = compute_token_stats(
                target.model, target.tokenizer, examples, max_length=length, batch_size=batch_size,
                system_prompt=system_prompt,
            )
        cache[key] = stats
    return cache[key]


# --------------------------------------------------------------------------- scores (higher = member)


def loss_score(stats: TokenStats) -> float:
    """LOSS attack (Yeom et al. 2018): minus the mean token NLL, i.e. the mean log-probability."""
    return stats.mean_logprob


def zlib_score(stats: TokenStats, text: str) -> float:
    """zlib ratio (Carlini et al. 2021): ``-(mean token NLL) / zlib_bytes(text)``.

    The ratio of the log-perplexity to the zlib entropy (the compressed length of the UTF-8
    text in bytes at zlib's default level, as in Carlini et al. and mimir), negated so that
    higher = more likely member. ``text`` is the scored response.
    """
    if not isinstance(text, str) or not text:
        raise ScoringError("zlib_score: text must be a non-empty string (the scored response)")
    entropy = len(zlib.compress(text.encode("utf-8")))
    nll = -stats.mean_logprob
    return -nll / entropy


def _k_count(n: int, k_percent: float) -> int:
    if not 0.0 < k_percent <= 100.0:
        raise ScoringError(f"k_percent must be in (0, 100], got {k_percent!r}")
    return max(1, min(n, math.ceil(n * k_percent / 100.0)))


def min_k_score(stats: TokenStats, *, k_percent: float) -> float:
    """Min-K% prob (Shi et al. 2024): the mean of the lowest ``k_percent`` % token log-probs.

    The count is ``ceil(n * k / 100)`` (at least one token). Higher = more likely member.
    """
    k = _k_count(stats.num_tokens, k_percent)
    return float(np.sort(stats.logprobs)[:k].mean())


def min_k_plus_plus_score(stats: TokenStats, *, k_percent: float, min_std: float = 1e-6) -> float:
    """Min-K%++ (Zhang et al. 2025): mean of the lowest ``k_percent`` % of ``(logp - mu) / sigma``.

    ``sigma`` is floored at ``min_std`` (a deterministic next-token distribution has sigma 0
    and then ``logp - mu`` is 0 for its only token). Higher = more likely member.
    """
    z = (stats.logprobs - stats.mean_logprobs) / np.maximum(stats.std_logprobs, min_std)
    k = _k_count(stats.num_tokens, k_percent)
    return float(np.sort(z)[:k].mean())


# --------------------------------------------------------------------------- gradients


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The active adapter's parameters, keyed and ordered like :func:`fedsecure.models.get_adapter_state`.

    peft names a parameter ``...q_proj.lora_A.<adapter>.weight`` (or
    ``...embed_tokens.lora_embedding_A.<adapter>``); the state key drops the adapter name.
    State entries that are not adapter parameters -- frozen base layers peft saves with an
    embedding adapter (``...embed_tokens.base_layer.weight``) -- are skipped. Raises
    :class:`ScoringError` when the model has no parameter of its active adapter.
    """
    from fedsecure.models import get_adapter_state

    state_keys = list(get_adapter_state(model))
    active = getattr(model, "active_adapter", "default")
    if not isinstance(active, str):
        active = active[0]
    by_key: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        if f".{active}." in name:
            by_key[name.replace(f".{active}.", ".")] = p
        elif name.endswith(f".{active}"):
            by_key[name[: -len(active) - 1]] = p
    out = [(k, by_key[k]) for k in state_keys if k in by_key]
    if not out:
        raise ScoringError(
            f"the model has no parameter of its active adapter {active!r} matching its adapter state "
            f"(state keys {state_keys[:3]}); is it a peft LoRA model?"
        )
    return out


@contextlib.contextmanager
def adapter_trainable(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Context in which exactly the adapter parameters require gradients (restored on exit)."""
    params = adapter_parameters(model)
    ids = {id(p) for _, p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        yield params
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _supervised_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed per-sequence mean token NLL (as :func:`fedsecure.models.loss.per_sequence_loss`),
    computing the output head only from the first supervised position on."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if not bool(mask.any(dim=1).all()):
        return per_sequence_loss(model, batch).sum()  # raises its clear error
    first = int(mask.any(dim=0).nonzero(as_tuple=True)[0][0])
    logits = _forward_logits(model, batch, first=first)[:, : labels.shape[1] - first, :]
    tail_labels = labels[:, first:]
    tail_mask = mask[:, first:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, tail_labels.masked_fill(~tail_mask, 0).unsqueeze(-1)).squeeze(-1)
    per_seq = -(tok * tail_mask).sum(dim=1) / tail_mask.sum(dim=1)
    return per_seq.sum()


def iter_adapter_gradients(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM,
) -> Iterator[torch.Tensor]:
    """Yield each example's gradient of its mean token loss w.r.t. the adapter (flat fp32).

    The coordinates are the tensors of :func:`adapter_parameters` (the adapter state's keys,
    in order, without saved frozen base layers), each flattened, so a gradient can be compared
    coordinate by coordinate with an update flattened over the same keys. The model runs in
    eval mode (no dropout); parameter ``.grad`` fields are left untouched.
    """
    features = encode_examples(tokenizer, examples, max_length=max_length, system_prompt=system_prompt)
    device = _model_device(model)
    pad = _pad_id(tokenizer)
    with adapter_trainable(model) as params, _eval_mode(model), torch.enable_grad():
        tensors = [p for _, p in params]
        for f in features:
            batch = {k: v.to(device) for k, v in collate([f], pad_token_id=pad).items()}
            loss = _supervised_loss(model, batch)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            yield torch.cat(
                [
                    (g if g is not None else torch.zeros_like(t)).detach().reshape(-1).float().cpu()
                    for g, t in zip(grads, tensors, strict=True)
                ]
            )
