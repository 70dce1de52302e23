"""The ServerApp side: fedsecure's server step as the loop of a Flower ServerApp.

:class:`FlowerEngine` is the embedded :class:`~fedsecure.federation.simulation.SimulationEngine`
with one part replaced: the clients' part of a round runs on Flower SuperNodes, reached through
the ServerApp's :class:`~flwr.serverapp.Grid`. Everything else -- client sampling
(:func:`~fedsecure.federation.server.sample_clients`), simulated dropouts, the server step
(:func:`~fedsecure.federation.server.server_round`), observers, evaluation, checkpoints,
``metrics.jsonl`` and ``results.json`` (via :class:`~fedsecure.experiment.Experiment`) -- is
the same code, so a plain-transport run gives the same adapters as the simulation.

Transports across processes:

- ``plain``: each SuperNode returns its clients' deltas as Flower arrays.
- ``secagg``: :class:`RemoteSecAgg` drives a real
  :class:`~fedsecure.defenses.secagg.protocol.SecAggServer` with one Flower message per stage
  (advertise keys, share keys, masked input with the training request, unmask); a SuperNode
  that dies mid-round is a real dropout, recovered by the protocol.
- ``ckks``: the key holder is its own SuperNode (``role="key-holder"``); :class:`RemoteKeyHolder`
  stands in for it on the server, so the server holds only the public context.

Defense state that lives on the client (dp-sgd's per-client accountants) travels with the
training request and comes back with the reply (public bookkeeping, never data).

Threat model: the server learns what the transport exposes and nothing else; it never holds
a client's secagg secrets or the CKKS secret key. A SuperNode that does not answer within the
stage timeout, or that the SuperLink reports unavailable, counts as dropped; a ClientApp that
raises is reported as an error with its SuperNode id (never silently dropped).
"""

from __future__ import annotations

import logging
import math
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.engines.flower import protocol as P
from fedsecure.federation.simulation import ClientPhase, SimulationEngine
from fedsecure.federation.transport import Sealed, SealedSum, Transport, delta_nbytes
from fedsecure.types import AdapterDelta, ClientUpdate, InvalidUpdateError, RoundContext, RunInfo, View

log = logging.getLogger(__name__)

#: Flower error codes that mean "this SuperNode is gone" (a dropout), not "this ClientApp failed".
_DROPOUT_CODES = frozenset({3, 4, 5, 8})  # MESSAGE_/REPLY_MESSAGE_/NODE_UNAVAILABLE, CLIENT_APP_CRASHED


class FlowerEngineError(RuntimeError):
    """The federation cannot go on (no SuperNode for some clients, a key holder missing, ...)."""


class RemoteClientError(FlowerEngineError):
    """A SuperNode's ClientApp raised; the message carries its node id and reason."""


@dataclass(frozen=True)
class ServerOptions:
    """Time bounds of the ServerApp (seconds).

    Parameters
    ----------
    discovery_timeout_s:
        How long to wait for SuperNodes that together serve every client (and the key holder).
    stage_timeout_s:
        Bound on a light protocol stage (discovery reply, secagg key exchange and unmask, CKKS keys).
    train_timeout_s:
        Bound on a training stage (a SuperNode trains all its sampled clients in it).
    poll_interval_s:
        Pause between two pulls of replies from the SuperLink.
    """

    discovery_timeout_s: float = 120.0
    stage_timeout_s: float = 120.0
    train_timeout_s: float = 900.0
    poll_interval_s: float = 0.2

    def __post_init__(self) -> None:
        for name in ("discovery_timeout_s", "stage_timeout_s", "train_timeout_s", "poll_interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"flower option {name} must be a positive number of seconds, got {v!r}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerOptions:
        d = cls()
        return cls(
            discovery_timeout_s=float(run_config.get(P.RC_DISCOVERY_TIMEOUT, d.discovery_timeout_s)),
            stage_timeout_s=float(run_config.get(P.RC_STAGE_TIMEOUT, d.stage_timeout_s)),
            train_timeout_s=float(run_config.get(P.RC_TRAIN_TIMEOUT, d.train_timeout_s)),
        )


@dataclass(frozen=True)
class NodeInfo:
    """A SuperNode as it introduced itself (public metadata)."""

    node_id: int
    role: str
    client_ids: tuple[int, ...]
    num_examples: Mapping[int, int]


# ---------------------------------------------------------------------------------------------
# Messaging with bounded waits
# ---------------------------------------------------------------------------------------------
class Messenger:
    """Push one message per SuperNode and pull the replies until all arrive or the deadline passes."""

    def __init__(self, grid: Any, *, poll_interval_s: float = 0.2) -> None:
        self.grid = grid
        self.poll_interval_s = poll_interval_s
        self.messages = 0

    def exchange(
        self,
        requests: Mapping[int, tuple[str, Any]],
        *,
        timeout_s: float,
        group_id: str,
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """Send ``{node: (message_type, RecordDict)}``; return ``(replies, failures)``.

        ``replies`` maps a node to its reply content; ``failures`` maps a node that is gone
        (unavailable, crashed, or silent until ``timeout_s``) to the reason. A ClientApp that
        raised makes this raise :class:`RemoteClientError`.
        """
        from flwr.app import Message

        ttl = max(60.0, 2.0 * timeout_s)
        pending: dict[str, int] = {}
        types: dict[int, str] = {}
        for node, (mtype, content) in requests.items():
            msg = Message(
                content=content, dst_node_id=int(node), message_type=mtype, group_id=group_id, ttl=ttl
            )
            ids = list(self.grid.push_messages([msg]))
            self.messages += 1
            if not ids:
                raise FlowerEngineError(f"the SuperLink refused a {mtype} message for SuperNode {node}")
            pending[str(ids[0])] = int(node)
            types[int(node)] = mtype
        replies: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for rep in self.grid.pull_messages(list(pending)):
                node = pending.pop(rep.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if rep.has_error():
                    code, reason = int(rep.error.code), str(rep.error.reason)
                    if code in _DROPOUT_CODES:
                        failures[node] = f"Flower error {code}: {reason}"
                        continue
                    raise RemoteClientError(
                        f"SuperNode {node} failed on {types[node]} (Flower error {code}): {reason}"
                    )
                replies[node] = rep.content
            if not pending:
                break
            if time.monotonic() >= deadline:
                for node in pending.values():
                    failures[node] = f"no reply within {timeout_s:g} s"
                break
            time.sleep(self.poll_interval_s)
        for node, why in failures.items():
            log.warning("SuperNode %s dropped out of %s: %s", node, types[node], why)
        return replies, failures


# ---------------------------------------------------------------------------------------------
# Secure aggregation across processes
# ---------------------------------------------------------------------------------------------
@dataclass
class _SecAggRound:
    ctx: RoundContext
    setup: Any
    graph: Any
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    server: Any
    forwarded: dict[int, Any] = field(default_factory=dict)
    bytes: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    dropped_at: dict[str, list[int]] = field(default_factory=dict)
    client_seconds: dict[str, list[float]] = field(default_factory=dict)
    clipped: int = 0


class RemoteSecAgg(Transport):
    """The ``secagg`` transport with its client role on the SuperNodes (one Flower message per stage).

    Uses the scenario's :class:`~fedsecure.defenses.secagg.SecAggTransport` for its parameters
    (graph degree, threshold, ring, max weight), decoding and cost report; the server side is a
    real :class:`~fedsecure.defenses.secagg.protocol.SecAggServer`.
    """

    name = "secagg"
    exposes = frozenset({View.SERVER_AGGREGATE})

    def __init__(self, inner: Any, engine: FlowerEngine) -> None:
        self.inner = inner
        self.engine = engine
        self._round: _SecAggRound | None = None

    def setup(self, run: RunInfo) -> None:
        self.inner.setup(run)

    def _require(self, ctx: RoundContext) -> _SecAggRound:
        if self._round is None or self._round.ctx.round != ctx.round:
            raise RuntimeError(f"secagg on Flower: no round {ctx.round} in progress (begin_round first)")
        return self._round

    def _per_node(
        self, client_ids: Sequence[int], make: Any, mtype: str, ctx: RoundContext
    ) -> dict[int, Any]:
        groups = self.engine.group_by_node(client_ids)
        requests = {node: (mtype, make(cids)) for node, cids in groups.items()}
        replies, failures = self.engine.messenger.exchange(
            requests, timeout_s=self.engine.options.stage_timeout_s, group_id=f"round-{ctx.round}"
        )
        if failures:
            self.engine.note_dropouts(ctx.round, [c for n in failures for c in groups[n]])
        return replies

    def begin_round(
        self, ctx: RoundContext, *, template: Mapping[str, torch.Tensor], client_ids: Sequence[int]
    ) -> None:
        """Stages 0-2 over Flower: round set-up, advertised keys, encrypted share exchange."""
        from flwr.app import ConfigRecord, RecordDict

        from fedsecure.defenses.secagg.protocol import (
            STAGES,
            AdvertiseKeys,
            RoundSetup,
            SecAggServer,
            ShareKeys,
            new_nonce,
        )

        self._round = None
        ids = sorted({int(c) for c in client_ids})
        layout = tuple((k, tuple(v.shape)) for k, v in template.items())
        num_params = sum(math.prod(s) for _, s in layout)
        graph = self.inner.graph_parameters(len(ids))
        spec = self.inner._fixed_point(len(ids))
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
            max_weight=self.inner._max_weight(),
            num_params=num_params,
            stochastic_rounding=self.inner.stochastic_rounding,
            prg=self.inner.prg,
            signed=False,
        )
        server = SecAggServer(setup, global_hash=ctx.global_hash)
        rnd = _SecAggRound(
            ctx, setup, graph, layout, server, bytes={c: {s: [0, 0] for s in STAGES} for c in ids}
        )
        self._round = rnd
        setup_bytes = setup.to_bytes()
        try:

            def advertise(cids: list[int]) -> Any:
                rec = ConfigRecord({"setup": setup_bytes, "global_hash": ctx.global_hash, "clients": cids})
                return RecordDict({"secagg": rec})

            for c in ids:
                rnd.bytes[c]["advertise_keys"][1] += len(setup_bytes)
            adv: dict[int, Any] = {}
            for content in self._per_node(ids, advertise, P.SECAGG_ADVERTISE, ctx).values():
                rec = content.config_records["secagg"]
                for key in rec:
                    if key.startswith("advertise."):
                        m = AdvertiseKeys.from_bytes(bytes(rec[key]))
                        adv[int(key.split(".", 1)[1])] = m
                        rnd.bytes[m.sender]["advertise_keys"][0] += m.nbytes
            routed = server.receive_advertise(adv)
            rnd.dropped_at["advertise_keys"] = sorted(set(ids) - server.advertised)

            def share(cids: list[int]) -> Any:
                rec = ConfigRecord({"round": ctx.round, "run_id": ctx.run_id})
                for c in cids:
                    rec[P.client_key("neighbours", c)] = routed[c].to_bytes()
                    rnd.bytes[c]["share_keys"][1] += routed[c].nbytes
                return RecordDict({"secagg": rec})

            shares: dict[int, Any] = {}
            for content in self._per_node(sorted(routed), share, P.SECAGG_SHARE, ctx).values():
                rec = content.config_records["secagg"]
                for key in rec:
                    if key.startswith("share."):
                        m = ShareKeys.from_bytes(bytes(rec[key]))
                        shares[int(key.split(".", 1)[1])] = m
                        rnd.bytes[m.sender]["share_keys"][0] += m.nbytes
            rnd.forwarded = server.receive_shares(shares)
            rnd.dropped_at["share_keys"] = sorted(server.advertised - server.shared)
            for c, msg in rnd.forwarded.items():
                rnd.bytes[c]["masked_input"][1] += msg.nbytes
        except Exception:
            self._record(rnd)
            self._round = None
            raise

    def train_extras(self, ctx: RoundContext, client_ids: Sequence[int]) -> dict[str, Any]:
        """The forwarded shares of ``client_ids`` (they travel with the training request)."""
        from flwr.app import ConfigRecord

        rnd = self._require(ctx)
        rec = ConfigRecord()
        for c in client_ids:
            if c in rnd.forwarded:
                rec[P.client_key("forwarded", c)] = rnd.forwarded[c].to_bytes()
        return {"secagg": rec}

    def sealed_from_reply(self, ctx: RoundContext, cid: int, content: Any, meta: Any) -> Sealed:
        from fedsecure.defenses.secagg.protocol import MaskedInput

        rnd = self._require(ctx)
        vec = content.array_records[P.client_key("masked", cid)]["vector"].numpy()
        weight = float(meta[P.client_key("weight", cid)])
        msg = MaskedInput(round=ctx.round, sender=cid, weight=weight, vector=np.array(vec, copy=True))
        rnd.bytes[cid]["masked_input"][0] += msg.nbytes
        rnd.clipped += int(meta.get(P.client_key("clipped", cid), 0))
        if P.client_key("mask_s", cid) in meta:
            rnd.client_seconds.setdefault("masked_input", []).append(float(meta[P.client_key("mask_s", cid)]))
        stage_bytes = {}
        for stage in ("advertise_keys", "share_keys", "masked_input"):
            sent, received = rnd.bytes[cid][stage]
            stage_bytes[f"{stage}.sent"] = sent
            stage_bytes[f"{stage}.received"] = received
        return Sealed(client_id=cid, weight=weight, payload=msg, nbytes=msg.nbytes, stage_bytes=stage_bytes)

    def encode(self, update: ClientUpdate, *, ctx: RoundContext) -> Sealed:
        raise RuntimeError("on Flower the secagg client role runs on the SuperNodes, not in the ServerApp")

    def combine(
        self, sealed: Sequence[Sealed], *, ctx: RoundContext, dropped: Sequence[int] = ()
    ) -> SealedSum:
        """Sum the masked inputs that arrived, then run the unmask stage over Flower with the survivors."""
        from flwr.app import ConfigRecord, RecordDict

        from fedsecure._hazmat.quantisation import sum_error_bound
        from fedsecure.defenses.secagg.protocol import MaskedInput, SecAggError, UnmaskResponse
        from fedsecure.defenses.secagg.transport import _RingSum

        rnd = self._require(ctx)
        server = rnd.server
        try:
            for s in sealed:
                if not isinstance(s.payload, MaskedInput):
                    raise SecAggError(f"client {s.client_id}: sealed payload is not a secagg masked input")
                server.add_masked_input(s.payload)
            rnd.dropped_at["masked_input"] = sorted(server.shared - server.survivors)
            requests = server.unmask_requests()

            def unmask(cids: list[int]) -> Any:
                rec = ConfigRecord({"round": ctx.round, "run_id": ctx.run_id})
                for c in cids:
                    rec[P.client_key("request", c)] = requests[c].to_bytes()
                    rnd.bytes[c]["unmask"][1] += requests[c].nbytes
                return RecordDict({"secagg": rec})

            responses: dict[int, Any] = {}
            for content in self._per_node(sorted(requests), unmask, P.SECAGG_UNMASK, ctx).values():
                rec = content.config_records["secagg"]
                for key in rec:
                    if key.startswith("response."):
                        m = UnmaskResponse.from_bytes(bytes(rec[key]))
                        responses[int(key.split(".", 1)[1])] = m
                        rnd.bytes[m.sender]["unmask"][0] += m.nbytes
            rnd.dropped_at["unmask"] = sorted(set(requests) - set(responses))
            ring_sum = server.receive_unmask(responses)
        finally:
            self._record(rnd)
            self._round = None
        survivors = tuple(sorted(server.survivors))
        setup = rnd.setup
        bound = sum_error_bound(
            spec=setup.fixed_point,
            num_clients=len(survivors),
            max_weight=setup.max_weight,
            stochastic=setup.stochastic_rounding,
        )
        record = self.inner._rounds[-1]
        record["quantisation_error_bound"] = bound
        record["status"] = "ok"
        t = server.timings
        cost = {
            "server_sum_s": t.sum_s,
            "server_unmask_s": t.unmask_s,
            "survivors": float(len(survivors)),
            "dropped": float(len(setup.client_ids) - len(survivors)),
            "masks_regenerated": float(server.masks_regenerated),
            "quantisation_error_bound": bound,
            "upload_bytes_per_client": float(
                np.mean([rnd.bytes[c]["masked_input"][0] for c in survivors]) if survivors else 0.0
            ),
        }
        return SealedSum(
            client_ids=survivors,
            total_weight=float(sum(server.weights[c] for c in survivors)),
            payload=_RingSum(ring_sum, setup.fixed_point, rnd.layout),
            cost=cost,
        )

    def open(self, combined: SealedSum, *, ctx: RoundContext) -> AdapterDelta:
        return self.inner.open(combined, ctx=ctx)

    def _record(self, rnd: _SecAggRound) -> None:
        """Append this round's figures to the scenario transport's per-round report (same schema)."""
        from fedsecure.defenses.secagg.protocol import STAGES

        setup, g = rnd.setup, rnd.graph
        mean = {
            s: {
                "sent": float(np.mean([b[s][0] for b in rnd.bytes.values()])),
                "received": float(np.mean([b[s][1] for b in rnd.bytes.values()])),
            }
            for s in STAGES
        }
        t = rnd.server.timings
        self.inner._rounds.append(
            {
                "round": setup.round,
                "status": "aborted",
                "engine": "flower",
                "num_clients": len(setup.client_ids),
                "neighbours": g.neighbours,
                "threshold": g.threshold,
                "complete_graph": g.complete,
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
                "bytes_per_client": {
                    str(c): {s: {"sent": b[s][0], "received": b[s][1]} for s in STAGES}
                    for c, b in sorted(rnd.bytes.items())
                },
                "bytes_mean": mean,
                "client_seconds_mean": {s: float(np.mean(v)) for s, v in rnd.client_seconds.items() if v},
                "client_seconds_max": {s: float(np.max(v)) for s, v in rnd.client_seconds.items() if v},
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

    @property
    def last_round_bytes(self) -> dict[int, dict[str, int]]:
        return self.inner.last_round_bytes

    def plaintext_fraction(self) -> float:
        return 0.0

    def cost_report(self) -> dict[str, Any]:
        return {**self.inner.cost_report(), "engine": "flower"}


# ---------------------------------------------------------------------------------------------
# CKKS: the key holder is its own SuperNode
# ---------------------------------------------------------------------------------------------
class RemoteKeyHolder:
    """Server-side stand-in for the CKKS key holder: every call is a message to the key-holder SuperNode.

    It never holds a secret key; ``public_key`` is what the key holder published, and
    ``last_aggregate`` the previous round's released mean (public, for selective encryption).
    """

    def __init__(self, *, engine: FlowerEngine, params: Any, flooding_std_coeff_units: float) -> None:
        self.engine = engine
        self.params = params
        self.flooding_std_coeff_units = float(flooding_std_coeff_units)
        self.last_aggregate: np.ndarray | None = None
        self._public: Any = None

    def _call(self, mtype: str, content: Any, *, what: str, round_: int) -> Any:
        node = self.engine.key_holder_node
        if node is None:
            raise FlowerEngineError("transport 'ckks' needs a key-holder SuperNode, none is connected")
        replies, failures = self.engine.messenger.exchange(
            {node: (mtype, content)},
            timeout_s=self.engine.options.stage_timeout_s,
            group_id=f"round-{round_}",
        )
        if node not in replies:
            raise FlowerEngineError(
                f"the CKKS key holder (SuperNode {node}) did not answer the {what} request: "
                f"{failures.get(node)}"
            )
        return replies[node]

    def new_context(self, *, round: int | None, run_id: str) -> Any:
        from flwr.app import ConfigRecord, RecordDict

        from fedsecure.defenses.ckks import PublicRoundKey, context_fingerprint

        r = -1 if round is None else int(round)
        content = RecordDict({"ckks": ConfigRecord({"round": r, "run_id": run_id})})
        rec = self._call(P.CKKS_KEYGEN, content, what="key generation", round_=max(r, 0)).config_records[
            "ckks"
        ]
        key = PublicRoundKey(
            round=round, context_bytes=bytes(rec["context"]), fingerprint=str(rec["fingerprint"])
        )
        if context_fingerprint(key.context_bytes, run_id=run_id, round=round) != key.fingerprint:
            raise FlowerEngineError("the key holder's public context does not match its fingerprint")
        self._public = key
        return key

    @property
    def public_key(self) -> Any:
        if self._public is None:
            raise RuntimeError("the key holder has published no context yet")
        return self._public

    def decrypt_aggregate(
        self, payload: bytes, *, layout: Any, num_clients: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        from flwr.app import ConfigRecord, RecordDict

        rec = ConfigRecord(
            {
                "payload": bytes(payload),
                "round": int(layout.round),
                "num_clients": int(num_clients),
                "names": P.dumps(list(layout.spec.names)),
                "shapes": P.dumps([list(s) for s in layout.spec.shapes]),
                "slots": int(layout.slots),
            }
        )
        arrays = P.array_record(
            encrypted_index=np.asarray(layout.encrypted_index, dtype=np.int64),
            plaintext_index=np.asarray(layout.plaintext_index, dtype=np.int64),
        )
        content = RecordDict({"ckks": rec, "layout": arrays})
        reply = self._call(P.CKKS_DECRYPT, content, what="decryption", round_=int(layout.round))
        flat = np.asarray(reply.array_records["aggregate"]["flat"].numpy(), dtype=np.float64)
        header = P.loads(str(reply.config_records["ckks"]["header"]))
        if flat.shape != (layout.num_parameters,):
            raise FlowerEngineError(
                f"the key holder returned {flat.size} values, expected {layout.num_parameters}"
            )
        return flat, header


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class FlowerEngine(SimulationEngine):
    """:class:`SimulationEngine` whose clients are Flower SuperNodes (see the module docstring).

    Parameters
    ----------
    grid:
        The ServerApp's :class:`~flwr.serverapp.Grid`.
    options:
        Time bounds (:class:`ServerOptions`).
    **kwargs:
        :class:`SimulationEngine`'s arguments (``Experiment`` passes them).
    """

    def __init__(self, *, grid: Any, options: ServerOptions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options
        self.messenger = Messenger(grid, poll_interval_s=options.poll_interval_s)
        self.grid = grid
        self.run_info: RunInfo | None = None
        self.nodes: dict[int, NodeInfo] = {}
        self.client_node: dict[int, int] = {}
        self.key_holder_node: int | None = None
        self._real_dropouts: dict[int, set[int]] = {}
        self.train_timing: list[dict[str, Any]] = []
        """Per round and SuperNode: the training stage's wall time and the node's handler/setup seconds."""
        inner = self.transport
        if inner.name == "plain":
            pass
        elif inner.name == "secagg":
            self.transport = RemoteSecAgg(inner, self)
        elif inner.name == "ckks":
            inner.key_holder = RemoteKeyHolder(
                engine=self,
                params=inner.params,
                flooding_std_coeff_units=inner.key_holder.flooding_std_coeff_units,
            )
        else:
            raise FlowerEngineError(
                f"transport {inner.name!r} has no Flower binding; use plain, secagg or ckks on "
                "--engine flower"
            )

    # ---- discovery --------------------------------------------------------------------------
    def discover(self) -> None:
        """Wait until connected SuperNodes serve every client (and, for ckks, the key holder)."""
        from flwr.app import RecordDict

        opts = self.options
        num_clients = len(self.client_features)
        need_key_holder = self.transport.name == "ckks"
        run_id = self.config.config_hash()
        deadline = time.monotonic() + opts.discovery_timeout_s
        while True:
            new = [int(n) for n in self.grid.get_node_ids() if int(n) not in self.nodes]
            if new:
                left = max(1.0, min(opts.stage_timeout_s, deadline - time.monotonic()))
                replies, _ = self.messenger.exchange(
                    {n: (P.HELLO, RecordDict()) for n in new}, timeout_s=left, group_id="hello"
                )
                for node, content in replies.items():
                    self._register(node, content.config_records["hello"], run_id=run_id)
            missing = sorted(set(range(num_clients)) - set(self.client_node))
            if not missing and (self.key_holder_node is not None or not need_key_holder):
                break
            if time.monotonic() >= deadline:
                parts = []
                if missing:
                    parts.append(f"clients {missing} are served by no SuperNode")
                if need_key_holder and self.key_holder_node is None:
                    parts.append("no key-holder SuperNode is connected (transport 'ckks' needs one)")
                raise FlowerEngineError(
                    f"after {opts.discovery_timeout_s:g} s, {len(self.nodes)} SuperNode(s) are connected and "
                    + "; ".join(parts)
                    + ". Start SuperNodes with --node-config 'client-ids=\"...\"' (or 'partition-id=i "
                    "num-partitions=P') covering every client, and one with --node-config "
                    "'role=\"key-holder\"' "
                    "for ckks"
                )
            time.sleep(1.0)
        log.info(
            "flower: %d SuperNodes serve %d clients%s",
            len(self.nodes),
            num_clients,
            f"; key holder {self.key_holder_node}" if self.key_holder_node is not None else "",
        )

    def _register(self, node: int, rec: Any, *, run_id: str) -> None:
        if int(rec["wire_version"]) != P.WIRE_VERSION:
            raise FlowerEngineError(
                f"SuperNode {node} speaks fedsecure wire version {rec['wire_version']}, the ServerApp "
                f"{P.WIRE_VERSION}: install the same fedsecure version on every machine"
            )
        if str(rec["config_hash"]) != run_id:
            raise FlowerEngineError(
                f"SuperNode {node} resolved a different scenario (hash {rec['config_hash']})"
            )
        ids = tuple(int(c) for c in rec["client_ids"])
        sizes = {c: int(n) for c, n in zip(ids, rec["num_examples"], strict=True)}
        info = NodeInfo(node_id=node, role=str(rec["role"]), client_ids=ids, num_examples=sizes)
        if info.role == P.ROLE_KEY_HOLDER:
            if self.key_holder_node is not None and self.key_holder_node != node:
                raise FlowerEngineError(
                    f"two key-holder SuperNodes are connected ({self.key_holder_node} and "
                    f"{node}); start exactly one"
                )
            self.key_holder_node = node
        for c in ids:
            if c in self.client_node and self.client_node[c] != node:
                raise FlowerEngineError(
                    f"client {c} is served by SuperNodes {self.client_node[c]} and {node}; give "
                    "each client to "
                    "exactly one SuperNode"
                )
            expected = self.client_num_examples.get(c)
            if expected != sizes[c]:
                raise FlowerEngineError(
                    f"SuperNode {node} holds {sizes[c]} examples for client {c}, the scenario "
                    f"gives {expected}: "
                    "the SuperNodes run different data"
                )
        self.nodes[node] = info
        for c in ids:
            self.client_node[c] = node

    def group_by_node(self, client_ids: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for c in sorted(int(x) for x in client_ids):
            groups.setdefault(self.client_node[c], []).append(c)
        return groups

    def note_dropouts(self, round_index: int, client_ids: Sequence[int]) -> None:
        self._real_dropouts.setdefault(round_index, set()).update(int(c) for c in client_ids)

    def run(self, *, global_state: AdapterDelta, resume: bool = False) -> AdapterDelta:
        self.discover()
        return super().run(global_state=global_state, resume=resume)

    # ---- the clients' part of a round, on the SuperNodes ----------------------------------
    def _run_info(self) -> RunInfo:
        if self.run_info is None:
            raise FlowerEngineError("FlowerEngine needs the run's RunInfo (Experiment sets engine.run_info)")
        return self.run_info

    def _client_phase(
        self, *, ctx: RoundContext, sent_state: AdapterDelta, dropped: Sequence[int]
    ) -> ClientPhase:
        from flwr.app import ConfigRecord, RecordDict

        simulated = {int(c) for c in dropped}
        groups = self.group_by_node(ctx.sampled_clients)
        defense_states = [d.state_dict() for d in self.defenses]
        global_record = P.adapter_to_record(sent_state)
        transport = self.transport
        ckks_extras = self._ckks_extras(ctx) if transport.name == "ckks" else {}
        requests = {}
        for node, cids in groups.items():
            rec = ConfigRecord(
                {
                    "round": ctx.round,
                    "num_rounds": ctx.num_rounds,
                    "sampled": [int(c) for c in ctx.sampled_clients],
                    "num_clients": ctx.num_clients,
                    "seed": ctx.seed,
                    "global_hash": ctx.global_hash,
                    "run_id": ctx.run_id,
                    "clients": cids,
                    "drop": sorted(c for c in cids if c in simulated),
                    "run_info": P.run_info_to_json(self._run_info()),
                    "defense_state": P.dumps(defense_states),
                    "names": P.dumps(list(sent_state)),
                }
            )
            content = RecordDict({"round": rec, "global": global_record})
            extras = transport.train_extras(ctx, cids) if isinstance(transport, RemoteSecAgg) else ckks_extras
            for k, v in extras.items():
                content[k] = v
            requests[node] = (P.TRAIN, content)
        t_stage = time.perf_counter()
        replies, failures = self.messenger.exchange(
            requests, timeout_s=self.options.train_timeout_s, group_id=f"round-{ctx.round}"
        )
        stage_s = time.perf_counter() - t_stage
        for node, content in replies.items():
            meta = content.config_records["meta"]
            self.train_timing.append(
                {
                    "round": ctx.round,
                    "supernode": node,
                    "clients": groups[node],
                    "stage_s": stage_s,
                    "node_handler_s": float(meta.get("node_handler_s", 0.0)),
                    "node_setup_s": float(meta.get("node_setup_s", 0.0)),
                }
            )
        down = delta_nbytes(sent_state)
        phase = ClientPhase(
            sealed=[],
            sent_meta={},
            rejected=[],
            client_metrics={},
            bytes_up={},
            bytes_down={},
            norms={},
            local_s=0.0,
            dropped=[],
        )
        gone: set[int] = set(self._real_dropouts.pop(ctx.round, set()))
        for node in failures:
            gone.update(groups[node])
        merged = [dict(s) for s in defense_states]
        for node, content in replies.items():
            states = P.loads(str(content.config_records["meta"]["defense_state"]))
            merged = [P.merge_client_state(m, s, groups[node]) for m, s in zip(merged, states, strict=True)]
        for d, state in zip(self.defenses, merged, strict=True):
            d.load_state_dict(state)
        for cid in ctx.sampled_clients:
            phase.bytes_down[cid] = down
            node = self.client_node[cid]
            if node not in replies:
                continue
            content = replies[node]
            meta = content.config_records["meta"]
            metrics = {k: float(v) for k, v in P.loads(str(meta[P.client_key("metrics", cid)])).items()}
            phase.client_metrics[cid] = metrics
            phase.local_s += float(meta[P.client_key("train_s", cid)])
            status = str(meta[P.client_key("status", cid)])
            if status in ("dropped", "lost"):
                gone.add(cid)
                continue
            if status == "rejected":
                reason = str(meta[P.client_key("reason", cid)])
                log.warning("round %d: client %d rejected its own update: %s", ctx.round, cid, reason)
                phase.rejected.append({"client_id": cid, "reason": reason})
                continue
            num_examples = int(meta[P.client_key("num_examples", cid)])
            try:
                sealed, meta_update = self._sealed(ctx, cid, content, meta, num_examples, metrics, sent_state)
            except InvalidUpdateError as err:
                log.warning("round %d: rejected update: %s", ctx.round, err)
                phase.rejected.append({"client_id": cid, "reason": err.reason})
                continue
            if transport.name == "plain":
                phase.norms[cid] = float(
                    math.sqrt(sum(float(v.double().pow(2).sum()) for v in meta_update.delta.values()))
                )
            phase.sealed.append(sealed)
            phase.sent_meta[cid] = meta_update
            phase.bytes_up[cid] = sealed.nbytes
        phase.dropped = sorted(gone | (simulated & set(ctx.sampled_clients)))
        return phase

    def _sealed(
        self,
        ctx: RoundContext,
        cid: int,
        content: Any,
        meta: Any,
        num_examples: int,
        metrics: Mapping[str, float],
        sent_state: AdapterDelta,
    ) -> tuple[Sealed, ClientUpdate]:
        name = self.transport.name
        if name == "plain":
            delta = P.adapter_from_record(
                content.array_records[P.client_key("delta", cid)], names=list(sent_state)
            )
            update = ClientUpdate(
                client_id=cid, round=ctx.round, delta=delta, num_examples=num_examples, metrics=metrics
            )
            update.validate_against(sent_state)  # untrusted input: the server checks what it received
            return self.transport.encode(update, ctx=ctx), update
        meta_update = ClientUpdate(
            client_id=cid, round=ctx.round, delta={}, num_examples=num_examples, metrics=metrics
        )
        if isinstance(self.transport, RemoteSecAgg):
            return self.transport.sealed_from_reply(ctx, cid, content, meta), meta_update
        return self._ckks_sealed(ctx, cid, content, num_examples, sent_state), meta_update

    # ---- ckks helpers --------------------------------------------------------------------
    def _ckks_extras(self, ctx: RoundContext) -> dict[str, Any]:
        from flwr.app import ConfigRecord

        t = self.transport
        key = t.key_holder.public_key
        out: dict[str, Any] = {
            "ckks": ConfigRecord(
                {
                    "context": key.context_bytes,
                    "fingerprint": key.fingerprint,
                    "key_round": -1 if key.round is None else int(key.round),
                    "per_client_bound": float(t.per_client_bound),
                }
            )
        }
        mask = t.plaintext_mask()
        flat = torch.cat([mask[k].reshape(-1) for k in mask]).numpy()
        if flat.any():
            out["ckks_index"] = P.array_record(encrypted_index=np.flatnonzero(~flat).astype(np.int64))
        return out

    def _ckks_sealed(
        self, ctx: RoundContext, cid: int, content: Any, weight: int, sent_state: AdapterDelta
    ) -> Sealed:
        t = self.transport
        rec = content.config_records[P.client_key("ckks", cid)]
        payload = bytes(rec["payload"])
        plaintext = None
        key = P.client_key("plain", cid)
        if key in content.array_records:
            plaintext = P.adapter_from_record(content.array_records[key], names=list(sent_state))
        costs = getattr(t, "_costs", None)
        if costs:
            c = costs[-1]
            c.encrypt_s.append(float(rec["encrypt_s"]))
            c.upload_bytes.append(len(payload))
            c.ciphertext_bytes.append(int(rec["ciphertext_bytes"]))
            c.plaintext_bytes.append(int(rec["plaintext_bytes"]))
            context_bytes = c.context_bytes + c.mask_bytes
        else:
            context_bytes = 0
        return Sealed(
            client_id=cid,
            weight=float(weight),
            payload=payload,
            nbytes=len(payload),
            plaintext=plaintext,
            stage_bytes={"upload": len(payload), "context_download": context_bytes},
        )


# ---------------------------------------------------------------------------------------------
# The ServerApp's main
# ---------------------------------------------------------------------------------------------
def flower_conflicts(experiment: Any) -> list[str]:
    """What a scenario uses that cannot run across processes yet, each with its fix."""
    out: list[str] = []
    t = experiment.transport
    if t.name not in ("plain", "secagg", "ckks"):
        out.append(
            f"transport {t.name!r} has no Flower binding: use plain, secagg or ckks with --engine flower"
        )
    if t.name == "secagg":
        if getattr(t, "signed_keys", False):
            out.append(
                "transport 'secagg' with signed_keys = true needs a PKI of the clients' "
                "long-term keys, which the "
                "Flower engine does not provide yet: set signed_keys = false"
            )
        if getattr(t, "stage_dropout_rates", None):
            out.append(
                "transport 'secagg' stage_dropout_rates simulate dropouts in one process; on "
                "Flower dropouts are "
                "real (a SuperNode that stops answering): remove stage_dropout_rates"
            )
    for d in experiment.defenses:
        if d.name == "dp-fedavg" and getattr(d, "adaptive_clipping", False):
            out.append(
                "defense 'dp-fedavg' with adaptive_clipping needs the clients' clipping bits in the server "
                "process; on Flower use a fixed clip_norm (adaptive_clipping = false)"
            )
    if experiment.client_hook is not None:
        out.append("Experiment.client_hook runs in the simulation only")
    return out


def serve(grid: Any, context: Any) -> None:
    """The ServerApp: run the scenario in ``context.run_config`` with the clients on SuperNodes."""
    from fedsecure.config import config_from_dict
    from fedsecure.experiment import CompatibilityError, Experiment, Results

    rc = context.run_config
    text = str(rc.get(P.RC_SCENARIO, ""))
    out_text = str(rc.get(P.RC_OUT_DIR, ""))
    out = Path(out_text) if out_text else None
    try:
        if not text:
            raise FlowerEngineError("the run config carries no fedsecure scenario (run_config 'scenario')")
        cfg = config_from_dict(tomllib.loads(text))
        options = ServerOptions.from_run_config(rc)
        experiment = Experiment(cfg)
        problems = flower_conflicts(experiment)
        if problems:
            raise CompatibilityError("these parts cannot run on Flower:\n  - " + "\n  - ".join(problems))
        engines: list[FlowerEngine] = []

        def factory(**kwargs: Any) -> FlowerEngine:
            engine = FlowerEngine(grid=grid, options=options, **kwargs)
            engines.append(engine)
            return engine

        experiment.engine_factory = factory
        t0 = time.perf_counter()
        res = experiment.run(out_dir=out, resume=bool(rc.get(P.RC_RESUME, False)))
        engine = engines[0]
        res.cost["engine"] = {
            "name": "flower",
            "supernodes": len(engine.nodes),
            "clients_per_supernode": {
                str(n): list(i.client_ids) for n, i in engine.nodes.items() if i.client_ids
            },
            "key_holder_supernode": engine.key_holder_node,
            "messages": engine.messenger.messages,
            "train_stage_timing": list(engine.train_timing),
            "serverapp_s": time.perf_counter() - t0,
        }
        if out is not None:
            (out / "results.json").write_text(res.to_json())
            Results.load(out)  # the file still reads back
        log.info("flower: run %s finished; results in %s", cfg.name, out)
    except BaseException as err:
        if out is not None:
            (out / "flower").mkdir(parents=True, exist_ok=True)
            (out / "flower" / "server_error.txt").write_text(f"{type(err).__name__}: {err}\n")
        raise
