"""The ``secagg`` transport: SecAgg+ run in-process, one state machine per party.

Bonawitz et al. (CCS'17) double masking with Shamir-shared dropout recovery, on the
sparse k-regular neighbour graph of Bell et al. (CCS'20). See :mod:`.protocol` for the
threat model (honest-but-curious server colluding with fewer than t neighbours of any
client, plus the cheap malicious-server checks) and :mod:`.graph` for the choice of k, t.

In simulation this object plays every party, but each party only ever sees the messages
the protocol gives it: the server object receives masked vectors and shares, never a
plaintext update, so the run exposes only ``View.SERVER_AGGREGATE``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsecure._hazmat import agreement as ka
from fedsecure._hazmat import prg as _prg
from fedsecure._hazmat.quantisation import (
    FixedPoint,
    dequantise,
    fits,
    no_wrap_scale,
    sum_error_bound,
)
from fedsecure.defenses.secagg.graph import (
    GraphParameters,
    check_graph,
    derive_graph,
    graph_failure_bounds,
)
from fedsecure.defenses.secagg.protocol import (
    STAGES,
    MaskedInput,
    RoundSetup,
    SecAggClient,
    SecAggError,
    SecAggServer,
    new_nonce,
)
from fedsecure.federation.transport import Sealed, SealedSum, Transport
from fedsecure.registry import TRANSPORTS
from fedsecure.types import AdapterDelta, ClientUpdate, InvalidUpdateError, RoundContext, RunInfo, View


@dataclass
class _RingSum:
    """SealedSum payload: the unmasked ring sum and how to decode it."""

    ring_sum: np.ndarray
    spec: FixedPoint
    layout: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass
class _Round:
    ctx: RoundContext
    setup: RoundSetup
    graph: GraphParameters
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    server: SecAggServer
    clients: dict[int, SecAggClient]
    forwarded: dict[int, Any]
    drops: dict[str, set[int]]
    bytes: dict[int, dict[str, list[int]]]
    client_seconds: dict[str, list[float]] = field(default_factory=dict)
    dropped_at: dict[str, list[int]] = field(default_factory=dict)
    clipped: int = 0
    recorded: bool = False


def _empty_bytes() -> dict[str, list[int]]:
    return {s: [0, 0] for s in STAGES}


def _stats(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": float(np.mean(xs)), "max": float(np.max(xs))}


@TRANSPORTS.register(
    "secagg", help="SecAgg+ pairwise masking with dropout recovery: the server sees only the sum"
)
class SecAggTransport(Transport):
    """Secure aggregation by pairwise masking (SecAgg+), with dropout recovery.

    The server learns only the (weighted, quantised) sum of the surviving clients'
    updates. Each round: fresh X25519 key pairs, a fresh random k-regular neighbour
    graph, t-of-k Shamir shares of every client's self-mask seed and mask key exchanged
    under ChaCha20-Poly1305 through the server, AES-128-CTR masks over Z_{2^32}.

    Parameters
    ----------
    clip_range:
        Per-coordinate bound c on the *unweighted* delta; larger values are clipped to
        [-c, c] (the client warns). The quantisation error scales with it.
    bits:
        Quantisation resolution: one unit-weight coordinate is encoded with step
        ``clip_range / 2**bits``. ``None`` (default): the finest step the ring admits
        for this round's number of clients and ``max_weight`` (see below).
    ring_bits:
        32 (default; upload = 1.0x the fp32 payload) or 64 (2x; for very large
        ``clients * max_weight`` or explicit large ``bits``).
    neighbours:
        Graph degree k (even); ``None`` derives the smallest k meeting 2^-security_bits
        privacy and 2^-correctness_bits correctness failure for the round's n clients
        and the two fraction bounds (:func:`fedsecure.defenses.secagg.graph.derive_graph`);
        k >= n-1 means the complete graph (Bonawitz et al.).
    threshold:
        Shamir threshold t, a strict majority of k; ``None`` derives it with k.
    max_dropout_fraction:
        Bound delta on the fraction of a round's clients that drop out (at any stage).
        ``None``: max(0.1, federation.dropout_rate + the sum of ``stage_dropout_rates``)
        (the simulation drops floor(dropout_rate * n) clients per round, within the bound);
        for rounds too small to tolerate that at the privacy target (e.g. 3 clients), it
        falls back to the planned rate alone, with a warning.
        More dropouts than the bound may abort the round (never a wrong or leaky result).
    max_corrupt_fraction:
        Bound gamma on the fraction of clients colluding with the server.
    max_weight:
        Largest FedAvg weight (``num_examples``) a client may use. ``None``: from
        ``setup(run)`` (the largest client dataset, or batch_size * local_steps if
        larger). A larger weight is rejected with an error naming the client.
    stochastic_rounding:
        Unbiased stochastic rounding (coins from AES-CTR with an ``os.urandom`` key)
        instead of round-to-nearest; doubles the worst-case error bound.
    signed_keys:
        Sign each round's advertised keys with long-term Ed25519 identity keys (a
        simulated PKI), so that a malicious server cannot substitute keys.
    prg:
        ``"aes128-ctr"`` (default) or ``"chacha20"`` mask expansion.
    security_bits, correctness_bits:
        sigma and eta of the (k, t) derivation (Bell et al.: 40 and 30).
    stage_dropout_rates:
        Simulation only: probability that each client drops at each stage,
        e.g. ``{"advertise_keys": 0.02, "unmask": 0.05}`` (seeded by the round).

    Ring size, no wrap-around: with n clients this round, weights <= W = max_weight
    and |x| <= c, the scale is s = (2^(R-1)(1 - 2^-40) - 1 - 2n) / (n W c) (or 2^bits / c
    when ``bits`` is set, which must satisfy the same inequality). Every client's integer
    is at most c W s (1 + 3*2^-53) + 1 in magnitude, so the sum of n of them stays below
    2^(R-1) - 1 and its two's-complement reading is exact (proof in
    :mod:`fedsecure._hazmat.quantisation`; every client re-checks it). The opened weighted
    sum is within n (r + 4*2^-53 c W s) / s of sum_i w_i clip(x_i) per coordinate, r = 1/2
    for nearest and 1 for stochastic rounding (``SealedSum.cost["quantisation_error_bound"]``).
    """

    name = "secagg"
    exposes = frozenset({View.SERVER_AGGREGATE})

    def __init__(
        self,
        *,
        clip_range: float = 1.0,
        bits: int | None = None,
        ring_bits: int = 32,
        neighbours: int | None = None,
        threshold: int | None = None,
        max_dropout_fraction: float | None = None,
        max_corrupt_fraction: float = 0.1,
        max_weight: float | None = None,
        stochastic_rounding: bool = False,
        signed_keys: bool = False,
        prg: str = "aes128-ctr",
        security_bits: int = 40,
        correctness_bits: int = 30,
        stage_dropout_rates: Mapping[str, float] | None = None,
    ) -> None:
        def bad(param: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"transport 'secagg': {param}={value!r} is invalid; {allowed}")

        if (
            isinstance(clip_range, bool)
            or not isinstance(clip_range, (int, float))
            or not (math.isfinite(clip_range) and clip_range > 0)
        ):
            raise bad("clip_range", clip_range, "use a positive number (max |delta| per coordinate)")
        if ring_bits not in (32, 64) or isinstance(ring_bits, bool):
            raise bad("ring_bits", ring_bits, "use 32 (upload 1x fp32) or 64")
        if bits is not None and (
            isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= ring_bits - 2
        ):
            raise bad("bits", bits, f"use an integer in [1, {ring_bits - 2}] or leave it unset (auto)")
        if neighbours is not None and (
            isinstance(neighbours, bool)
            or not isinstance(neighbours, int)
            or neighbours < 2
            or neighbours % 2
        ):
            raise bad("neighbours", neighbours, "use an even integer >= 2 or leave it unset (derived)")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1
        ):
            raise bad(
                "threshold",
                threshold,
                "use an integer >= 1 (a strict majority of neighbours) or leave it unset",
            )
        if neighbours is not None and threshold is not None:
            check_graph(neighbours + 1, neighbours, threshold)
        for pname, frac in (
            ("max_dropout_fraction", max_dropout_fraction),
            ("max_corrupt_fraction", max_corrupt_fraction),
        ):
            if frac is not None and (
                isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1
            ):
                raise bad(pname, frac, "use a fraction in [0, 1)")
        if max_weight is not None and (
            isinstance(max_weight, bool)
            or not isinstance(max_weight, (int, float))
            or not (math.isfinite(max_weight) and max_weight > 0)
        ):
            raise bad("max_weight", max_weight, "use a positive number (largest num_examples of a client)")
        if prg not in _prg.PRG_ALGORITHMS:
            raise bad("prg", prg, "choose 'aes128-ctr' or 'chacha20'")
        for pname, v in (("security_bits", security_bits), ("correctness_bits", correctness_bits)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 128:
                raise bad(pname, v, "use an integer in [1, 128]")
        rates = dict(stage_dropout_rates or {})
        for stage, rate in rates.items():
            if stage not in STAGES:
                raise bad("stage_dropout_rates", stage, f"stages are {', '.join(STAGES)}")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
                raise bad(f"stage_dropout_rates[{stage!r}]", rate, "use a probability in [0, 1)")
        self.clip_range = float(clip_range)
        self.bits = bits
        self.ring_bits = ring_bits
        self.neighbours = neighbours
        self.threshold = threshold
        self.max_dropout_fraction = max_dropout_fraction
        self.max_corrupt_fraction = float(max_corrupt_fraction)
        self.max_weight = None if max_weight is None else float(max_weight)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.signed_keys = bool(signed_keys)
        self.prg = prg
        self.security_bits = security_bits
        self.correctness_bits = correctness_bits
        self.stage_dropout_rates = rates
        self._run: RunInfo | None = None
        self._derived_max_weight: float | None = None
        self._round: _Round | None = None
        self._next_drops: dict[str, set[int]] = {}
        self._next_hashes: dict[int, str] = {}
        self._identities: dict[int, Any] = {}
        self._rounds: list[dict[str, Any]] = []
        self.server_view: dict[str, Any] = {}
        """What the server received in the last round (public messages, masked vectors excluded)."""

    def __repr__(self) -> str:
        return (
            f"SecAggTransport(clip_range={self.clip_range}, bits={self.bits}, ring_bits={self.ring_bits}, "
            f"neighbours={self.neighbours}, threshold={self.threshold}, prg={self.prg!r})"
        )

    # ---- configuration -------------------------------------------------------------------
    def _planned_dropout_rate(self) -> float:
        rate = self._run.dropout_rate if self._run is not None else 0.0
        return min(0.9, rate + sum(self.stage_dropout_rates.values()))

    @property
    def dropout_bound(self) -> float:
        """The dropout fraction the graph is sized for (``max_dropout_fraction`` or its default)."""
        if self.max_dropout_fraction is not None:
            return float(self.max_dropout_fraction)
        return max(0.1, self._planned_dropout_rate())

    def setup(self, run: RunInfo) -> None:
        """Record the run's facts; derive max_weight; check the round parameters exist."""
        self._run = run
        if self.max_dropout_fraction is not None and self.max_dropout_fraction < run.dropout_rate:
            raise ValueError(
                f"transport 'secagg': max_dropout_fraction={self.max_dropout_fraction} is below the "
                f"federation's dropout_rate={run.dropout_rate}; set max_dropout_fraction >= "
                f"{run.dropout_rate} or leave it unset"
            )
        sizes = [int(v) for v in run.client_num_examples.values()]
        derived = max([*sizes, run.batch_size * run.local_steps, 0])
        self._derived_max_weight = float(derived) if derived > 0 else None
        if run.clients_per_round >= 2:
            self.graph_parameters(run.clients_per_round)
            self._fixed_point(run.clients_per_round)

    def _max_weight(self) -> float:
        w = self.max_weight if self.max_weight is not None else self._derived_max_weight
        if w is None:
            raise ValueError(
                "transport 'secagg': max_weight is unknown; pass max_weight= (the largest num_examples of a "
                "client) or call setup(run) first"
            )
        return w

    def graph_parameters(self, num_clients: int) -> GraphParameters:
        """Degree k and threshold t used for a round of ``num_clients`` clients."""
        n = num_clients
        if n < 2:
            raise ValueError(f"transport 'secagg' needs at least 2 clients per round, got {n}")
        d, c = self.dropout_bound, self.max_corrupt_fraction
        if self.neighbours is None:
            kw = {
                "max_corrupt_fraction": c,
                "security_bits": self.security_bits,
                "correctness_bits": self.correctness_bits,
            }
            try:
                g = derive_graph(n, max_dropout_fraction=d, **kw)
            except ValueError:
                # With max_dropout_fraction unset, a small round keeps the privacy target and
                # tolerates fewer dropouts instead (those the simulation itself plans), loudly.
                floor = self._planned_dropout_rate()
                if self.max_dropout_fraction is not None or floor >= d:
                    raise
                g = derive_graph(n, max_dropout_fraction=floor, **kw)
                d = floor
                warnings.warn(
                    f"secagg: with {n} clients per round no neighbours/threshold tolerates "
                    f"{self.dropout_bound:g} dropouts at 2^-{self.security_bits} privacy; using "
                    f"max_dropout_fraction={floor:g} ({g.max_dropouts} dropouts; more abort the round). "
                    "Sample more clients per round or set max_dropout_fraction to silence this",
                    stacklevel=2,
                )
            if self.threshold is None:
                return g
            k = g.neighbours
        else:
            k = min(self.neighbours, n - 1)
        md, mc = math.ceil(d * n - 1e-9), math.ceil(c * n - 1e-9)
        if self.threshold is not None:
            t = self.threshold
        else:
            t = next(
                (
                    tt
                    for tt in range(k // 2 + 1, k + 1)
                    if graph_failure_bounds(n, k, tt, max_dropouts=md, max_corrupt=mc)[0]
                    <= 2.0**-self.security_bits
                ),
                k // 2 + 1,
            )
        try:
            check_graph(n, k, t)
        except ValueError as err:
            raise ValueError(f"transport 'secagg' with {n} clients this round: {err}") from None
        priv, corr = graph_failure_bounds(n, k, t, max_dropouts=md, max_corrupt=mc)
        lp = -math.inf if priv <= 0 else math.log2(priv)
        lc = -math.inf if corr <= 0 else math.log2(corr)
        if lp > -self.security_bits or lc > -self.correctness_bits:
            warnings.warn(
                f"secagg: neighbours={k}, threshold={t} for {n} clients bound the privacy failure by "
                f"2^{lp:.1f} and the correctness failure by 2^{lc:.1f}, weaker than the targets "
                f"2^-{self.security_bits} / 2^-{self.correctness_bits}; leave neighbours/threshold unset to "
                "derive them",
                stacklevel=2,
            )
        return GraphParameters(n, k, t, md, mc, lp, lc)

    def _fixed_point(self, num_clients: int) -> FixedPoint:
        w = self._max_weight()
        if self.bits is None:
            scale = no_wrap_scale(
                ring_bits=self.ring_bits, clip_range=self.clip_range, num_clients=num_clients, max_weight=w
            )
            if scale * self.clip_range < 1:
                raise ValueError(
                    f"transport 'secagg': {num_clients} clients x max_weight {w:g} leave less than one "
                    f"level per unit weight in a {self.ring_bits}-bit ring; set ring_bits=64 or lower "
                    "max_weight"
                )
        else:
            scale = 2.0**self.bits / self.clip_range
        spec = FixedPoint(ring_bits=self.ring_bits, scale=scale, clip_range=self.clip_range)
        if not fits(spec=spec, num_clients=num_clients, max_weight=w):
            best = math.floor(
                math.log2(
                    no_wrap_scale(
                        ring_bits=self.ring_bits,
                        clip_range=self.clip_range,
                        num_clients=num_clients,
                        max_weight=w,
                    )
                    * self.clip_range
                )
            )
            raise ValueError(
                f"transport 'secagg': bits={self.bits} with {num_clients} clients of weight <= {w:g} would "
                f"wrap the {self.ring_bits}-bit ring; use bits <= {best}, leave bits unset, or set "
                "ring_bits=64"
            )
        return spec

    # ---- simulation hooks ----------------------------------------------------------------
    def simulate_dropouts(
        self,
        *,
        advertise_keys: Iterable[int] = (),
        share_keys: Iterable[int] = (),
        masked_input: Iterable[int] = (),
        unmask: Iterable[int] = (),
    ) -> None:
        """Make the given clients drop out at the given stages of the *next* round.

        A client dropping at ``advertise_keys`` or ``share_keys`` is left out of the
        round (its :meth:`encode` sends nothing); at ``masked_input`` its masked vector
        is lost in transit (its masks are removed via its rebuilt key); at ``unmask`` it
        never answers (its input stays in the sum, rebuilt from its neighbours' shares).
        """
        for stage, ids in zip(STAGES, (advertise_keys, share_keys, masked_input, unmask), strict=True):
            self._next_drops.setdefault(stage, set()).update(int(i) for i in ids)

    def simulate_model_hashes(self, hashes: Mapping[int, str]) -> None:
        """Next round, pretend the server sent these clients a global adapter with this hash.

        Models a malicious server sending different models: the clients detect it
        (:class:`~fedsecure.defenses.secagg.protocol.ModelMismatchError`) in :meth:`encode`.
        """
        self._next_hashes.update({int(k): str(v) for k, v in hashes.items()})

    # ---- the three roles -----------------------------------------------------------------
    def begin_round(
        self, ctx: RoundContext, *, template: Mapping[str, torch.Tensor], client_ids: Sequence[int]
    ) -> None:
        """Stages 0-2: round set-up, fresh keys, and the encrypted share exchange."""
        self._discard_round()
        ids = sorted({int(c) for c in client_ids})
        if len(ids) != len(client_ids):
            raise ValueError(f"transport 'secagg': client_ids contain duplicates: {list(client_ids)}")
        if any(c < 0 for c in ids):
            raise ValueError(f"transport 'secagg': client ids must be >= 0, got {ids}")
        layout = tuple((k, tuple(v.shape)) for k, v in template.items())
        num_params = sum(math.prod(s) for _, s in layout)
        if num_params == 0:
            raise ValueError("transport 'secagg': the adapter template has no parameters")
        n = len(ids)
        graph = self.graph_parameters(n)
        spec = self._fixed_point(n)
        setup = RoundSetup(
            run_id=ctx.run_id,
            round=ctx.round,
            nonce=new_nonce(),
            client_ids=tuple(ids),
            neighbours=graph.neighbours,
            threshold=graph.threshold,
            ring_bits=spec.ring_bits,
            scale=spec.scale,
            clip_range=spec.clip_range,
            max_weight=self._max_weight(),
            num_params=num_params,
            stochastic_rounding=self.stochastic_rounding,
            prg=self.prg,
            signed=self.signed_keys,
        )
        pki = None
        if self.signed_keys:
            for c in ids:
                if c not in self._identities:
                    self._identities[c] = ka.generate_ed25519()
            pki = {c: ka.ed25519_public_bytes(self._identities[c]) for c in ids}
        hashes, self._next_hashes = self._next_hashes, {}
        drops = self._planned_drops(ctx, ids)
        server = SecAggServer(setup, global_hash=ctx.global_hash, peer_identities=pki)
        clients = {
            c: SecAggClient(
                c,
                setup,
                global_hash=hashes.get(c, ctx.global_hash),
                identity_key=self._identities.get(c),
                peer_identities=pki,
            )
            for c in ids
        }
        rnd = _Round(ctx, setup, graph, layout, server, clients, {}, drops, {c: _empty_bytes() for c in ids})
        self._round = rnd
        self.server_view = {"setup": setup}
        try:
            setup_bytes = setup.nbytes
            adv = {}
            for c in ids:
                rnd.bytes[c]["advertise_keys"][1] += setup_bytes
                if c in drops["advertise_keys"]:
                    continue
                t0 = time.perf_counter()
                adv[c] = clients[c].advertise_keys()
                rnd.client_seconds.setdefault("advertise_keys", []).append(time.perf_counter() - t0)
                rnd.bytes[c]["advertise_keys"][0] += adv[c].nbytes
            self.server_view["advertise_keys"] = adv
            routed = server.receive_advertise(adv)
            shares = {}
            for c, msg in routed.items():
                rnd.bytes[c]["share_keys"][1] += msg.nbytes
                if c in drops["share_keys"]:
                    continue
                t0 = time.perf_counter()
                shares[c] = clients[c].share_keys(msg)
                rnd.client_seconds.setdefault("share_keys", []).append(time.perf_counter() - t0)
                rnd.bytes[c]["share_keys"][0] += shares[c].nbytes
            self.server_view["share_keys"] = shares
            rnd.forwarded = server.receive_shares(shares)
            for c, msg in rnd.forwarded.items():
                rnd.bytes[c]["masked_input"][1] += msg.nbytes
        except Exception:
            self._discard_round()
            raise
        rnd.dropped_at["advertise_keys"] = sorted(set(ids) - server.advertised)
        rnd.dropped_at["share_keys"] = sorted(server.advertised - server.shared)

    def _planned_drops(self, ctx: RoundContext, ids: Sequence[int]) -> dict[str, set[int]]:
        planned, self._next_drops = self._next_drops, {}
        drops = {s: set(planned.get(s, set())) & set(ids) for s in STAGES}
        for i, stage in enumerate(STAGES):
            rate = self.stage_dropout_rates.get(stage, 0.0)
            if rate > 0:
                # Simulation of network failures only (not security randomness).
                rng = np.random.default_rng([abs(int(ctx.seed)), int(ctx.round), i, 0x5EC])
                drops[stage] |= {c for c in ids if rng.random() < rate}
        return drops

    def _require_round(self, ctx: RoundContext, what: str) -> _Round:
        rnd = self._round
        if rnd is None:
            raise RuntimeError(f"transport 'secagg': {what} before begin_round for round {ctx.round}")
        if rnd.ctx.round != ctx.round:
            raise RuntimeError(
                f"transport 'secagg': {what} for round {ctx.round}, but round {rnd.ctx.round} is in progress"
            )
        return rnd

    def encode(self, update: ClientUpdate, *, ctx: RoundContext) -> Sealed:
        """Stage 3 (client): quantise ``update.delta * update.num_examples`` and mask it."""
        rnd = self._require_round(ctx, "encode")
        cid = update.client_id
        if cid not in rnd.clients:
            raise InvalidUpdateError(cid, f"was not sampled for secure-aggregation round {ctx.round}")
        weight = float(update.num_examples)
        stage_bytes = self._stage_bytes(rnd, cid)
        if cid not in rnd.forwarded:
            # Dropped out at an earlier stage: nothing is sent.
            return Sealed(client_id=cid, weight=weight, payload=None, nbytes=0, stage_bytes=stage_bytes)
        if weight > rnd.setup.max_weight:
            raise InvalidUpdateError(
                cid,
                f"num_examples={update.num_examples} exceeds the secagg max_weight={rnd.setup.max_weight:g} "
                "the ring was sized for; set [transport] max_weight to at least the largest num_examples",
            )
        update.validate_against(dict(self._template_tensors(rnd)))
        vec = (
            torch.cat([update.delta[k].detach().reshape(-1).to(torch.float32) for k, _ in rnd.layout])
            .cpu()
            .numpy()
        )
        t0 = time.perf_counter()
        msg = rnd.clients[cid].masked_input(rnd.forwarded[cid], vec, weight=weight)
        rnd.client_seconds.setdefault("masked_input", []).append(time.perf_counter() - t0)
        if rnd.clients[cid].clipped:
            rnd.clipped += rnd.clients[cid].clipped
            warnings.warn(
                f"secagg: client {cid} clipped {rnd.clients[cid].clipped} of {vec.size} coordinates to "
                f"clip_range={self.clip_range}; raise clip_range if the delta is legitimately larger",
                stacklevel=2,
            )
        rnd.bytes[cid]["masked_input"][0] += msg.nbytes
        return Sealed(
            client_id=cid,
            weight=weight,
            payload=msg,
            nbytes=msg.nbytes,
            plaintext=None,
            stage_bytes=self._stage_bytes(rnd, cid),
        )

    @staticmethod
    def _template_tensors(rnd: _Round) -> Iterable[tuple[str, torch.Tensor]]:
        for name, shape in rnd.layout:
            yield name, torch.empty(shape)

    @staticmethod
    def _stage_bytes(rnd: _Round, cid: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage in STAGES[:3]:
            sent, received = rnd.bytes[cid][stage]
            out[f"{stage}.sent"] = sent
            out[f"{stage}.received"] = received
        return out

    def combine(
        self, sealed: Sequence[Sealed], *, ctx: RoundContext, dropped: Sequence[int] = ()
    ) -> SealedSum:
        """Server: sum the masked vectors that arrived, then run the unmask stage with the survivors."""
        rnd = self._require_round(ctx, "combine")
        server = rnd.server
        lost = set(int(d) for d in dropped) | rnd.drops["masked_input"]
        try:
            for s in sealed:
                if s.payload is None or s.client_id in lost:
                    continue
                if not isinstance(s.payload, MaskedInput):
                    raise SecAggError(f"client {s.client_id}: sealed payload is not a secagg masked input")
                server.add_masked_input(s.payload)
            rnd.dropped_at["masked_input"] = sorted(server.shared - server.survivors)
            requests = server.unmask_requests()
            responses = {}
            for w, req in requests.items():
                rnd.bytes[w]["unmask"][1] += req.nbytes
                if w in rnd.drops["unmask"]:
                    continue
                t0 = time.perf_counter()
                responses[w] = rnd.clients[w].unmask(req)
                rnd.client_seconds.setdefault("unmask", []).append(time.perf_counter() - t0)
                rnd.bytes[w]["unmask"][0] += responses[w].nbytes
            rnd.dropped_at["unmask"] = sorted(set(requests) - set(responses))
            self.server_view["unmask_requests"] = requests
            self.server_view["unmask"] = responses
            ring_sum = server.receive_unmask(responses)
        finally:
            self._discard_round()
        survivors = tuple(sorted(server.survivors))
        spec = rnd.setup.fixed_point
        bound = sum_error_bound(
            spec=spec,
            num_clients=len(survivors),
            max_weight=rnd.setup.max_weight,
            stochastic=rnd.setup.stochastic_rounding,
        )
        self._rounds[-1]["quantisation_error_bound"] = bound
        self._rounds[-1]["status"] = "ok"
        t = server.timings
        cost = {
            "server_sum_s": t.sum_s,
            "server_unmask_s": t.unmask_s,
            "survivors": float(len(survivors)),
            "dropped": float(len(rnd.clients) - len(survivors)),
            "masks_regenerated": float(server.masks_regenerated),
            "quantisation_error_bound": bound,
            "upload_bytes_per_client": float(
                np.mean([rnd.bytes[c]["masked_input"][0] for c in survivors]) if survivors else 0.0
            ),
        }
        return SealedSum(
            client_ids=survivors,
            total_weight=float(sum(server.weights[c] for c in survivors)),
            payload=_RingSum(ring_sum, spec, rnd.layout),
            cost=cost,
        )

    def open(self, combined: SealedSum, *, ctx: RoundContext) -> AdapterDelta:
        """Decode the unmasked ring sum into the weighted sum of the survivors' deltas."""
        payload = combined.payload
        if not isinstance(payload, _RingSum):
            raise TypeError("transport 'secagg' can only open a SealedSum it produced")
        values = dequantise(payload.ring_sum, spec=payload.spec)
        out: AdapterDelta = {}
        off = 0
        for name, shape in payload.layout:
            n = math.prod(shape)
            out[name] = torch.from_numpy(values[off : off + n].astype(np.float32)).reshape(shape)
            off += n
        return out

    @staticmethod
    def quantisation_error_bound(combined: SealedSum) -> float:
        """Max abs error per coordinate of ``open(combined)`` vs the exact weighted sum of clipped deltas
        (before the final float32 rounding)."""
        return float(combined.cost["quantisation_error_bound"])

    # ---- bookkeeping ---------------------------------------------------------------------
    def _record(self, rnd: _Round) -> None:
        if rnd.recorded:
            return
        rnd.recorded = True
        setup, g = rnd.setup, rnd.graph
        per_client = {
            str(c): {s: {"sent": b[s][0], "received": b[s][1]} for s in STAGES}
            for c, b in sorted(rnd.bytes.items())
        }
        mean = {
            s: {
                "sent": float(np.mean([b[s][0] for b in rnd.bytes.values()])),
                "received": float(np.mean([b[s][1] for b in rnd.bytes.values()])),
            }
            for s in STAGES
        }
        t = rnd.server.timings
        self._rounds.append(
            {
                "round": setup.round,
                "status": "aborted",
                "num_clients": len(setup.client_ids),
                "neighbours": g.neighbours,
                "threshold": g.threshold,
                "complete_graph": g.complete,
                "max_dropouts": g.max_dropouts,
                "max_corrupt": g.max_corrupt,
                "log2_privacy_failure": g.log2_privacy_failure,
                "log2_correctness_failure": g.log2_correctness_failure,
                "ring_bits": setup.ring_bits,
                "scale": setup.scale,
                "effective_bits": math.log2(setup.scale * setup.clip_range),
                "max_weight": setup.max_weight,
                "num_params": setup.num_params,
                "fp32_bytes_per_client": 4 * setup.num_params,
                "dropped_at": {s: list(rnd.dropped_at.get(s, [])) for s in STAGES},
                "survivors": len(rnd.server.survivors),
                "bytes_per_client": per_client,
                "bytes_mean": mean,
                "client_seconds_mean": {s: _stats(v)["mean"] for s, v in rnd.client_seconds.items()},
                "client_seconds_max": {s: _stats(v)["max"] for s, v in rnd.client_seconds.items()},
                "server_seconds": {
                    "sum": t.sum_s,
                    "reconstruct": t.reconstruct_s,
                    "regenerate_masks": t.regenerate_s,
                    "unmask": t.unmask_s,
                },
                "masks_regenerated": rnd.server.masks_regenerated,
                "clipped_coordinates": rnd.clipped,
            }
        )

    def _discard_round(self) -> None:
        """End the round in progress (recorded as aborted unless combine finished it); wipe its secrets."""
        rnd, self._round = self._round, None
        if rnd is not None:
            self._record(rnd)
            for c in rnd.clients.values():
                c.wipe()

    @property
    def last_round_bytes(self) -> dict[int, dict[str, int]]:
        """Last round: client id -> {"up": bytes sent, "down": bytes received}, all stages together."""
        if not self._rounds:
            return {}
        out: dict[int, dict[str, int]] = {}
        for cid, stages in self._rounds[-1]["bytes_per_client"].items():
            out[int(cid)] = {
                "up": sum(v["sent"] for v in stages.values()),
                "down": sum(v["received"] for v in stages.values()),
            }
        return out

    def cost_report(self) -> dict[str, Any]:
        """Per-round protocol figures for ``results.json``: bytes per client and stage, times, (k, t)."""
        ok = [r for r in self._rounds if r["status"] == "ok"]
        upload = [r["bytes_mean"]["masked_input"]["sent"] for r in ok]
        fp32 = [r["fp32_bytes_per_client"] for r in ok]
        return {
            "protocol": "SecAgg+ (Bonawitz et al. CCS'17, Bell et al. CCS'20)",
            "prg": self.prg,
            "ring_bits": self.ring_bits,
            "clip_range": self.clip_range,
            "stochastic_rounding": self.stochastic_rounding,
            "signed_keys": self.signed_keys,
            "max_dropout_fraction": self.dropout_bound,
            "max_corrupt_fraction": self.max_corrupt_fraction,
            "rounds_ok": len(ok),
            "rounds_aborted": len(self._rounds) - len(ok),
            "upload_ratio_vs_fp32": float(np.mean(upload) / np.mean(fp32)) if ok else None,
            "total_bytes_per_client_mean": float(
                np.mean([sum(v["sent"] + v["received"] for v in r["bytes_mean"].values()) for r in ok])
            )
            if ok
            else None,
            "rounds": list(self._rounds),
        }
