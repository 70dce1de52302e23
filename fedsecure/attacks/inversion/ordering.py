"""Ordering the recovered tokens into sequences: a span-checked beam search, and the last token.

Every input of a LoRA site *after* the first attention (the first block's o_proj, MLP and
down_proj inputs, the second block's q/k/v input) at position ``t`` depends only on the
tokens ``0..t`` (causal attention). Its LoRA-A gradient rows lie in the span of those
inputs over all positions that influence the loss. A prefix is extended by a token from
the recovered set only if the new position's input lies in that span (DAGER's check,
applied to the LoRA factor A) **and** adds a direction the prefix did not already have
(a run of one repeated token gives the same vector at every position and would otherwise
pass). The check is exact while the number of positions (over the batch) is below the
number of stacked rows (``modules x r`` per site); beyond it the row space is a strict
subspace and the search ranks candidates by residual instead (best effort, reported as
outside the exact regime).

The last position of a sequence never influences the loss through its input (it has no
next-token target), so its input is in no span; the last token is chosen by *gradient
agreement*: among the model's top predictions and the recovered tokens, the one whose
predicted gradient (by linearity of the loss in the target's logit) agrees best with the
observed update on the last decoder layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsecure.attacks.inversion._layout import LoraLayout, noise_floor, stacked_rows
from fedsecure.attacks.inversion._model import PrefixCache, PrefixStack, decoder_parts, stack_sites
from fedsecure.attacks.inversion.recovery import RowSpace, expected_residual, row_space
from fedsecure.models.loss import IGNORE_INDEX


@dataclass(frozen=True)
class SiteCheck:
    """One span check of the ordering search.

    A-route: ``basis`` spans the site's stacked A-update rows; a candidate input ``x``
    passes when ``x`` lies in it. B-route (``projector`` set, the module's global ``A``):
    the rows of a module's B-update lie in ``span{A x_t}``, so ``A x`` must lie in it.
    """

    site: tuple[str, int]
    space: RowSpace
    projector: torch.Tensor | None = None
    label: str = ""
    spread: torch.Tensor | None = None
    """Per kept direction, the expected angular error of its estimate: ``sqrt(d - k) / sigma_i``
    for rows whitened against their noise (None: noise-free rows)."""

    def tolerance(self, coords: torch.Tensor) -> torch.Tensor:
        """Expected residual of a *true* input with basis coordinates ``coords`` (``... x k``).

        Noise perturbs the estimate of the i-th direction by about ``sqrt(d - k) / sigma_i``,
        so a true input leaves a residual ``rho = sqrt(sum_i c_i^2 (d - k) / sigma_i^2)``
        plus float32 arithmetic (``COMPUTE_FLOOR``).
        """
        return expected_residual(coords, self.spread)


def ordering_checks(
    delta: Mapping[str, torch.Tensor],
    layout: LoraLayout,
    *,
    rank_tol: float,
    global_state: Mapping[str, torch.Tensor] | None = None,
    route: str = "A",
    noise: Mapping[str, float] | None = None,
    depth: int = 1,
    num_layers: int | None = None,
) -> list[SiteCheck]:
    """Span checks of every ordering site that carries LoRA modules with a non-zero update.

    ``route="A"`` stacks the sites' A-update rows; ``route="B"`` gives one check per module
    from its B-update and the global ``A`` (informative only while positions < r).
    """
    out: list[SiteCheck] = []
    layers = num_layers if num_layers is not None else 1 + max(m.layer for m in layout.modules)
    for site in stack_sites(depth, layers):
        mods = layout.at_site(*site)
        if not mods:
            continue
        if route == "A":
            rows = stacked_rows(delta, mods, noise=noise)
            if rows.shape[0] == 0:
                continue
            floor = noise_floor(rows, whitened=noise is not None)
            space = row_space(rows, rank_tol=rank_tol, floor=floor)
            out.append(SiteCheck(site, space, None, f"{site[0]}{site[1]}:A", space.spread(whitened=noise is not None)))
        else:
            if global_state is None:
                raise ValueError("the B-route needs the global adapter (its A matrices)")
            for m in mods:
                rows = stacked_rows(delta, [m], noise=noise, which="B")
                if rows.shape[0] == 0:
                    continue
                floor = noise_floor(rows, whitened=noise is not None)
                space = row_space(rows, rank_tol=rank_tol, floor=floor)
                out.append(
                    SiteCheck(
                        site,
                        space,
                        global_state[m.key_a].detach().float(),
                        f"{site[0]}{site[1]}:{m.module}:B",
                        space.spread(whitened=noise is not None),
                    )
                )
    return out


@dataclass(frozen=True)
class OrderedSequence:
    """One reconstructed sequence (without its last token until :func:`choose_last_tokens`)."""

    token_ids: tuple[int, ...]
    residual: float
    """Largest span residual along the sequence (0 = every position in the span)."""
    complete: bool
    """True when every position passed the span check (the search ended because no extension
    passed, or at the length bound); False for best-effort (saturated) sequences."""
    bridged: int = 0
    """Positions that failed the check but were bridged (their successors passed again): a
    position whose gradient sits below the noise. Nonzero means the sequence is not fully checked."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def beam_order(
    block: PrefixStack,
    token_set: Sequence[int],
    checks: Sequence[SiteCheck],
    *,
    max_len: int,
    beam_width: int,
    threshold: float,
    novelty_tol: float = 1e-3,
    exact: bool = True,
    max_bridge: int = 0,
) -> list[OrderedSequence]:
    """Grow prefixes one position at a time; return the sequences that ended (and the survivors).

    Parameters
    ----------
    block:
        The incremental first block (adapter already set to the global state the client used).
    token_set:
        Candidate tokens (the recovered set).
    checks:
        Span checks of the ordering sites (:func:`ordering_checks`).
    max_len:
        Longest prefix to grow (the sequence length bound, without the last token).
    beam_width:
        Most prefixes kept per position.
    threshold:
        Largest normalised span residual ``z = residual / expected residual of a true input``
        (:meth:`SiteCheck.tolerance`) for an extension to pass, in exact mode.
    novelty_tol:
        Least relative component of the new position's input outside the prefix's own inputs.
    exact:
        ``True``: keep only extensions that pass the span check; ``False`` (row spaces
        saturated): keep the ``beam_width`` extensions with the smallest residuals and run
        to ``max_len``.
    max_bridge:
        Exact mode: most consecutive positions that may fail the check and still be kept (after
        every passing extension, best residual first) -- positions whose gradient is below the
        noise. A bridge stays only if a later position passes again; a sequence is recorded up
        to its last passing position, with the number of bridges it contains.
    """
    if not token_set or not checks:
        return []
    toks = torch.tensor(list(token_set), dtype=torch.long)
    cache: PrefixCache = block.empty()
    prefixes: list[list[int]] = [[]]
    worst = torch.zeros(1)
    own: dict[int, torch.Tensor] = {}  # check index -> P x w x L orthonormal prefix bases
    finished: list[OrderedSequence] = []
    by_site: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(checks):
        by_site.setdefault(c.site, []).append(i)
    prune = max(3.0 * threshold, threshold + 4.0)
    bridge_rank = 1e6  # bridged extensions rank after every passing one
    fails = torch.zeros(1, dtype=torch.long)  # per prefix: consecutive failed (bridged) positions at its end
    clean = [0]  # per prefix: length up to its last passing position
    clean_worst = [0.0]  # per prefix: worst score over its passing positions
    bridges = [0]  # per prefix: bridged positions followed by a passing one

    def record(p: int, complete: bool) -> None:
        n = clean[p]
        if n:
            finished.append(OrderedSequence(tuple(prefixes[p][:n]), clean_worst[p], complete, bridges[p]))

    def zscores(index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check = checks[index]
        if check.projector is not None:
            x = x @ check.projector.T
        x = _unit(x.float())
        u = check.space.basis.float()
        coords = x @ u
        return (x - coords @ u.T).norm(dim=-1) / check.tolerance(coords), x

    def keep(site, inputs, parent, tok_idx):  # prune between blocks on the attention-input checks
        mask = torch.ones(inputs.shape[0], dtype=torch.bool)
        for i in by_site.get(site, []):
            z, _ = zscores(i, inputs)
            mask &= z < prune
        return mask | (fails[parent] < max_bridge)  # a prefix that may still bridge keeps every candidate

    for pos in range(max_len):
        ext = block.extend(cache, toks, pos, keep=keep if exact else None)
        p_count = len(prefixes)
        count = ext.parent.numel()
        z2 = torch.zeros(count)
        used = 0
        nov = torch.zeros(count)
        unit_sites: dict[int, torch.Tensor] = {}
        for index, check in enumerate(checks):
            if check.site not in ext.sites:
                continue
            z, x = zscores(index, ext.sites[check.site])
            unit_sites[index] = x
            z2 += z.pow(2)
            used += 1
            if index in own and own[index].shape[-1] > 0:
                qb = own[index][ext.parent]  # N x w x L
                coef = torch.einsum("nw,nwl->nl", x, qb)
                rest = x - torch.einsum("nl,nwl->nw", coef, qb)
                nov = torch.maximum(nov, rest.norm(dim=-1))
            else:
                nov = torch.ones_like(nov)
        score_all = (z2 / max(used, 1)).sqrt()  # root-mean-square z over the independent checks
        ok = nov > novelty_tol
        bridge = torch.zeros_like(ok)
        if exact:
            bridge = ok & (score_all >= threshold) & (fails[ext.parent] < max_bridge)
            ok &= score_all < threshold
        score = torch.where(ok, torch.maximum(score_all, worst[ext.parent]), torch.full_like(score_all, math.inf))
        score = torch.where(bridge, torch.maximum(bridge_rank + score_all, worst[ext.parent]), score)
        order = torch.argsort(score)
        chosen = [int(i) for i in order[:beam_width] if math.isfinite(float(score[i]))]
        parents_alive = {int(ext.parent[i]) for i in chosen}
        ok_parents = set(ext.parent[ok].tolist())
        for p in range(p_count):
            if p not in parents_alive and prefixes[p] and (exact or p not in ok_parents):
                if exact:
                    record(p, True)
                else:
                    finished.append(OrderedSequence(tuple(prefixes[p]), float(worst[p]), True))
        if not chosen:
            break
        idx = torch.tensor(chosen)
        cache = block.append(cache, ext, idx)
        new_own = {}
        for index, x in unit_sites.items():
            pick = x[idx]  # K x w
            if index in own and own[index].shape[-1] > 0:
                qb = own[index][ext.parent[idx]]
                pick = pick - torch.einsum("kl,kwl->kw", torch.einsum("kw,kwl->kl", pick, qb), qb)
                new_own[index] = torch.cat([qb, _unit(pick).unsqueeze(-1)], dim=-1)
            else:
                new_own[index] = _unit(pick).unsqueeze(-1)
        own = new_own
        passed = [bool(ok[i]) for i in chosen]
        par = [int(ext.parent[i]) for i in chosen]
        clean = [len(prefixes[q]) + 1 if g else clean[q] for q, g in zip(par, passed)]
        clean_worst = [
            max(clean_worst[q], float(score_all[i])) if g else clean_worst[q] for q, g, i in zip(par, passed, chosen)
        ]
        bridges = [bridges[q] + int(fails[q]) if g else bridges[q] for q, g in zip(par, passed)]
        fails = torch.tensor([0 if g else int(fails[q]) + 1 for q, g in zip(par, passed)], dtype=torch.long)
        prefixes = [[*prefixes[q], int(toks[int(ext.token[i])])] for q, i in zip(par, chosen)]
        worst = score[idx].clone()
    else:
        for p, pre in enumerate(prefixes):  # reached the length bound: ended by truncation
            if exact:
                record(p, True)
            else:
                finished.append(OrderedSequence(tuple(pre), float(worst[p]), exact))
    return finished


def assistant_label_fn(tokenizer: object) -> Callable[[Sequence[int]], list[int]]:
    """The public labelling rule of chat fine-tuning: supervise tokens after the last assistant header.

    Returns a function ``ids -> labels`` (``-100`` outside the response). When the header
    is absent every token but the first is supervised.
    """
    header: list[int] = []
    try:
        msgs = [{"role": "user", "content": "x"}]
        with_gen = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
        without = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)  # type: ignore[attr-defined]
        suffix = with_gen[len(without) :] if with_gen.startswith(without) else ""
        if suffix:
            header = list(tokenizer(suffix, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    except (ValueError, AttributeError, TypeError, KeyError):
        header = []

    def labels(ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        start = 1
        if header:
            h = len(header)
            for i in range(len(ids) - h, -1, -1):
                if ids[i : i + h] == header:
                    start = i + h
                    break
        return [IGNORE_INDEX] * start + ids[start:]

    return labels


def choose_last_tokens(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    observed: Mapping[str, torch.Tensor],
    layout: LoraLayout,
    *,
    label_fn: Callable[[Sequence[int]], list[int]],
    candidates: Sequence[int] = (),
    top_k: int = 8,
    candidate_rank: int = 256,
    shortlist: int = 16,
    exact_shortlist: int = 16,
    last_layers: int = 2,
    sweeps: int = 2,
    agreement_tol: float = 1e-3,
) -> tuple[list[int], list[float]]:
    """Pick the last token of each prefix by agreement with the observed update.

    The batch loss is ``mean_b (1/N_b) sum_j CE_bj``; only the last target of sequence
    ``b`` depends on its unknown last token ``c_b``, through ``-z_{b,c_b}/(B N_b)`` (its
    logit), so the predicted gradient is ``grad L0 - sum_b grad z_{b,c_b} / (B N_b)`` with
    ``L0`` the loss whose last terms keep only their log-sum-exp. Per sequence the
    candidates are the model's ``top_k`` next tokens, the ``shortlist`` best tokens of the
    whole vocabulary by a linearised agreement score (:func:`_linear_shortlist`, cheap), and
    those of ``candidates`` (the recovered set) among the ``candidate_rank`` most likely;
    their gradients come from one batched backward pass (``is_grads_batched``); coordinate
    ascent maximises the cosine between the predicted gradient and ``-observed`` over the
    LoRA parameters of the ``last_layers`` last layers (only those need a backward pass).
    When the best cosine stays below
    ``1 - agreement_tol`` (the truth is not among the guesses: an unexpected word; the true
    tokens reach ~1 - 1e-4 on SmolLM2 with a batch of 4, float32 prediction error), the
    ``exact_shortlist`` best tokens of the whole vocabulary by an exact per-sequence score
    (:func:`_gauss_newton_shortlist`) join the candidates and the ascent runs again.

    Returns the chosen token and the best cosine per prefix.
    """
    parts = decoder_parts(model)
    n_layers = len(parts.layers)
    use_layers = set(range(max(0, n_layers - last_layers), n_layers))
    mods = [m for m in layout.modules if m.layer in use_layers]
    named = dict(model.named_parameters())
    params: list[torch.nn.Parameter] = []
    keys: list[str] = []
    for m in mods:
        for key in (m.key_a, m.key_b):
            cand = [n for n in named if n.replace(".default", "") == key]
            if not cand:
                raise ValueError(f"model has no parameter for adapter key {key}")
            params.append(named[cand[0]])
            keys.append(key)
    target = -torch.cat([observed[k].detach().float().reshape(-1) for k in keys])
    flags = {n: p.requires_grad for n, p in named.items()}
    for p in named.values():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        lengths = [len(p) for p in prefixes]
        width = max(lengths)
        pad = 0
        ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prefixes):
            ids[b, : len(p)] = torch.tensor(list(p))
            attn[b, : len(p)] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
        logits = out.logits.float()
        hidden = out.hidden_states[-1]
        head = parts.causal_lm.get_output_embeddings().weight
        total = torch.zeros(())
        weights = []
        for b, p in enumerate(prefixes):
            lab = label_fn([*p, 0])  # the last target exists, whatever it is
            lab_t = torch.tensor(lab[1:])  # targets for positions 0..L-1
            mask = lab_t != IGNORE_INDEX
            count = int(mask.sum())
            if count == 0 or not bool(mask[-1]):
                weights.append(0.0)
                continue
            lp = torch.log_softmax(logits[b, : len(p)], dim=-1)
            known = lab_t[:-1].clamp(min=0)
            ce = -(lp[:-1].gather(-1, known.unsqueeze(-1)).squeeze(-1) * mask[:-1]).sum()
            lse = torch.logsumexp(logits[b, len(p) - 1], dim=-1)
            total = total + (ce + lse) / (count * len(prefixes))
            weights.append(1.0 / (count * len(prefixes)))
        g0 = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        base = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(g0, params)])
        options: list[list[int]] = [[] for _ in prefixes]
        contrib: list[torch.Tensor] = [torch.zeros(0, base.numel()) for _ in prefixes]

        def add_options(b: int, new: Sequence[int]) -> None:
            fresh = [c for c in dict.fromkeys(new) if c not in options[b]]
            if not fresh:
                return
            options[b] += fresh
            if weights[b] == 0.0:
                contrib[b] = torch.cat([contrib[b], torch.zeros(len(fresh), base.numel())])
                return
            grads = torch.autograd.grad(
                hidden[b, lengths[b] - 1],
                params,
                grad_outputs=head[fresh].detach(),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            flat = [
                (g if g is not None else torch.zeros(len(fresh), *q.shape)).reshape(len(fresh), -1)
                for g, q in zip(grads, params)
            ]
            contrib[b] = torch.cat([contrib[b], torch.cat(flat, dim=1) * weights[b]])

        tnorm = target.norm().clamp_min(1e-30)

        def ascend() -> tuple[list[int], list[float]]:
            choice = [0] * len(prefixes)
            best_cos = [float("nan")] * len(prefixes)
            for _ in range(sweeps):
                for b in range(len(prefixes)):
                    others = base - sum(contrib[j][choice[j]] for j in range(len(prefixes)) if j != b)
                    pred = others.unsqueeze(0) - contrib[b]
                    cos = (pred @ target) / (pred.norm(dim=1).clamp_min(1e-30) * tnorm)
                    choice[b] = int(torch.argmax(cos))
                    best_cos[b] = float(cos[choice[b]])
            return choice, best_cos

        linear = _linear_shortlist(model, ids, attn, pos, params, base, target, head, lengths, shortlist)
        for b, p in enumerate(prefixes):
            row = logits[b, len(p) - 1].detach()
            top = torch.topk(row, top_k).indices.tolist()
            plausible = set(torch.topk(row, min(candidate_rank, row.numel())).indices.tolist())
            add_options(b, [*top, *linear[b], *(c for c in candidates if c in plausible)])
        choice, best_cos = ascend()
        if exact_shortlist > 0 and min(best_cos) < 1.0 - agreement_tol:
            # the model's guesses do not explain the update: rank the whole vocabulary per sequence
            # (Gauss-Newton shortlist on the last LoRA layer, whose Jacobian is the cheapest) and
            # score the shortlist exactly on all ``last_layers``
            last_layer = max(m.layer for m in mods)
            offsets = [0]
            for q in params:
                offsets.append(offsets[-1] + q.numel())
            sel = [i for i, m in enumerate(m for m in mods for _ in (0, 1)) if m.layer == last_layer]
            cut = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in sel])
            for b in range(len(prefixes)):
                if weights[b] > 0:
                    add_options(
                        b,
                        _gauss_newton_shortlist(
                            hidden[b, lengths[b] - 1], [params[i] for i in sel], base[cut], target[cut], head,
                            exact_shortlist,
                        ),
                    )
            choice, best_cos = ascend()
        return [options[b][choice[b]] for b in range(len(prefixes))], best_cos
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.zero_grad(set_to_none=True)


def _gauss_newton_shortlist(
    hidden: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    base: torch.Tensor,
    target: torch.Tensor,
    head: torch.Tensor,
    k: int,
    *,
    chunk: int = 64,
) -> list[int]:
    """Shortlist one sequence's last token over the whole vocabulary from its Jacobian.

    With ``J`` the Jacobian of the sequence's final hidden state at its last position
    (``hidden``, ``d``) w.r.t. ``params`` and ``u_c`` the output embedding of token ``c``, the
    predicted gradient is ``base - w J^T u_c``. The unknown scale of ``target`` is removed by
    projecting out ``base`` (``t_perp``, also ``v_perp = (J^T u_c)_perp``): the observed
    ``t_perp`` is proportional to ``v_perp`` of the true token, so the score is the cosine
    ``-u_c . J t_perp / |v_perp|``, with ``|v_perp|^2 = u_c^T J J^T u_c - (u_c . J b)^2``.
    ``J`` costs ``d`` vector-Jacobian products (batched), after which every token is scored
    exactly; without the normalisation tokens with a large ``|J^T u_c|`` crowd out the true one.
    """
    if k <= 0:
        return []
    d = hidden.numel()
    total = sum(p.numel() for p in params)
    jac = torch.zeros(d, total)
    eye = torch.eye(d)
    for i in range(0, d, chunk):
        grads = torch.autograd.grad(
            hidden, params, grad_outputs=eye[i : i + chunk], retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )
        rows = min(chunk, d - i)
        jac[i : i + rows] = torch.cat(
            [(g if g is not None else torch.zeros(rows, *q.shape)).reshape(rows, -1) for g, q in zip(grads, params)],
            dim=1,
        )
    b = base / base.norm().clamp_min(1e-30)
    t_perp = target - (target @ b) * b
    with torch.no_grad():
        jt = jac @ t_perp
        jb = jac @ b
        gram = jac @ jac.T
        u = head.detach().float()
        norm2 = ((u @ gram) * u).sum(1) - (u @ jb).pow(2)
        score = -(u @ jt) / norm2.clamp_min(1e-30).sqrt()
    return torch.topk(score, min(k, score.numel())).indices.tolist()


@torch.no_grad()
def _linear_shortlist(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attn: torch.Tensor,
    pos: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    base: torch.Tensor,
    target: torch.Tensor,
    head: torch.Tensor,
    lengths: Sequence[int],
    k: int,
) -> list[list[int]]:
    """Shortlist last tokens over the whole vocabulary with one directional derivative.

    With ``target ~ s (base - sum_b w_b J_b^T u_{c_b})`` (``J_b`` the Jacobian of sequence
    ``b``'s final hidden state at its last position w.r.t. ``params``, ``u_c`` the output
    embedding of token ``c``), the residual ``rho = target / s - base`` gives
    ``-(J_b rho) . u_c ~ w_b u_{c_b}^T J_b J_b^T u_c``, largest near the true ``c_b``.
    ``J_b rho`` for every ``b`` at once is a central finite difference of the final hidden
    states along ``rho``; the scale ``s`` is the least-squares fit of ``target`` on ``base``.
    """
    if k <= 0:
        return [[] for _ in lengths]
    denom = float(base @ base)
    s = float(target @ base) / denom if denom > 0 else 0.0
    if not s > 0:
        return [[] for _ in lengths]
    rho = target / s - base
    flat_theta = torch.cat([p.detach().reshape(-1) for p in params])
    norm_rho = float(rho.norm())
    if norm_rho == 0.0:
        return [[] for _ in lengths]
    eps = 1e-3 * max(float(flat_theta.norm()), 1.0) / norm_rho
    pieces = []
    offset = 0
    for p in params:
        pieces.append(rho[offset : offset + p.numel()].view_as(p))
        offset += p.numel()

    originals = [p.detach().clone() for p in params]

    def final_hidden(step: float) -> torch.Tensor:
        # .data: the autograd graph of the caller's forward pass must not see these writes
        for p, d in zip(params, pieces):
            p.data.add_(d, alpha=step)
        try:
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
            h = out.hidden_states[-1]
            return torch.stack([h[b, n - 1] for b, n in enumerate(lengths)]).float()
        finally:
            for p, o in zip(params, originals):
                p.data.copy_(o)

    h0 = float(final_hidden(0.0).norm())
    step = eps
    diff = torch.zeros(len(lengths), head.shape[1])
    for _ in range(5):  # aim the step at a ~1e-3 relative change of the hidden states
        step = eps
        diff = final_hidden(step) - final_hidden(-step)
        ratio = float(diff.norm()) / (2 * max(h0, 1e-30))
        if 1e-4 <= ratio <= 1e-2:
            break
        eps = step * (1e-3 / ratio if ratio > 0 else 1e6)
    jr = diff / (2 * step)  # B x d
    scores = -(jr @ head.detach().float().T)  # B x V
    return [torch.topk(scores[b], min(k, scores.shape[1])).indices.tolist() for b in range(len(lengths))]
