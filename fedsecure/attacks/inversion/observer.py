"""The federation observer: gradient inversion run by the server on what it really sees."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from fedsecure.attacks.base import Attack, AttackResult, RoundObservation
from fedsecure.attacks.inversion.invert import InversionSettings, TrainFacts, invert_update
from fedsecure.attacks.inversion.malicious import CRAFTS, b_is_zero, craft_adapter
from fedsecure.attacks.inversion.scoring import score_reconstruction
from fedsecure.registry import ATTACKS
from fedsecure.types import AdapterDelta, RoundContext, View

_NUMERIC = (
    "rouge1",
    "rouge2",
    "rougeL",
    "token_precision",
    "token_recall",
    "tokenset_precision",
    "tokenset_recall",
    "exact_match",
    "pii_recovery",
)


@ATTACKS.register("inversion", help="Gradient inversion of LoRA updates by the server (span check + sparse recovery)")
class GradientInversion(Attack):
    """Recover the text a client trained on from its LoRA update (server-side observer).

    Parameters
    ----------
    target_client:
        Client whose update is attacked (None: the ``clients_per_round`` lowest ids present).
    rounds:
        Rounds (0-based) to attack; None: round 0 when ``malicious`` (the crafted round),
        else round 1 (the first round whose adapter has ``B != 0``), or the last round of a
        shorter run.
    clients_per_round:
        How many client updates to attack per attacked round when ``target_client`` is None.
    max_tokens:
        Longest sequence searched (None: the run's ``data.max_length``).
    beam_width:
        Prefixes kept per position by the ordering search.
    malicious:
        The server crafts the adapter it broadcasts in the attacked rounds (see
        :mod:`fedsecure.attacks.inversion.malicious`); the simulation calls
        :meth:`craft_global` before broadcasting.
    craft:
        ``"quiet"`` (A = 0, tiny B; exact for SGD and one-step Adam) or ``"nonzero-b"``.
    craft_scale:
        Standard deviation of the crafted B (default per craft).
    craft_always:
        Craft even when the global B is already non-zero (default: only when B = 0).
    on_aggregate:
        When the transport hides per-client updates (secagg, CKKS) attack the aggregate the
        server does see, reporting it as such; False: report not applicable.
    token_method:
        ``"auto"``, ``"span"`` or ``"sparse"``.
    order_threshold, rank_tol:
        Largest normalised span residual of an ordering extension (residual / what a true
        input leaves under the update's noise); relative singular-value cut.
    last_token_top_k:
        Model predictions tried as each sequence's last token.
    noise_std:
        Extra per-element noise std the server knows is in the update (e.g. public DP
        parameters lr x sigma x C / batch); whitening then keeps only directions above it.
    seed:
        Seed of the crafted adapter.
    keep_details:
        Reconstruction/reference pairs kept (truncated) in the result details.
    """

    name: ClassVar[str] = "inversion"
    threat_model: ClassVar[str] = (
        "honest-but-curious server reading each client's plaintext LoRA update (View.SERVER_PER_CLIENT), "
        "or only the aggregate under secure aggregation; malicious variant: the server also chooses the "
        "adapter it broadcasts"
    )
    needs: ClassVar[frozenset[View]] = frozenset({View.SERVER_PER_CLIENT})
    when: ClassVar[Literal["round", "final"]] = "round"

    def __init__(
        self,
        *,
        target_client: int | None = None,
        rounds: Sequence[int] | None = None,
        clients_per_round: int = 1,
        max_tokens: int | None = None,
        beam_width: int = 16,
        malicious: bool = False,
        craft: str = "quiet",
        craft_scale: float | None = None,
        craft_always: bool = False,
        on_aggregate: bool = True,
        token_method: str = "auto",  # noqa: S107 - a method name, not a secret
        order_threshold: float = 2.0,
        rank_tol: float = 1e-6,
        last_token_top_k: int = 8,
        noise_std: float = 0.0,
        seed: int = 0,
        keep_details: int = 4,
    ) -> None:
        if target_client is not None and (not isinstance(target_client, int) or target_client < 0):
            raise ValueError(f"target_client must be a client id >= 0 or None, got {target_client!r}")
        if rounds is not None:
            if isinstance(rounds, str | bytes) or not all(isinstance(r, int) and r >= 0 for r in rounds):
                raise ValueError(f"rounds must be a list of round numbers >= 0 (0-based) or None, got {rounds!r}")
            rounds = tuple(sorted(set(rounds)))
        if not isinstance(clients_per_round, int) or clients_per_round < 1:
            raise ValueError(f"clients_per_round must be a positive integer, got {clients_per_round!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
        if craft not in CRAFTS:
            raise ValueError(f"craft must be one of {', '.join(CRAFTS)}, got {craft!r}")
        if craft_scale is not None and not craft_scale > 0:
            raise ValueError(f"craft_scale must be > 0, got {craft_scale!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not isinstance(keep_details, int) or keep_details < 0:
            raise ValueError(f"keep_details must be an integer >= 0, got {keep_details!r}")
        # validates the search knobs (raises ValueError naming the key)
        self.settings = InversionSettings(
            token_method=token_method,
            order_threshold=order_threshold,
            rank_tol=rank_tol,
            beam_width=beam_width,
            last_token_top_k=last_token_top_k,
            max_tokens=max_tokens or 128,
        )
        self.target_client = target_client
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.max_tokens = max_tokens
        self.malicious = bool(malicious)
        self.craft = craft
        self.craft_scale = craft_scale
        self.craft_always = bool(craft_always)
        self.on_aggregate = bool(on_aggregate)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.keep_details = keep_details
        self._num_rounds: int | None = None
        self._crafted: set[int] = set()
        self._records: list[dict[str, Any]] = []
        self._skipped: list[str] = []

    # ------------------------------------------------------------------ plumbing
    @property
    def runs_on_aggregate(self) -> bool:
        """Keep this observer under transports that expose only the aggregate."""
        return self.on_aggregate

    def setup(self, *, run_info: Any = None, **_: Any) -> None:
        """Learn the number of rounds (for the default attacked round)."""
        if run_info is not None:
            self._num_rounds = int(run_info.num_rounds)

    def attacked_rounds(self) -> tuple[int, ...]:
        if self.rounds is not None:
            return self.rounds
        first = 0 if self.malicious else 1
        if self._num_rounds is not None:
            first = min(first, self._num_rounds - 1)
        return (first,)

    def applicability(self, views: frozenset[View], *, transport_name: str = "") -> str:
        """Runs with per-client updates, or (``on_aggregate``) on the aggregate; else says why not."""
        if View.SERVER_PER_CLIENT in views:
            return ""
        if self.on_aggregate and View.SERVER_AGGREGATE in views:
            return ""
        have = ", ".join(sorted(v.value for v in views)) or "nothing"
        if View.SERVER_AGGREGATE in views:
            return (
                f"needs each client's update, but transport {transport_name!r} exposes only {have}: the server "
                "sees the sum of the sampled clients' updates, never one client's (set on_aggregate = true to "
                "attack that sum)"
            )
        return f"needs the clients' updates, but transport {transport_name!r} exposes only {have}"

    def craft_global(self, global_state: AdapterDelta, ctx: RoundContext | int) -> AdapterDelta | None:
        """Malicious server: the adapter to broadcast this round (None: send the honest one)."""
        r = ctx.round if isinstance(ctx, RoundContext) else int(ctx)
        if not self.malicious or r not in self.attacked_rounds():
            return None
        if not self.craft_always and not b_is_zero(global_state):
            return None
        self._crafted.add(r)
        return craft_adapter(global_state, craft=self.craft, scale=self.craft_scale, seed=self.seed + r)

    # ------------------------------------------------------------------ observing
    def observe_round(self, obs: RoundObservation) -> None:
        r = obs.ctx.round
        if r not in self.attacked_rounds():
            return
        if obs.model is None or obs.tokenizer is None:
            self._skipped.append(f"round {r}: the observation carries no model/tokenizer")
            return
        facts = TrainFacts.from_config(obs.train_config)
        max_tokens = self.max_tokens or facts.max_length or self.settings.max_tokens
        settings = InversionSettings(**{**_fields(self.settings), "max_tokens": max_tokens})
        targets: list[tuple[str, list[int], AdapterDelta, int]] = []
        if obs.updates:
            partial = View.SERVER_PER_CLIENT not in obs.views
            ups = sorted(obs.updates, key=lambda u: u.client_id)
            if self.target_client is not None:
                ups = [u for u in ups if u.client_id == self.target_client]
                if not ups:
                    self._skipped.append(f"round {r}: client {self.target_client} sent no update")
                    return
            else:
                ups = ups[: self.clients_per_round]
            for u in ups:
                expected = min(u.num_examples, (facts.batch_size or 1) * facts.local_steps)
                targets.append(("client-partial" if partial else "client", [u.client_id], u.delta, expected))
        elif self.on_aggregate and View.SERVER_AGGREGATE in obs.views:
            clients = list(obs.ctx.sampled_clients)
            expected = len(clients) * (facts.batch_size or 1) * facts.local_steps
            targets.append(("aggregate", clients, obs.aggregate, expected))
        else:
            have = ", ".join(sorted(v.value for v in obs.views)) or "nothing"
            self._skipped.append(f"round {r}: no per-client update and no aggregate view (views: {have})")
            return
        for view, clients, delta, expected in targets:
            noise = self.noise_std
            rec = invert_update(
                obs.model,
                obs.tokenizer,
                delta=delta,
                global_state=obs.global_before,
                facts=facts,
                settings=settings,
                expected_sequences=expected,
                crafted=r in self._crafted,
                extra_noise_std=noise,
            )
            if view == "aggregate" and len(clients) > 1:
                rec.notes.append(f"attacked the aggregate of {len(clients)} clients (per-client updates hidden)")
            if view == "client-partial":
                rec.reasons.append("partial view: coordinates hidden by selective encryption read as zero")
                rec.in_regime = False
            refs, examples = _references(obs, clients, facts)
            scored = (
                score_reconstruction(
                    obs.tokenizer,
                    sequences=rec.sequences,
                    references=refs,
                    reference_examples=examples,
                    recovered_token_set=rec.token_set.token_ids,
                    denominator=expected,
                    keep=self.keep_details,
                )
                if refs
                else {"metrics": {}, "pairs": []}
            )
            self._records.append(
                {
                    "round": r,
                    "view": view,
                    "clients": clients,
                    "metrics": scored["metrics"],
                    "pairs": scored["pairs"],
                    **rec.summary(),
                }
            )

    def finish(self) -> AttackResult:
        if not self._records:
            reason = "; ".join(self._skipped) or (
                f"no attacked round ran (rounds {list(self.attacked_rounds())}; the run may be shorter)"
            )
            return AttackResult.not_applicable(self, reason)
        metrics: dict[str, Any] = {}
        for key in _NUMERIC:
            vals = [rec["metrics"].get(key) for rec in self._records]
            vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
            metrics[key] = sum(vals) / len(vals) if vals else float("nan")
        metrics["in_regime"] = all(rec["in_regime"] for rec in self._records)
        metrics["certified"] = all(rec["certified"] for rec in self._records)
        metrics["num_attacked"] = len(self._records)
        views = sorted({rec["view"] for rec in self._records})
        metrics["view"] = ",".join(views)
        reason = ""
        if "aggregate" in views:
            reason = "ran on the aggregate of the sampled clients: the transport hides per-client updates"
        return AttackResult(
            name=self.name,
            threat_model=self.threat_model,
            applicable=True,
            reason=reason,
            metrics=metrics,
            details={"attacks": self._records, "skipped": list(self._skipped), "malicious": self.malicious},
        )


def _fields(settings: InversionSettings) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _references(
    obs: RoundObservation, clients: Sequence[int], facts: TrainFacts
) -> tuple[list[list[int]], list[Mapping[str, Any]]]:
    """The clients' examples tokenised as the clients did (for scoring only)."""
    from fedsecure.data.base import DataError
    from fedsecure.data.tokenize import encode_example

    refs: list[list[int]] = []
    examples: list[Mapping[str, Any]] = []
    for c in clients:
        for ex in obs.ground_truth.get(c, ()):
            try:
                f = encode_example(obs.tokenizer, dict(ex), max_length=facts.max_length or 128)
            except DataError:
                continue
            refs.append(list(f["input_ids"]))
            examples.append(ex)
    return refs, examples
