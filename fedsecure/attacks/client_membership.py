"""Client-level membership inference by the server, from individual client updates.

The server of a plain (unprotected) federation sees every client's update
``delta = trained adapter - global adapter``. Local training moves the adapter along a
combination of the gradients of the client's records, taken near the global adapter
``theta_t`` the server sent. Holding candidate records, the server computes each
candidate's gradient at ``theta_t`` and asks which of them the update is made of:

- ``method="decomposition"`` (default): non-negative least squares
  ``min_{w >= 0} || sum_i w_i g_i - (-delta) ||``; the score of candidate ``i`` is its share
  ``w_i / sum_j w_j``. For an Adam-type client optimizer the gradients are first divided,
  coordinate by coordinate, by their root-mean-square over the candidates (Adam normalises
  each coordinate by a running RMS). This is the gradient-matching view of update leakage
  (Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019; Nasr, Shokri, Houmansadr,
  "Comprehensive Privacy Analysis of Deep Learning", IEEE S&P 2019) used as a membership test.
- ``method="cosine"``: ``cos(g_x - mean_candidates g, -delta)``, the plain alignment test
  ("does this record's gradient align with the client's update"). It is much weaker when a
  client trains on many records: every gradient is a small part of the sum (measured in
  docs/membership.md).

Higher score = more likely member (one convention everywhere).

Threat model: an honest-but-curious server that follows the protocol, sees each client's
plaintext update (View.SERVER_PER_CLIENT), knows the global adapter it sent, the base model
and the public training configuration, and holds candidate records. Under secure
aggregation or CKKS the server sees only the aggregate, so the attack is not applicable
(the result says so, with the reason).

Evaluation (not attack input): for each attacked client and round, the candidates are
``records_per_client`` of the client's true training examples (``RoundObservation.ground_truth``,
used only to *label* candidates) and as many non-members. The non-members come from
:attr:`ClientMembershipAttack.candidates_nonmembers`, which :meth:`ClientMembershipAttack.setup`
fills from the dataset's held-out ``nonmembers`` (or the experiment sets before the run);
when it is empty, other clients' records (that the attacked client does not hold) are used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedsecure.attacks.base import Attack, AttackResult, RoundObservation
from fedsecure.attacks.membership import DEFAULT_DELTA, blind_text_auc, example_text, membership_result
from fedsecure.attacks.scoring import adapter_parameters, iter_adapter_gradients
from fedsecure.data.tokenize import DEFAULT_SYSTEM
from fedsecure.registry import ATTACKS
from fedsecure.types import RunInfo, View

__all__ = ["ClientMembershipAttack", "update_alignment_scores", "update_decomposition_scores"]


def _key(example: Mapping[str, Any]) -> tuple[str, str]:
    return (str(example.get("prompt", "")), str(example.get("response", "")))


def _unique(examples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for ex in examples:
        k = _key(ex)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def _candidate_gradients(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    delta: Mapping[str, torch.Tensor],
    max_length: int,
    system_prompt: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N, P]`` per-example adapter gradients, ``[P]`` direction ``-delta``), same coordinate order."""
    keys = [k for k, _ in adapter_parameters(model)]
    missing = [k for k in keys if k not in delta]
    if missing:
        raise ValueError(f"update keys do not match the model's adapter: missing {missing[:3]}")
    direction = -torch.cat([delta[k].detach().reshape(-1).float().cpu() for k in keys])
    grads = torch.stack(
        list(iter_adapter_gradients(model, tokenizer, examples, max_length=max_length, system_prompt=system_prompt))
    )
    return grads, direction


def update_alignment_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    delta: Mapping[str, torch.Tensor],
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM,
    center: bool = True,
) -> np.ndarray:
    """Cosine similarity between each example's adapter gradient and ``-delta``.

    ``model`` must hold the adapter the update started from. ``delta`` is flattened over the
    keys of :func:`fedsecure.attacks.scoring.adapter_parameters`, in the gradients' order.

    With ``center`` (default), the mean gradient over ``examples`` is subtracted from each
    gradient first, removing the direction that records of one distribution share (no
    membership labels are used: the mean is over all candidates scored together).
    """
    grads, direction = _candidate_gradients(
        model, tokenizer, examples, delta=delta, max_length=max_length, system_prompt=system_prompt
    )
    if center and grads.shape[0] >= 2:
        grads = grads - grads.mean(dim=0, keepdim=True)
    dnorm = float(direction.norm())
    gnorm = grads.norm(dim=1)
    dots = grads @ direction
    ok = (gnorm > 0) & (dnorm > 0)
    cos = torch.where(ok, dots / (gnorm * dnorm).clamp(min=1e-30), torch.zeros_like(dots))
    return cos.double().numpy()


def update_decomposition_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    delta: Mapping[str, torch.Tensor],
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM,
    precondition: str = "none",
) -> np.ndarray:
    """Each candidate's share of the update: non-negative least squares of ``-delta`` on the gradients.

    Local SGD from ``theta`` makes ``-delta`` (approximately) a non-negative combination of
    the gradients of the records the client trained on. Solving
    ``min_{w >= 0} || sum_i w_i g_i - (-delta) ||`` over the candidates' gradients ``g_i`` at
    ``theta`` attributes the update to candidates; the score is ``w_i / sum_j w_j`` (0 for
    all when nothing is attributed). Solved in the ``N x N`` Gram space (``N`` candidates),
    so the cost does not grow with the adapter size beyond the gradients themselves.

    ``precondition="rms"`` divides every gradient coordinate by the root-mean-square of that
    coordinate over the candidates before the fit: Adam-type optimizers normalise each
    coordinate by a running RMS of the gradients, so their updates are combinations of
    *normalised* gradients (the scaling uses no membership labels). ``"none"`` fits the raw
    gradients (SGD).
    """
    from scipy.optimize import nnls

    if precondition not in ("none", "rms"):
        raise ValueError(f"precondition must be 'none' or 'rms', got {precondition!r}")
    grads, direction = _candidate_gradients(
        model, tokenizer, examples, delta=delta, max_length=max_length, system_prompt=system_prompt
    )
    g = grads.double()
    if precondition == "rms":
        rms = g.pow(2).mean(dim=0).sqrt()
        g = g / (rms + 1e-12 * float(rms.max().clamp(min=1e-30)))
    gram = g @ g.T
    rhs = g @ direction.double()
    n = gram.shape[0]
    jitter = 1e-10 * float(torch.trace(gram)) / max(1, n) + 1e-30
    chol = torch.linalg.cholesky(gram + jitter * torch.eye(n, dtype=gram.dtype))
    y = torch.linalg.solve_triangular(chol, rhs.unsqueeze(1), upper=False).squeeze(1)
    w, _ = nnls(chol.T.numpy(), y.numpy())
    total = float(w.sum())
    return w / total if total > 0 else np.zeros(n)


@ATTACKS.register("client-membership")
class ClientMembershipAttack(Attack):
    """Server-side client-level membership: which candidate records a client's update is made of.

    Parameters
    ----------
    records_per_client:
        Member candidates per attacked client and round (and as many non-members).
    max_rounds:
        Attack at most this many rounds (the first ones observed); ``None``: every round.
    max_clients_per_round:
        Attack at most this many updates per round (lowest client ids first); ``None``: all.
    max_length:
        Token truncation length; ``None`` reads ``max_length`` from the run's train config
        (``RoundObservation.train_config``), else 128.
    method:
        ``"decomposition"`` (default): each candidate's share in a non-negative least-squares
        fit of the update by the candidates' gradients (:func:`update_decomposition_scores`);
        ``"cosine"``: the cosine between the record's gradient and the update
        (:func:`update_alignment_scores`).
    precondition:
        For ``"decomposition"``: ``"rms"`` (Adam-type client optimizers), ``"none"`` (SGD), or
        ``"auto"``: read ``federation.optimizer`` from the run's (public) training config,
        ``"rms"`` unless it is ``"sgd"`` (and ``"rms"`` when the config is unknown).
    center:
        For ``"cosine"``: subtract the mean gradient of each (client, round)'s candidates
        first; False gives the raw alignment.
    match_source:
        Draw the non-member candidates from the client's own ``source`` (site/locale) when
        enough such records exist, so that members and non-members follow the same
        distribution (with ``natural`` partitions a client's records come from one site; a
        pool of all sites would let a text-only classifier separate them -- see the blind
        baseline in the metrics). Canary copies are never candidates (``canary-exposure``
        measures them).
    num_bootstrap:
        Bootstrap replicates of the AUC interval.
    seed:
        Seed of the candidate sampling, the bootstrap and the epsilon-audit split.

    Attributes
    ----------
    candidates_nonmembers:
        Non-member candidate records (mappings with ``prompt`` and ``response``), drawn from
        the members' distribution and never trained on. The experiment sets it before the
        run (e.g. to the dataset's ``nonmembers``); empty means "use other clients' records".
    claimed_epsilon, delta:
        Set by the experiment when a DP defense ran, to report ``epsilon`` and the empirical
        ``epsilon_lower_bound`` beside the attack's AUC.
    """

    name: ClassVar[str] = "client-membership"
    threat_model: ClassVar[str] = (
        "honest-but-curious server with per-client plaintext updates: it decomposes each client's update "
        "into the gradients of candidate records at the global adapter it sent"
    )
    needs: ClassVar[frozenset[View]] = frozenset({View.SERVER_PER_CLIENT})
    when: ClassVar[Literal["round", "final"]] = "round"

    def __init__(
        self,
        *,
        records_per_client: int = 16,
        max_rounds: int | None = None,
        max_clients_per_round: int | None = None,
        max_length: int | None = None,
        method: str = "decomposition",
        precondition: str = "auto",
        center: bool = True,
        match_source: bool = True,
        num_bootstrap: int = 1000,
        seed: int = 0,
    ) -> None:
        if method not in ("decomposition", "cosine"):
            raise ValueError(f"method must be 'decomposition' or 'cosine', got {method!r}")
        if precondition not in ("auto", "none", "rms"):
            raise ValueError(f"precondition must be 'auto', 'none' or 'rms', got {precondition!r}")

        def positive(name: str, value: Any, minimum: int, optional: bool) -> None:
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"{name} must be {'None or ' if optional else ''}an integer >= {minimum}, got {value!r}"
                )

        positive("records_per_client", records_per_client, 1, False)
        positive("max_rounds", max_rounds, 1, True)
        positive("max_clients_per_round", max_clients_per_round, 1, True)
        positive("max_length", max_length, 2, True)
        positive("num_bootstrap", num_bootstrap, 10, False)
        positive("seed", seed, 0, False)
        self.records_per_client = records_per_client
        self.max_rounds = max_rounds
        self.max_clients_per_round = max_clients_per_round
        self.max_length = max_length
        self.method = method
        self.precondition = precondition
        self.center = bool(center)
        self.match_source = bool(match_source)
        self.num_bootstrap = num_bootstrap
        self.seed = seed
        self.candidates_nonmembers: list[Mapping[str, Any]] = []
        self.claimed_epsilon: float | None = None
        self.delta: float = DEFAULT_DELTA
        self._texts_members: list[str] = []
        self._texts_nonmembers: list[str] = []
        self._members: list[float] = []
        self._nonmembers: list[float] = []
        self._per_client: list[dict[str, Any]] = []
        self._rounds_attacked: list[int] = []
        self._reason = ""

    def setup(self, run_info: RunInfo | None = None, dataset: Any = None) -> None:
        """Called once before training; takes the non-member candidates from ``dataset.nonmembers``.

        Only when :attr:`candidates_nonmembers` was not set explicitly (the dataset object is
        the experimenter's ground truth; the attack uses it to *label* candidates, never to score).
        """
        if dataset is not None and not self.candidates_nonmembers:
            self.candidates_nonmembers = list(getattr(dataset, "nonmembers", ()))

    def _length(self, obs: RoundObservation) -> int:
        if self.max_length is not None:
            return self.max_length
        cfg = obs.train_config
        for holder in (cfg, getattr(cfg, "data", None)):
            value = getattr(holder, "max_length", None) if holder is not None else None
            if value is None and isinstance(holder, Mapping):
                value = holder.get("max_length")
            if isinstance(value, int) and value >= 2:
                return value
        return 128

    def _system_prompt(self, obs: RoundObservation) -> str | None:
        cfg = obs.train_config
        for holder in (cfg, getattr(cfg, "data", None)):
            if holder is not None and hasattr(holder, "system_prompt"):
                return holder.system_prompt
        return DEFAULT_SYSTEM

    def _precondition(self, obs: RoundObservation) -> str:
        if self.precondition != "auto":
            return self.precondition
        fed = getattr(obs.train_config, "federation", None)
        optimizer = str(getattr(fed, "optimizer", "adamw")).lower()
        return "none" if optimizer == "sgd" else "rms"

    def _nonmember_pool(
        self, obs: RoundObservation, client_id: int, members: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        own = {_key(e) for e in obs.ground_truth.get(client_id, ())}
        if self.candidates_nonmembers:
            pool = [e for e in _unique(self.candidates_nonmembers) if _key(e) not in own]
        else:
            others = [e for cid, exs in obs.ground_truth.items() if cid != client_id for e in exs]
            pool = [e for e in _unique(others) if _key(e) not in own and "canary_id" not in e]
        if self.match_source:
            sources = [e.get("source") for e in members if e.get("source") is not None]
            if sources:
                main = max(set(sources), key=sources.count)
                same = [e for e in pool if e.get("source") == main]
                if len(same) >= min(self.records_per_client, len(members)):
                    return same
        return pool

    def observe_round(self, obs: RoundObservation) -> None:
        """Score candidates against every (or the first few) client updates of this round."""
        from fedsecure.models import get_adapter_state, set_adapter_state

        if View.SERVER_PER_CLIENT not in obs.views:
            transport = str(obs.ctx.extra.get("transport", ""))
            self._reason = self.applicability(frozenset(obs.views), transport_name=transport)
            return
        if not obs.updates:
            self._reason = self._reason or "the transport exposes per-client updates, but none arrived"
            return
        if self.max_rounds is not None and len(self._rounds_attacked) >= self.max_rounds:
            return
        if obs.model is None or obs.tokenizer is None:
            raise ValueError(
                "client-membership needs RoundObservation.model and .tokenizer (the shared peft model) to "
                "compute record gradients"
            )
        updates = sorted(obs.updates, key=lambda u: u.client_id)
        if self.max_clients_per_round is not None:
            updates = updates[: self.max_clients_per_round]
        length = self._length(obs)
        system = self._system_prompt(obs)
        model = obs.model
        snapshot = get_adapter_state(model)
        attacked = False
        try:
            set_adapter_state(model, obs.global_before)
            for upd in updates:
                members_pool = [e for e in _unique(obs.ground_truth.get(upd.client_id, ())) if "canary_id" not in e]
                non_pool = self._nonmember_pool(obs, upd.client_id, members_pool)
                n = min(self.records_per_client, len(members_pool), len(non_pool))
                if n == 0:
                    continue
                rng = np.random.default_rng([self.seed, int(obs.ctx.round), int(upd.client_id)])
                mem = [members_pool[int(i)] for i in rng.choice(len(members_pool), size=n, replace=False)]
                non = [non_pool[int(i)] for i in rng.choice(len(non_pool), size=n, replace=False)]
                if self.method == "decomposition":
                    scores = update_decomposition_scores(
                        model, obs.tokenizer, [*mem, *non], delta=upd.delta, max_length=length,
                        system_prompt=system, precondition=self._precondition(obs),
                    )
                else:
                    scores = update_alignment_scores(
                        model, obs.tokenizer, [*mem, *non], delta=upd.delta, max_length=length,
                        system_prompt=system, center=self.center,
                    )
                sm, sn = scores[:n], scores[n:]
                self._texts_members.extend(example_text(e) for e in mem)
                self._texts_nonmembers.extend(example_text(e) for e in non)
                self._members.extend(sm.tolist())
                self._nonmembers.extend(sn.tolist())
                self._per_client.append(
                    {
                        "round": int(obs.ctx.round),
                        "client_id": int(upd.client_id),
                        "num_candidates": 2 * n,
                        "mean_score_members": float(sm.mean()),
                        "mean_score_nonmembers": float(sn.mean()),
                        "auc": _auc(sm, sn),
                    }
                )
                attacked = True
        finally:
            set_adapter_state(model, snapshot)
        if attacked:
            self._rounds_attacked.append(int(obs.ctx.round))
        elif not self._reason:
            self._reason = "no attacked client had both member and non-member candidate records"

    def finish(self) -> AttackResult:
        """The client-level membership result over every attacked (round, client)."""
        if not self._members or not self._nonmembers:
            return AttackResult.not_applicable(
                self, self._reason or "observed no round with per-client updates"
            )
        return membership_result(
            self,
            scores_members=self._members,
            scores_nonmembers=self._nonmembers,
            seed=self.seed,
            num_bootstrap=self.num_bootstrap,
            claimed_epsilon=self.claimed_epsilon,
            delta=self.delta,
            blind_auc=blind_text_auc(self._texts_members, self._texts_nonmembers, seed=self.seed),
            extra_metrics={"rounds_attacked": list(self._rounds_attacked)},
            details={"per_client": list(self._per_client)},
        )


def _auc(sm: np.ndarray, sn: np.ndarray) -> float:
    from fedsecure.metrics import auc

    return float(auc(scores_members=sm, scores_nonmembers=sn))
