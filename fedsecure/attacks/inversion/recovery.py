"""Token-set recovery from the first block's LoRA-A gradient (span check and sparse recovery).

In a Llama-family decoder the rotary position encoding is applied *after* the q/k/v
projections, so the input of every first-block q/k/v projection at position ``t`` is
``x_t = RMSNorm(E[token_t])``: a function of the token alone. A LoRA module computes
``W x + s B A x``, so its A-gradient is ``dL/dA = s B^T sum_t g_t x_t^T``: every row of it
is a linear combination of the inputs ``x_t``. Stacking the rows of the first block's
q/k/v A-gradients (``m = modules x r`` rows) gives a matrix ``Y = C X`` whose row space
lies inside ``span{x_t}`` (DAGER, Petrov et al., NeurIPS 2024, for full gradients; here
for the LoRA factor A).

- **Span check** (exact while the number of distinct tokens ``n <= m``): the row space of
  ``Y`` *is* ``span{x_t}``; a vocabulary token belongs to the sequence iff its input
  vector lies in that space (true residuals ~1e-6, false ones >= 0.2 on SmolLM2). At
  ``n = m`` the rows are saturated (rank = rows) but the span is still exact; with
  ``n > m`` it contains no token and the check finds no gap.
- **Sparse recovery** (beyond the bound, ``n >= m``): each row of ``Y`` is an ``n``-sparse
  combination of the ``V`` vocabulary input vectors with a *shared* support; rank-aware
  order-recursive matching pursuit (RA-ORMP, Davies & Eldar 2012) recovers the support
  while it is identifiable. The selected tokens *certify* themselves when they explain
  ``Y`` to numerical precision.

Both use only what an honest-but-curious server sees (the update and the global model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedsecure.attacks.inversion._model import decoder_parts

NOISE_MARGIN = 2.0
"""Signal directions must exceed the noise's spectral norm by this factor."""

COMPUTE_FLOOR = 1e-3
"""Residual of a true input from float32 arithmetic alone (forward pass vs backward pass)."""


def expected_residual(coords: torch.Tensor, spread: torch.Tensor | None) -> torch.Tensor:
    """Residual a *true* input leaves against a noisy basis, from its coordinates (``... x k``).

    Noise of unit variance per entry perturbs the estimate of the i-th right singular
    vector by about ``sqrt(d - k) / sigma_i``; a true input with coordinates ``c`` therefore
    leaves ``rho = sqrt(sum_i c_i^2 (d - k) / sigma_i^2)``, plus float32 arithmetic
    (:data:`COMPUTE_FLOOR`). Dividing a residual by ``rho`` gives a z-like score: true
    inputs score about 1 whatever the noise, false ones far more.
    """
    if spread is None:
        return torch.full(coords.shape[:-1], COMPUTE_FLOOR)
    return COMPUTE_FLOOR + (coords.pow(2) * spread.pow(2)).sum(-1).sqrt()


@dataclass(frozen=True)
class RowSpace:
    """Orthonormal basis of the numerical row space of a stack of gradient rows."""

    basis: torch.Tensor
    """``d x rank`` float64, orthonormal columns."""
    singular_values: torch.Tensor
    """All singular values divided by the largest (float64)."""
    rank: int
    rows: int
    width: int
    scale: float = 1.0
    """The largest singular value (absolute)."""

    def spread(self, *, whitened: bool) -> torch.Tensor | None:
        """``sqrt(d - k) / sigma_i`` per kept direction for whitened rows (None otherwise)."""
        if not whitened or self.rank == 0:
            return None
        sig = self.singular_values[: self.rank] * self.scale
        return (math.sqrt(max(1, self.width - self.rank)) / sig).float()

    @property
    def saturated(self) -> bool:
        """True when the rank reaches the number of rows: the span bound may be exceeded."""
        return self.rank >= min(self.rows, self.width)

    @property
    def gap(self) -> float:
        """Ratio between the last kept and the first dropped singular value (inf if none dropped)."""
        s = self.singular_values
        if self.rank == 0 or self.rank >= s.numel():
            return math.inf
        return float(s[self.rank - 1] / max(float(s[self.rank]), 1e-300))


def row_space(rows: torch.Tensor, *, rank_tol: float, floor: float = 0.0) -> RowSpace:
    """Numerical row space of ``rows`` (``m x d``).

    Parameters
    ----------
    rows:
        Gradient rows stacked (float64 preferred), whitened when ``floor`` > 0.
    rank_tol:
        Relative singular-value threshold; directions below ``rank_tol`` x the largest are
        treated as rounding noise.
    floor:
        Absolute threshold: the spectral norm of the (whitened) noise; directions must
        exceed ``NOISE_MARGIN`` x ``floor``.
    """
    rows = rows.double()
    m, d = rows.shape
    if m == 0 or float(rows.abs().max()) == 0.0:
        return RowSpace(torch.zeros(d, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 0, m, d)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    rel = s / s[0]
    keep = (rel > rank_tol) & (s > NOISE_MARGIN * floor)
    rank = int(keep.sum())
    return RowSpace(vh[:rank].T.contiguous(), rel, rank, m, d, float(s[0]))


@dataclass(frozen=True)
class Atoms:
    """Unit-norm first-block input vectors of the whole vocabulary (the dictionary).

    ``vectors[v]`` is ``RMSNorm(E[v])`` scaled to unit length. Tokens whose vectors are
    identical (untrained special tokens) cannot be told apart; only the lowest id of each
    group stays ``valid`` and ``aliases`` lists the others.
    """

    vectors: torch.Tensor
    valid: torch.Tensor
    aliases: dict[int, tuple[int, ...]] = field(default_factory=dict)


def vocabulary_atoms(model: torch.nn.Module, *, chunk: int = 8192) -> Atoms:
    """Build the dictionary of first-block attention inputs for every vocabulary token."""
    parts = decoder_parts(model)
    emb = parts.embed.weight.detach()
    norm = parts.layers[0].input_layernorm
    out = torch.empty(emb.shape, dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, emb.shape[0], chunk):
            x = norm(emb[i : i + chunk].float().unsqueeze(0)).squeeze(0).float()
            out[i : i + chunk] = x
    n = out.norm(dim=1)
    valid = n > 1e-12
    out = out / n.clamp_min(1e-30).unsqueeze(1)
    _, inverse, counts = torch.unique(torch.round(out * 1e5), dim=0, return_inverse=True, return_counts=True)
    aliases: dict[int, tuple[int, ...]] = {}
    dup_groups = torch.nonzero(counts > 1).flatten().tolist()
    if dup_groups:
        for g in dup_groups:
            ids = torch.nonzero(inverse == g).flatten().tolist()
            aliases[ids[0]] = tuple(ids[1:])
            valid[ids[1:]] = False
    return Atoms(out.contiguous(), valid, aliases)


@dataclass(frozen=True)
class TokenSetRecovery:
    """The recovered token set and how sure the attack is of it."""

    token_ids: tuple[int, ...]
    method: str
    """"span" (exact span check), "sparse" (RA-ORMP) or "none" (nothing to recover)."""
    rank: int
    rows: int
    certified: bool
    """The selected tokens explain the gradient rows to numerical precision."""
    residual: float
    """Relative Frobenius residual of the rows after projection onto the selected tokens' span."""
    margin: float
    """Span check: smallest residual among rejected tokens (nan for sparse recovery)."""
    ambiguous: dict[int, tuple[int, ...]] = field(default_factory=dict)
    note: str = ""


def explained_residual(rows: torch.Tensor, vectors: torch.Tensor) -> float:
    """Relative residual ``||Y - Y P|| / ||Y||`` with ``P`` the projector onto ``span(vectors)``."""
    rows = rows.double()
    total = float(rows.norm())
    if total == 0.0:
        return 0.0
    if vectors.numel() == 0:
        return 1.0
    q, _ = torch.linalg.qr(vectors.double().T)
    return float((rows - rows @ q @ q.T).norm()) / total


def noise_fraction(rows: torch.Tensor, floor: float) -> float:
    """Expected relative residual left by white unit-variance noise in whitened ``rows`` (0 if none)."""
    if floor <= 0 or rows.numel() == 0:
        return 0.0
    return math.sqrt(rows.numel()) / max(float(rows.double().norm()), 1e-300)


def _certify_tol(noise: float) -> float:
    return max(1e-3, 3.0 * noise)


def span_check(
    rows: torch.Tensor,
    atoms: Atoms,
    space: RowSpace,
    *,
    min_gap: float = 5.0,
    noise: float = 0.0,
    whitened: bool = False,
) -> TokenSetRecovery:
    """Every vocabulary token whose input vector lies in the row space.

    In the exact regime (``rank < rows``) the row space is the span of the sequence's token
    vectors, so exactly ``rank`` tokens have a residual at the noise level and every other
    token a residual far larger. At the bound (``rank == rows``) the row space is still the
    span of the tokens when there are exactly ``rows`` of them; with more, it is a strict
    subspace of their span that generically contains none of them, no clear gap appears and
    the chosen tokens do not explain the rows -- so the same certificate decides. Residuals
    are divided by what a true token would leave
    (:func:`expected_residual`), the ``rank`` smallest are taken, and the result is
    certified when the smallest rejected score is at least ``min_gap`` times the largest
    accepted one (and above 3), and the chosen tokens explain the rows (to within
    ``max(1e-3, 3 noise)``, ``noise`` being :func:`noise_fraction`).
    """
    u = space.basis.float()
    spread = space.spread(whitened=whitened)
    vec = atoms.vectors
    res = torch.empty(vec.shape[0], dtype=torch.float32)
    step = 16384
    for i in range(0, vec.shape[0], step):
        x = vec[i : i + step]
        c = x @ u
        res[i : i + step] = (x - c @ u.T).norm(dim=1) / expected_residual(c, spread)
    res[~atoms.valid] = math.inf
    order = torch.argsort(res)
    k = space.rank
    ids = tuple(int(i) for i in order[:k])
    worst_in = float(res[order[k - 1]]) if k else 0.0
    margin = float(res[order[k]]) if k < res.numel() else math.inf
    gap = margin / max(worst_in, 1e-12)
    residual = explained_residual(rows, vec[list(ids)]) if ids else 1.0
    ok = k > 0 and k < space.width and gap >= min_gap and margin > 3.0
    return TokenSetRecovery(
        token_ids=ids,
        method="span",
        rank=space.rank,
        rows=space.rows,
        certified=bool(ok and residual < _certify_tol(noise)),
        residual=residual,
        margin=margin,
        ambiguous={i: atoms.aliases[i] for i in ids if i in atoms.aliases},
        note=f"largest kept score {worst_in:.2g}, smallest rejected {margin:.2g} (residual / expected)",
    )


def sparse_recovery(
    rows: torch.Tensor,
    atoms: Atoms,
    *,
    rank_tol: float,
    max_support: int,
    stop_residual: float = 1e-4,
    floor: float = 0.0,
    noise: float = 0.0,
) -> TokenSetRecovery:
    """Rank-aware order-recursive matching pursuit over the vocabulary input vectors.

    At each step the token chosen maximises ``||U_R^T x~_v||`` where ``U_R`` is an
    orthonormal basis of the residual's row space and ``x~_v`` is the token vector
    orthogonalised against the tokens already chosen (normalised). It stops when the
    residual falls below ``max(stop_residual, 2 noise)`` (relative; ``noise`` from
    :func:`noise_fraction`), when no residual direction stands above the noise ``floor``,
    when (whitened rows, ``floor > 0``) no token explains more residual energy than
    twice the largest that white noise puts along any of the ``V`` directions, or after
    ``max_support`` tokens.
    """
    stop_residual = max(stop_residual, 2.0 * noise)
    # largest energy white unit-variance noise puts along any of the V token directions
    noise_energy = 2.0 * (math.sqrt(rows.shape[0]) + math.sqrt(2.0 * math.log(atoms.vectors.shape[0]))) ** 2
    y = rows.double()
    total = float(y.norm())
    m, d = y.shape
    vec = atoms.vectors
    v_count = vec.shape[0]
    proj2 = torch.zeros(v_count, dtype=torch.float64)  # ||Q^T x_v||^2 for chosen basis Q
    blocked = ~atoms.valid.clone()
    q_cols: list[torch.Tensor] = []
    chosen: list[int] = []
    resid = y.clone()
    residual = 1.0 if total > 0 else 0.0
    s0 = float(torch.linalg.svdvals(y)[0]) if total > 0 else 0.0
    limit = min(max_support, d - 1)
    while residual > stop_residual and len(chosen) < limit:
        _, s, vh = torch.linalg.svd(resid, full_matrices=False)
        keep = int(((s > rank_tol * s0) & (s > NOISE_MARGIN * floor)).sum())
        if keep == 0:
            break
        u = vh[:keep].T.float()
        num = torch.empty(v_count, dtype=torch.float64)
        energy = torch.empty(v_count, dtype=torch.float64) if floor > 0 else None
        rt = resid.T.float()
        step = 16384
        for i in range(0, v_count, step):
            chunk = vec[i : i + step]
            num[i : i + step] = (chunk @ u).double().pow(2).sum(dim=1)
            if energy is not None:
                energy[i : i + step] = (chunk @ rt).double().pow(2).sum(dim=1)
        den = (1.0 - proj2).clamp_min(0.0)
        score = num / den.clamp_min(1e-12)
        score[blocked | (den < 1e-6)] = -1.0
        if energy is not None:
            # whitened rows: a token must explain more energy than noise alone could
            score[energy / den.clamp_min(1e-12) < noise_energy] = -1.0
        best = int(torch.argmax(score))
        if score[best] <= 0:
            break
        chosen.append(best)
        blocked[best] = True
        x = vec[best].double()
        for q in q_cols:
            x = x - (q @ x) * q
        for q in q_cols:  # re-orthogonalise once for stability
            x = x - (q @ x) * q
        x = x / x.norm()
        q_cols.append(x)
        proj2 += (vec @ x.float()).double().pow(2)
        resid = resid - (resid @ x).unsqueeze(1) * x.unsqueeze(0)
        residual = float(resid.norm()) / total
    ids = tuple(chosen)
    return TokenSetRecovery(
        token_ids=ids,
        method="sparse",
        rank=row_space(y, rank_tol=rank_tol, floor=floor).rank if total > 0 else 0,
        rows=m,
        certified=bool(residual < _certify_tol(noise) and len(ids) < d // 2),
        residual=residual,
        margin=math.nan,
        ambiguous={i: atoms.aliases[i] for i in ids if i in atoms.aliases},
    )


def b_route_check(
    b_rows: list[torch.Tensor],
    a_globals: list[torch.Tensor],
    atoms: Atoms,
    *,
    rank_tol: float,
    min_gap: float = 10.0,
) -> TokenSetRecovery:
    """Token set from B-updates when the A-update is zero (round 1 with peft's ``B = 0``).

    ``dL/dB = s sum_t g_t (A x_t)^T``: the rows of a module's B-update lie in
    ``span{A x_t}`` inside ``R^r``. While the sequence has fewer distinct tokens than
    ``r`` that span is a strict subspace and a token belongs iff ``A x_v`` lies in the span
    of some module (each module sees a subset of the positions: q_proj none at position 0).
    A module whose span is all of ``R^r`` tells nothing apart; when every module's is, the
    result is empty and not certified.
    """
    spaces = [row_space(b.double(), rank_tol=rank_tol) for b in b_rows]
    if not spaces or all(sp.rank == 0 for sp in spaces):
        return TokenSetRecovery((), "b-span", 0, 0, False, 1.0, math.nan, note="B-update is zero")
    r = int(a_globals[0].shape[0])
    usable = [(sp, a) for sp, a in zip(spaces, a_globals, strict=True) if 0 < sp.rank < r]
    k_max = max(sp.rank for sp in spaces)
    if not usable:
        return TokenSetRecovery(
            (), "b-span", k_max, r, False, 1.0, math.nan,
            note=f"B-update rows span all of R^{r}: the sequence has >= r distinct tokens, nothing identifiable",
        )
    # A token belongs iff A x_v lies in the B-span of *some* module: a module does not see
    # every position (q_proj at position 0 gets no gradient: a lone query's softmax is 1),
    # so the set is the union of the per-module spans.
    res = torch.full((atoms.vectors.shape[0],), math.inf, dtype=torch.float32)
    for sp, a in usable:
        u = sp.basis.float()
        x = atoms.vectors @ a.float().T  # V x r
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        res = torch.minimum(res, (x - (x @ u) @ u.T).norm(dim=1))
    res[~atoms.valid] = math.inf
    order = torch.argsort(res)
    lo = max(sp.rank for sp, _ in usable)
    hi = min(sum(sp.rank for sp, _ in usable), res.numel() - 1)
    sorted_res = res[order[: hi + 1]].double().clamp_min(1e-12)
    ratios = sorted_res[lo : hi + 1] / sorted_res[lo - 1 : hi]
    k = lo + int(torch.argmax(ratios))  # the number of tokens: where the residuals jump
    ids = tuple(int(i) for i in order[:k])
    worst_in = float(res[order[k - 1]])
    margin = float(res[order[k]])
    gap = margin / max(worst_in, 1e-12)
    return TokenSetRecovery(
        token_ids=ids,
        method="b-span",
        rank=k,
        rows=r,
        certified=bool(gap >= min_gap),
        residual=worst_in,
        margin=margin,
        ambiguous={i: atoms.aliases[i] for i in ids if i in atoms.aliases},
        note=f"largest kept residual {worst_in:.2e}, smallest rejected {margin:.2e}",
    )
