"""The inversion pipeline: one observed LoRA update -> reconstructed token sequences.

:func:`invert_update` runs token-set recovery (:mod:`.recovery`), the ordering search and
the last-token choice (:mod:`.ordering`), then checks its own answer: a reconstruction is
*certified* when the inputs it implies explain every stacked gradient row it used to
numerical precision. Before and after, it states whether the update is inside the regime
where the attack is exact, and why not when it is not (see the package docstring for the
conditions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsecure.attacks.inversion._layout import LoraLayout, noise_floor, quantisation_noise, stacked_rows
from fedsecure.attacks.inversion._model import PrefixStack, decoder_parts
from fedsecure.attacks.inversion.ordering import (
    OrderedSequence,
    SiteCheck,
    assistant_label_fn,
    beam_order,
    choose_last_tokens,
    ordering_checks,
)
from fedsecure.attacks.inversion.recovery import (
    Atoms,
    TokenSetRecovery,
    b_route_check,
    explained_residual,
    noise_fraction,
    row_space,
    span_check,
    sparse_recovery,
    vocabulary_atoms,
)
from fedsecure.models.lora import get_adapter_state, set_adapter_state

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class TrainFacts:
    """What the server knows about the clients' local training (the public recipe).

    Attributes
    ----------
    optimizer: "sgd", "adam" or "adamw".
    lr: learning rate (needed to undo weight decay and to test Adam's linear regime).
    weight_decay: decoupled (SGD/AdamW) weight decay.
    local_steps: optimizer steps per round.
    batch_size: examples per step.
    max_length: longest training sequence in tokens.
    """

    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 0.0
    local_steps: int = 1
    batch_size: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")

    @classmethod
    def from_config(cls, config: Any) -> TrainFacts:
        """Read an :class:`~fedsecure.config.ExperimentConfig` (or return defaults for ``None``)."""
        if config is None:
            return cls()
        if isinstance(config, TrainFacts):
            return config
        fed = getattr(config, "federation", None)
        data = getattr(config, "data", None)
        if fed is None:
            return cls()
        steps = fed.local_steps if fed.local_steps is not None else 1
        return cls(
            optimizer=str(fed.optimizer),
            lr=float(fed.lr),
            weight_decay=float(fed.weight_decay),
            local_steps=int(steps),
            batch_size=int(fed.batch_size),
            max_length=int(data.max_length) if data is not None else None,
        )


@dataclass(frozen=True)
class InversionSettings:
    """Knobs of :func:`invert_update` (defaults measured on SmolLM2-135M and the tiny model).

    Attributes
    ----------
    rank_tol: relative singular value below which a gradient direction is rounding noise.
    span_gap: least ratio (smallest rejected / largest accepted score) for a certified span check.
    token_method: "auto" (span check inside the bound, sparse recovery beyond), "span" or "sparse".
    max_support: most tokens sparse recovery may select (None: min(d/2, max_tokens x sequences)).
    order_threshold: largest normalised span residual (residual / what a true input leaves) for an
        ordering extension to pass.
    novelty_tol: least new-direction component a position must add to its prefix.
    beam_width: most prefixes kept per position (raised to 2 x expected sequences).
    order_depth: decoder blocks evaluated per candidate; every LoRA site they feed (block l's
        o/MLP/down inputs, block l+1's q/k/v input) is an independent span check, and the
        candidate's score is the root-mean-square of its normalised residuals over them.
    max_tokens: longest sequence searched (the training max_length when known).
    last_token_top_k: model predictions tried as the last token (plus the recovered set).
    last_layers: decoder layers whose LoRA update decides the last token.
    max_bridge: most consecutive positions the exact ordering search may pass over when they fail
        the check (gradients below the noise); a bridge is kept only if a later position passes,
        and a bridged order is reported as not checked.
    """

    rank_tol: float = 1e-6
    span_gap: float = 5.0
    token_method: str = "auto"  # noqa: S105 - a method name, not a secret
    max_support: int | None = None
    order_threshold: float = 2.0
    novelty_tol: float = 1e-3
    beam_width: int = 16
    order_depth: int = 4
    max_tokens: int = 128
    last_token_top_k: int = 8
    last_layers: int = 2
    max_bridge: int = 2

    def __post_init__(self) -> None:
        if self.token_method not in ("auto", "span", "sparse"):
            raise ValueError(f"token_method must be 'auto', 'span' or 'sparse', got {self.token_method!r}")
        for name in ("rank_tol", "novelty_tol"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if not self.order_threshold > 0:
            raise ValueError(f"order_threshold must be > 0, got {self.order_threshold!r}")
        if not isinstance(self.max_bridge, int) or self.max_bridge < 0:
            raise ValueError(f"max_bridge must be a non-negative integer, got {self.max_bridge!r}")
        for name in ("beam_width", "order_depth", "max_tokens", "last_token_top_k", "last_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.span_gap <= 1:
            raise ValueError(f"span_gap must be > 1, got {self.span_gap!r}")
        if self.max_support is not None and self.max_support < 1:
            raise ValueError(f"max_support must be >= 1 or None, got {self.max_support!r}")


@dataclass
class Reconstruction:
    """What :func:`invert_update` recovered and how far it can be trusted."""

    sequences: list[tuple[int, ...]]
    token_set: TokenSetRecovery
    route: str
    """"A" (A-update spans), "B" (B-update spans, round 1 with B = 0) or "none"."""
    order_exact: bool
    in_regime: bool
    certified: bool
    reasons: list[str] = field(default_factory=list)
    """Why the update is outside the exact regime (empty when inside)."""
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    last_token_agreement: list[float] = field(default_factory=list)
    explained: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "token_method": self.token_set.method,
            "num_tokens_recovered": len(self.token_set.token_ids),
            "token_rank": self.token_set.rank,
            "token_rows": self.token_set.rows,
            "token_set_certified": self.token_set.certified,
            "order_exact": self.order_exact,
            "in_regime": self.in_regime,
            "certified": self.certified,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "seconds": dict(self.seconds),
            "explained_residual": dict(self.explained),
        }


_ATOM_CACHE: dict[tuple[int, int, int], Atoms] = {}


def cached_atoms(model: torch.nn.Module) -> Atoms:
    """Vocabulary atoms of ``model``, cached while its embedding and first norm are unchanged."""
    from fedsecure.attacks.inversion._model import decoder_parts

    parts = decoder_parts(model)
    emb = parts.embed.weight
    norm_w = parts.layers[0].input_layernorm.weight
    key = (id(emb), emb._version, norm_w._version)
    if key not in _ATOM_CACHE:
        _ATOM_CACHE.clear()
        _ATOM_CACHE[key] = vocabulary_atoms(model)
    return _ATOM_CACHE[key]


def _lora_dropout(model: torch.nn.Module) -> float:
    cfgs = getattr(model, "peft_config", None)
    if not cfgs:
        return 0.0
    return float(max(getattr(c, "lora_dropout", 0.0) or 0.0 for c in cfgs.values()))


def undo_weight_decay(
    delta: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], facts: TrainFacts
) -> dict[str, torch.Tensor]:
    """Remove decoupled weight decay: ``delta + (1 - (1 - lr wd)^K) theta_0`` (SGD, AdamW)."""
    out = {k: v.detach().float().clone() for k, v in delta.items()}
    if facts.weight_decay > 0 and facts.lr is not None and facts.optimizer in ("sgd", "adamw"):
        c = 1.0 - (1.0 - facts.lr * facts.weight_decay) ** facts.local_steps
        for k in out:
            out[k] = out[k] + c * global_state[k].float()
    return out


def linearise_adam_step(update: Mapping[str, torch.Tensor], *, lr: float) -> dict[str, torch.Tensor]:
    """Undo the normalisation of *one* Adam/AdamW step (weight decay already removed).

    torch's first Adam step is ``u = -lr g / (|g| + eps)`` elementwise (the bias corrections
    make ``m_hat = g`` and ``sqrt(v_hat) = |g|``). Solving for ``g`` gives
    ``u lr / (lr - |u|) = -lr g / eps``: a fixed multiple of the gradient, whatever ``eps`` and
    the betas are, so every span property of the gradient holds for the result. Elements with
    ``|u| >= lr`` (|g| >> eps, where the inversion has no precision left) are kept as they are;
    callers use this only in Adam's linear regime (``|u| << lr``).
    """
    out = {}
    for k, u in update.items():
        u = u.detach().double()
        den = lr - u.abs()
        ok = den > 0
        out[k] = torch.where(ok, u * lr / torch.where(ok, den, torch.ones_like(den)), u).float()
    return out


def template_tail(tokenizer: Any) -> tuple[int, list[int]]:
    """(end-of-turn id, tokens the chat template puts after it) -- e.g. ``<|im_end|>``, ``["\\n"]``."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    if eot is None or eot == getattr(tokenizer, "unk_token_id", None) or not getattr(tokenizer, "chat_template", None):
        return -1, []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
        )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return -1, []
    last = max((i for i, t in enumerate(ids) if t == eot), default=-1)
    return (int(eot), ids[last + 1 :]) if last >= 0 else (-1, [])


def invert_update(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    delta: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    facts: TrainFacts | None = None,
    settings: InversionSettings | None = None,
    label_fn: Callable[[Sequence[int]], list[int]] | None = None,
    expected_sequences: int | None = None,
    crafted: bool = False,
    extra_noise_std: float = 0.0,
) -> Reconstruction:
    """Reconstruct the token sequences behind one LoRA update.

    Parameters
    ----------
    model:
        The peft model (base + adapter). Its adapter is set to ``global_state`` while the
        attack runs and restored afterwards.
    tokenizer:
        Its tokenizer (for the chat template's labelling rule).
    delta:
        The observed update: adapter after local training minus ``global_state``.
    global_state:
        The adapter the server sent for this round.
    facts:
        The public training recipe (optimizer, lr, weight decay, local steps, batch size).
    settings:
        Attack knobs.
    label_fn:
        ``ids -> labels`` rule of the training data (default: chat fine-tuning, supervise
        after the last assistant header; tokenizers without a chat template: every token).
    expected_sequences:
        How many sequences the update holds, when the server knows it (batch x steps x clients).
    crafted:
        The server crafted ``global_state`` (malicious variant); used in the regime report.
    extra_noise_std:
        Per-element noise std the server knows the update carries beyond float32 rounding
        (e.g. DP: ``lr x sigma x C / batch`` per step); rows are whitened against it.
    """
    facts = facts or TrainFacts()
    settings = settings or InversionSettings()
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    reasons: list[str] = []
    notes: list[str] = []
    layout = LoraLayout.of(delta)
    missing = [k for k in delta if k not in global_state]
    if missing:
        raise ValueError(f"global_state lacks adapter keys of the update, e.g. {missing[:2]}")
    if label_fn is None:
        label_fn = assistant_label_fn(tokenizer) if getattr(tokenizer, "chat_template", None) else _all_labels
    work = undo_weight_decay(delta, global_state, facts)
    if extra_noise_std < 0:
        raise ValueError(f"extra_noise_std must be >= 0, got {extra_noise_std!r}")
    noise = {k: math.hypot(v, extra_noise_std) for k, v in quantisation_noise(delta, global_state).items()}
    if facts.optimizer == "adam" and facts.weight_decay > 0:
        reasons.append("torch Adam's L2 weight decay enters before the normalisation and cannot be undone")
    p = _lora_dropout(model)
    if p > 0:
        reasons.append(f"LoRA dropout {p} masks the inputs elementwise: gradient rows leave the input span")
    attn0 = layout.at_site("attn", 0)
    if not attn0:
        reasons.append("no LoRA on the first block's q/k/v: the token set has no span to be read from")
    total_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in work.values()))
    a0_norm = math.sqrt(sum(float(work[m.key_a].double().pow(2).sum()) for m in attn0)) if attn0 else 0.0
    route = "A" if a0_norm > 1e-9 * max(total_norm, 1e-300) else "B"
    if facts.optimizer in ("adam", "adamw"):
        if facts.lr is None:
            reasons.append("Adam update with unknown lr: cannot tell whether it is in Adam's linear regime")
        elif attn0:
            peak = max(float(work[m.key_a].abs().max()) for m in attn0) / (facts.lr * facts.local_steps)
            if peak > 1e-2:
                reasons.append(
                    f"Adam normalises every coordinate (max |update| = {peak:.2f} x lr x steps): the update is "
                    "not a linear combination of gradients; the span property holds only approximately "
                    "(a malicious server restores it with a quiet adapter, |g| << Adam's eps)"
                )
            else:
                notes.append(f"Adam in its linear regime (max |update| = {peak:.1e} x lr x steps)")
                if facts.local_steps == 1:
                    work = linearise_adam_step(work, lr=facts.lr)
                    notes.append("one Adam step linearised exactly: u * lr / (lr - |u|) = -lr g / eps")
    if facts.local_steps > 1:
        notes.append(
            f"{facts.local_steps} local steps: the token set is exact for a linear optimizer; the ordering "
            "search checks inputs at the global adapter while the client's adapter moved"
        )
    saved = get_adapter_state(model)
    was_training = model.training
    model.eval()
    try:
        set_adapter_state(model, global_state)
        t0 = time.perf_counter()
        atoms = cached_atoms(model)
        seconds["atoms"] = time.perf_counter() - t0
        # ---- token set
        t0 = time.perf_counter()
        d = int(atoms.vectors.shape[1])
        budget = settings.max_support or min(d // 2, settings.max_tokens * max(1, expected_sequences or 1))
        if not attn0:
            tokset = TokenSetRecovery((), "none", 0, 0, False, 1.0, math.nan, note="no first-block q/k/v LoRA")
        elif route == "B":
            tokset = b_route_check(
                [work[m.key_b] / noise[m.key_b] for m in attn0],
                [global_state[m.key_a] for m in attn0],
                atoms,
                rank_tol=settings.rank_tol,
                min_gap=settings.span_gap,
            )
            if not tokset.certified:
                reasons.append(
                    "round with B = 0 (peft's default init): dL/dA = 0 and the B-update identifies tokens "
                    f"only while there are fewer than r = {layout.rank} of them ({tokset.note}); "
                    "a malicious server sends a non-zero B (malicious=true)"
                )
            else:
                notes.append(f"B-route: {len(tokset.token_ids)} tokens < r = {layout.rank} identified from dL/dB")
        else:
            rows0 = stacked_rows(work, attn0, noise=noise)
            floor0 = noise_floor(rows0, whitened=True)
            frac0 = noise_fraction(rows0, floor0)
            space0 = row_space(rows0, rank_tol=settings.rank_tol, floor=floor0)
            method = settings.token_method
            tokset = None
            if method in ("auto", "span"):
                tokset = span_check(rows0, atoms, space0, min_gap=settings.span_gap, noise=frac0, whitened=True)
                if method == "auto" and space0.saturated and not tokset.certified:
                    # at the bound (rank == rows) the span check is exact only when the tokens are
                    # exactly as many as the rows; otherwise no clear gap appears: sparse recovery
                    tokset = None
            if tokset is None:
                tokset = sparse_recovery(
                    rows0, atoms, rank_tol=settings.rank_tol, max_support=budget, floor=floor0, noise=frac0
                )
            if frac0 > 0.05:
                reasons.append(
                    f"the update is noisy: noise carries {frac0:.0%} of the first block's A-update norm"
                )
            if space0.saturated and tokset.method == "span":
                notes.append(
                    f"token count at the span bound ({space0.rows} rows saturated): the span check found "
                    f"exactly {len(tokset.token_ids)} tokens in the row space"
                    f"{' (certified)' if tokset.certified else ''}"
                )
            elif space0.saturated:
                notes.append(
                    f"token count beyond the span bound ({space0.rows} rows saturated): sparse recovery "
                    f"{'certified' if tokset.certified else 'not certified'} (residual {tokset.residual:.1e})"
                )
            if not tokset.certified:
                reasons.append(
                    f"token set not certified ({tokset.method}: {tokset.note or f'residual {tokset.residual:.1e}'})"
                )
        seconds["token_set"] = time.perf_counter() - t0
        # ---- ordering
        t0 = time.perf_counter()
        sequences: list[tuple[int, ...]] = []
        agreement: list[float] = []
        order_exact = False
        explained: dict[str, float] = {}
        tolerance: dict[str, float] = {}
        if tokset.token_ids:
            n_layers = len(decoder_parts(model).layers)
            checks = ordering_checks(
                work,
                layout,
                rank_tol=settings.rank_tol,
                global_state=global_state,
                route=route,
                noise=noise,
                depth=settings.order_depth,
                num_layers=n_layers,
            )
            limit = layout.rank if route == "B" else None
            # A saturated A-route site (rank == rows < width) still tells inputs apart: its span is the
            # span of the positions' inputs when they are exactly as many as the rows, and generically
            # contains none of them when they are more. So it joins the exact search first (a covering
            # answer is then checked at every site); the unsaturated sites alone come next.
            usable = [c for c in checks if _discriminates(c, limit)]
            unsaturated = [c for c in usable if not _saturated(c, limit)]
            attempts = [a for a in (usable, unsaturated) if a]
            if len(attempts) == 2 and len(attempts[1]) == len(attempts[0]):
                attempts.pop()
            if not checks:
                reasons.append("no LoRA on the sites after the first attention: the order is unobservable")
            block = PrefixStack(model, depth=settings.order_depth)
            block.self_check(list(tokset.token_ids[:8]))
            max_len = min(settings.max_tokens, facts.max_length or settings.max_tokens) - 1
            width = max(settings.beam_width, 2 * (expected_sequences or 1))

            def search(use: Sequence[SiteCheck], *, exact: bool) -> list[OrderedSequence]:
                return beam_order(
                    block,
                    tokset.token_ids,
                    use,
                    max_len=max_len,
                    beam_width=width,
                    threshold=settings.order_threshold,
                    novelty_tol=settings.novelty_tol,
                    exact=exact,
                    max_bridge=settings.max_bridge if exact else 0,
                )

            found: list[OrderedSequence] = []
            prefixes: list[tuple[int, ...]] = []
            for use in attempts:
                found = search(use, exact=True)
                covered = {t for f in found if f.complete and not f.bridged for t in f.token_ids}
                if set(tokset.token_ids) <= covered:
                    order_exact = len(use) == len(checks)
                    prefixes = _pick(found, expected_sequences)
                    break
            else:
                partial = _pick(found, expected_sequences)
                if not unsaturated and checks:
                    why = "more positions than stacked rows at every ordering site"
                elif facts.local_steps > 1:
                    why = f"{facts.local_steps} local steps moved the ordering inputs out of the span"
                else:
                    why = "some positions' ordering inputs are not resolved above the noise"
                if attempts:
                    why += " (no checked sequence covers the token set)"
                ranked = _pick(search(checks, exact=False), expected_sequences) if checks else []
                # below the bound, keep whichever answer explains the ordering sites' rows better: the
                # checked prefixes (which stop where positions sit below the noise) or the ranked best
                # effort; beyond it (every site saturated) nothing is checkable and the ranked order stays
                rows_at = {c.label: stacked_rows(work, layout.at_site(*c.site), noise=noise) for c in checks}
                if (
                    partial
                    and unsaturated
                    and (
                        not ranked
                        or _ordering_residual(block, checks, rows_at, partial)
                        <= _ordering_residual(block, checks, rows_at, ranked)
                    )
                ):
                    prefixes = partial
                    bridged = sum(f.bridged for f in found if f.token_ids in set(partial))
                    reasons.append(
                        f"{why}: the checked prefixes are kept (they explain the ordering rows better than "
                        "a ranked order)"
                        + (f", {bridged} position(s) below the noise bridged unchecked" if bridged else "")
                        + "; positions after them are not recovered"
                    )
                else:
                    prefixes = ranked or partial
                    reasons.append(f"{why}: the order is ranked by span residual (best effort), not checked")
            if attempts and not prefixes:
                order_exact = False
                reasons.append("no sequence passed the span check at every position")
            seconds["ordering"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if prefixes:
                last, agreement = choose_last_tokens(
                    model,
                    prefixes,
                    work,
                    layout,
                    label_fn=label_fn,
                    candidates=list(tokset.token_ids)[:64],
                    top_k=settings.last_token_top_k,
                    last_layers=settings.last_layers,
                    # the whole-vocabulary shortlist (d backward passes per sequence) only where the
                    # prefixes are checked: otherwise no candidate's gradient can match the update
                    exact_shortlist=16 if order_exact else 0,
                )
                eot, tail = template_tail(tokenizer)
                for pre, tok in zip(prefixes, last, strict=True):
                    seq = [*pre, tok]
                    cap = facts.max_length or settings.max_tokens
                    if tok == eot and tail:
                        seq.extend(tail[: max(0, cap - len(seq))])
                    sequences.append(tuple(seq))
            seconds["last_token"] = time.perf_counter() - t0
            # ---- certificate: the reconstruction explains the rows it was read from
            if route == "A" and prefixes:
                used = sorted({t for pre in prefixes for t in pre})
                rows = stacked_rows(work, attn0, noise=noise)
                r0 = explained_residual(rows, atoms.vectors[used])
                explained["first_block"] = r0
                tolerance["first_block"] = max(1e-3, 3 * noise_fraction(rows, 1.0))
                per_site = [block.sites_for_sequence(list(pre)) for pre in prefixes]
                for c in checks:
                    vecs = torch.cat([s[c.site] for s in per_site]).double()
                    rows = stacked_rows(work, layout.at_site(*c.site), noise=noise)
                    explained[c.label] = explained_residual(rows, vecs)
                    tolerance[c.label] = max(1e-3, 3 * noise_fraction(rows, 1.0))
        explains = bool(explained) and all(v < tolerance[k] for k, v in explained.items())
        certified = bool(explains and tokset.certified and order_exact)
        if explained and not explains:
            worst = max(explained[k] / tolerance[k] for k in explained)
            reasons.append(
                f"the reconstruction leaves {worst:.1f} x the tolerated residual of the update unexplained"
            )
        if crafted:
            notes.append("the server crafted the adapter it sent (malicious variant)")
        in_regime = bool(not reasons and tokset.certified and order_exact)
        seconds["total"] = time.perf_counter() - t_all
        return Reconstruction(
            sequences=sequences,
            token_set=tokset,
            route=route if attn0 else "none",
            order_exact=order_exact,
            in_regime=in_regime,
            certified=certified,
            reasons=reasons,
            notes=notes,
            seconds=seconds,
            last_token_agreement=agreement,
            explained=explained,
        )
    finally:
        set_adapter_state(model, saved)
        model.train(was_training)


def _saturated(check: SiteCheck, limit: int | None) -> bool:
    if limit is not None:
        return check.space.rank >= limit
    return check.space.saturated


def _discriminates(check: SiteCheck, limit: int | None) -> bool:
    """Whether a site's span can reject inputs: not the whole space it lives in.

    B-route spans live in ``R^r``: saturated, they are all of it. A-route spans saturated at
    ``rows < width`` are a strict subspace that still rejects every input not in it.
    """
    if limit is not None:
        return check.space.rank < limit
    return 0 < check.space.rank < check.space.width


def _pick(found: Sequence[OrderedSequence], expected: int | None) -> list[tuple[int, ...]]:
    """The best distinct sequences of a search (complete ones first, by residual).

    Fully checked sequences come before bridged ones (a position below the noise passed over).
    A sequence that is a strict prefix of another kept one is dropped: it is the same sequence
    cut short (its extensions left the beam, or a bridge continued it).
    """
    complete = [f for f in found if f.complete and f.token_ids] or [f for f in found if f.token_ids]
    uniq: dict[tuple[int, ...], float] = {}
    for f in sorted(complete, key=lambda f: (f.bridged > 0, f.residual, -len(f.token_ids))):
        uniq.setdefault(f.token_ids, f.residual)
    longest_first = sorted(uniq, key=len, reverse=True)
    kept = [
        seq for seq in uniq if not any(len(o) > len(seq) and o[: len(seq)] == seq for o in longest_first)
    ]
    return kept[:expected] if expected is not None else kept


def _ordering_residual(
    block: PrefixStack,
    checks: Sequence[SiteCheck],
    rows_at: Mapping[str, torch.Tensor],
    prefixes: Sequence[Sequence[int]],
) -> float:
    """Mean over the ordering sites of the rows' relative residual outside the prefixes' inputs."""
    per_site = [block.sites_for_sequence(list(p)) for p in prefixes]
    out = []
    for c in checks:
        if c.projector is not None:
            continue
        vecs = torch.cat([s[c.site] for s in per_site]).double()
        out.append(explained_residual(rows_at[c.label], vecs))
    return sum(out) / len(out) if out else math.inf


def _all_labels(ids: Sequence[int]) -> list[int]:
    return list(ids)
