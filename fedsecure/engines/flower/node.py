"""The SuperNode side: fedsecure's client step (and the CKKS key holder) inside Flower's ClientApp.

Each handler answers one Flower message for every client partition this SuperNode serves.
The client step is :func:`fedsecure.federation.client.run_client`, unchanged; after it, the
transport's *client role* runs here, on the client's machine:

- ``plain``: the (defense-transformed) delta goes back as Flower arrays;
- ``secagg``: a real :class:`~fedsecure.defenses.secagg.protocol.SecAggClient` per client
  advertises keys, deals shares, masks its quantised update and answers the unmask request,
  one Flower message per protocol stage, its secrets kept in this SuperNode's context;
- ``ckks``: the client encrypts under the public context the key holder published; a
  SuperNode started with ``role="key-holder"`` generates the keys and decrypts only the
  aggregate (:class:`~fedsecure.defenses.ckks.CkksKeyHolder`).

Threat model: a SuperNode is one party (a client, or the key holder). It sends the server
only what the transport's client role would send in-process; round secrets stay in its own
``Context.state`` (see :mod:`fedsecure.engines.flower.state`). The scenario (and so the
data recipe) reaches it in the run config; with ``data-path`` in its node config a
``local`` dataset is read from this machine's own file.
"""

from __future__ import annotations

import logging
import math
import time
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsecure.engines.flower import protocol as P

log = logging.getLogger(__name__)


_DATASETS: dict[tuple[str, str | None], Any] = {}
_MODELS: dict[tuple[str, str, int], tuple[Any, Any]] = {}


class NodeProtocolError(RuntimeError):
    """A message this SuperNode cannot honour (wrong clients, wrong run, missing state)."""


# ---------------------------------------------------------------------------------------------
# The scenario as this SuperNode sees it
# ---------------------------------------------------------------------------------------------
class NodeRuntime:
    """The scenario, this SuperNode's assignment and (lazily) its data and model."""

    def __init__(self, context: Any) -> None:
        from fedsecure.config import config_from_dict

        text = context.run_config.get(P.RC_SCENARIO, "")
        if not text:
            raise NodeProtocolError("the run config carries no fedsecure scenario (run_config 'scenario')")
        tree = tomllib.loads(str(text))
        self.context = context
        self.config = config_from_dict(tree)
        self._dataset: Any = None
        node_config = dict(context.node_config)
        key_holder = str(node_config.get("role", P.ROLE_CLIENTS)) == P.ROLE_KEY_HOLDER
        # a key holder holds no client data: it never builds the dataset
        self.assignment = P.parse_node_config(node_config, num_clients=0 if key_holder else self.num_clients)
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            cfg = self.config
            params = dict(cfg.data.params)
            data_path = self.context.node_config.get("data-path")
            if data_path is not None and cfg.data.dataset == "local":
                params["path"] = str(data_path)
            key = (cfg.config_hash(), None if data_path is None else str(data_path))
            if key not in _DATASETS:
                from fedsecure.registry import DATASETS

                _DATASETS.clear()
                _DATASETS[key] = DATASETS.get(cfg.data.dataset)(**{"seed": cfg.seed, **params})
            self._dataset = _DATASETS[key]
        return self._dataset

    @property
    def num_clients(self) -> int:
        return len(self.dataset.clients)

    def num_examples(self, client_id: int) -> int:
        return len(self.dataset.clients[client_id])

    def check_clients(self, client_ids: Sequence[int]) -> None:
        foreign = sorted(set(client_ids) - set(self.assignment.client_ids))
        if foreign:
            raise NodeProtocolError(
                f"this SuperNode serves clients {list(self.assignment.client_ids)}, not {foreign}"
            )

    def model(self) -> tuple[Any, Any]:
        """The peft model, built exactly as the simulation builds it (same base, same LoRA init).

        Flower starts a fresh ClientApp process per message, so this normally builds it; a
        process that handles several messages (tests, or a future warm executor) reuses it, as
        the simulation reuses one model for all clients (each client step loads the global
        adapter first).
        """
        if self._model is None:
            cfg = self.config
            key = (cfg.model.name, repr(cfg.lora), cfg.seed)
            if key not in _MODELS:
                import torch

                from fedsecure.federation.client import derive_seed
                from fedsecure.models import attach_lora, load_model

                base, tok = load_model(cfg.model.name, seed=0)
                torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
                _MODELS.clear()
                _MODELS[key] = (attach_lora(base, cfg.lora), tok)
            self._model, self._tokenizer = _MODELS[key]
        return self._model, self._tokenizer

    def features(self, client_id: int) -> list[Any]:
        from fedsecure.data.tokenize import encode_dataset

        _, tok = self.model()
        return encode_dataset(
            tok, list(self.dataset.clients[client_id]), max_length=self.config.data.max_length
        )

    def transport(self) -> Any:
        from fedsecure.registry import TRANSPORTS

        t = self.config.transport
        return TRANSPORTS.get(t.name)(**dict(t.params))

    def defenses(self) -> list[Any]:
        from fedsecure.registry import DEFENSES

        return [DEFENSES.get(d.name)(**dict(d.params)) for d in self.config.defenses]


def _reply(message: Any, content: Any) -> Any:
    from flwr.app import Message

    return Message(content, reply_to=message)


def _config(message: Any, name: str) -> Any:
    try:
        return message.content.config_records[name]
    except KeyError:
        raise NodeProtocolError(
            f"message {message.metadata.message_type} lacks its {name!r} record"
        ) from None


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------
def handle_hello(message: Any, context: Any) -> Any:
    """Report this SuperNode's role, clients and their example counts (public metadata)."""
    from flwr.app import ConfigRecord, RecordDict

    import fedsecure

    rt = NodeRuntime(context)
    a = rt.assignment
    rec = ConfigRecord(
        {
            "wire_version": P.WIRE_VERSION,
            "fedsecure_version": str(getattr(fedsecure, "__version__", "")),
            "role": a.role,
            "client_ids": [int(c) for c in a.client_ids],
            "num_examples": [rt.num_examples(c) for c in a.client_ids],
            "config_hash": rt.config.config_hash(),
        }
    )
    return _reply(message, RecordDict({"hello": rec}))


# ---------------------------------------------------------------------------------------------
# Secure aggregation: per-client state in this SuperNode's context
# ---------------------------------------------------------------------------------------------
def _secagg_key(client_id: int) -> str:
    return f"fedsecure.secagg.{int(client_id)}"


def _save_secagg(context: Any, client: Any, *, global_hash: str, run_id: str) -> None:
    from flwr.app import ConfigRecord

    from fedsecure.engines.flower.state import export_secagg_client

    context.state[_secagg_key(client.client_id)] = ConfigRecord(
        {
            "run_id": run_id,
            "round": int(client.setup.round),
            "state": export_secagg_client(client, global_hash=global_hash),
        }
    )


def _load_secagg(context: Any, client_id: int, *, round_: int, run_id: str) -> tuple[Any, str] | None:
    from fedsecure.engines.flower.state import import_secagg_client

    rec = context.state.config_records.get(_secagg_key(client_id))
    if rec is None or rec["run_id"] != run_id or int(rec["round"]) != int(round_):
        return None
    return import_secagg_client(bytes(rec["state"]))


def _drop_secagg(context: Any, client_id: int) -> None:
    key = _secagg_key(client_id)
    if key in context.state.config_records:
        del context.state.config_records[key]


def handle_secagg_advertise(message: Any, context: Any) -> Any:
    """Stage 1: fresh key pairs for each listed client; reply their public halves."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.defenses.secagg.protocol import RoundSetup, SecAggClient

    rt = NodeRuntime(context)
    rec = _config(message, "secagg")
    setup = RoundSetup.from_bytes(bytes(rec["setup"]))
    if setup.run_id != rt.config.config_hash():
        raise NodeProtocolError(
            f"the secure-aggregation round is for run {setup.run_id!r}, this SuperNode runs "
            f"{rt.config.config_hash()!r} (a different scenario)"
        )
    clients = [int(c) for c in rec["clients"]]
    rt.check_clients(clients)
    global_hash = str(rec["global_hash"])
    out = ConfigRecord()
    for cid in clients:
        client = SecAggClient(cid, setup, global_hash=global_hash)
        out[P.client_key("advertise", cid)] = client.advertise_keys().to_bytes()
        _save_secagg(context, client, global_hash=global_hash, run_id=setup.run_id)
    return _reply(message, RecordDict({"secagg": out}))


def _stage_clients(rec: Any, prefix: str) -> list[int]:
    return sorted(int(k.split(".", 1)[1]) for k in rec if k.startswith(prefix + "."))


def handle_secagg_share(message: Any, context: Any) -> Any:
    """Stage 2: check the neighbours' keys, deal encrypted Shamir shares to them."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.defenses.secagg.protocol import NeighbourKeys

    rt = NodeRuntime(context)
    rec = _config(message, "secagg")
    round_, run_id = int(rec["round"]), str(rec["run_id"])
    out = ConfigRecord()
    lost = []
    clients = _stage_clients(rec, "neighbours")
    rt.check_clients(clients)
    for cid in clients:
        loaded = _load_secagg(context, cid, round_=round_, run_id=run_id)
        if loaded is None:
            lost.append(cid)
            continue
        client, global_hash = loaded
        msg = NeighbourKeys.from_bytes(bytes(rec[P.client_key("neighbours", cid)]))
        out[P.client_key("share", cid)] = client.share_keys(msg).to_bytes()
        _save_secagg(context, client, global_hash=global_hash, run_id=run_id)
    out["lost"] = lost
    return _reply(message, RecordDict({"secagg": out}))


def handle_secagg_unmask(message: Any, context: Any) -> Any:
    """Stage 4: reveal the requested shares (once), then forget every secret of the round."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.defenses.secagg.protocol import UnmaskRequest

    rt = NodeRuntime(context)
    rec = _config(message, "secagg")
    round_, run_id = int(rec["round"]), str(rec["run_id"])
    out = ConfigRecord()
    lost = []
    clients = _stage_clients(rec, "request")
    rt.check_clients(clients)
    for cid in clients:
        loaded = _load_secagg(context, cid, round_=round_, run_id=run_id)
        if loaded is None:
            lost.append(cid)
            continue
        client, _ = loaded
        req = UnmaskRequest.from_bytes(bytes(rec[P.client_key("request", cid)]))
        try:
            out[P.client_key("response", cid)] = client.unmask(req).to_bytes()
        finally:
            _drop_secagg(context, cid)
    out["lost"] = lost
    return _reply(message, RecordDict({"secagg": out}))


# ---------------------------------------------------------------------------------------------
# CKKS key holder
# ---------------------------------------------------------------------------------------------
_CKKS_STATE = "fedsecure.ckks.key_holder"


def _key_holder_node(context: Any) -> tuple[NodeRuntime, Any]:
    rt = NodeRuntime(context)
    if rt.assignment.role != P.ROLE_KEY_HOLDER:
        raise NodeProtocolError(
            "this SuperNode is not the CKKS key holder (start one with --node-config 'role=\"key-holder\"')"
        )
    transport = rt.transport()
    if transport.name != "ckks":
        raise NodeProtocolError(f"the scenario's transport is {transport.name!r}, not 'ckks'")
    return rt, transport


def handle_ckks_keygen(message: Any, context: Any) -> Any:
    """Generate a fresh CKKS key pair; keep the secret here; reply the public context."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.engines.flower.state import export_ckks_key_holder

    rt, transport = _key_holder_node(context)
    rec = _config(message, "ckks")
    run_id = str(rec["run_id"])
    if run_id != rt.config.config_hash():
        raise NodeProtocolError(
            f"key request for run {run_id!r}, this SuperNode runs {rt.config.config_hash()!r}"
        )
    round_ = int(rec["round"])
    holder = transport.key_holder
    t0 = time.perf_counter()
    pub = holder.new_context(round=None if round_ < 0 else round_, run_id=run_id)
    keygen_s = time.perf_counter() - t0
    context.state[_CKKS_STATE] = ConfigRecord({"run_id": run_id, "state": export_ckks_key_holder(holder)})
    out = ConfigRecord(
        {"context": pub.context_bytes, "fingerprint": pub.fingerprint, "round": round_, "keygen_s": keygen_s}
    )
    return _reply(message, RecordDict({"ckks": out}))


def handle_ckks_decrypt(message: Any, context: Any) -> Any:
    """Decrypt the aggregate (once per round) and reply the released weighted sum."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.defenses.ckks import RoundLayout
    from fedsecure.engines.flower.state import export_ckks_key_holder, import_ckks_key_holder
    from fedsecure.models.lora import FlatSpec

    rt, transport = _key_holder_node(context)
    rec = _config(message, "ckks")
    stored = context.state.config_records.get(_CKKS_STATE)
    if stored is None or stored["run_id"] != rt.config.config_hash():
        raise NodeProtocolError("the key holder holds no key of this run (was the SuperNode restarted?)")
    holder = import_ckks_key_holder(
        bytes(stored["state"]),
        params=transport.params,
        flooding_std_coeff_units=transport.key_holder.flooding_std_coeff_units,
    )
    arrays = message.content.array_records["layout"]
    spec = FlatSpec(
        names=tuple(P.loads(str(rec["names"]))), shapes=tuple(tuple(s) for s in P.loads(str(rec["shapes"])))
    )
    layout = RoundLayout(
        round=int(rec["round"]),
        spec=spec,
        slots=int(rec["slots"]),
        encrypted_index=np.asarray(arrays["encrypted_index"].numpy(), dtype=np.int64),
        plaintext_index=np.asarray(arrays["plaintext_index"].numpy(), dtype=np.int64),
    )
    try:
        flat, header = holder.decrypt_aggregate(
            bytes(rec["payload"]), layout=layout, num_clients=int(rec["num_clients"])
        )
    finally:
        # the one-decryption-per-round rule must outlive this process, whatever happened
        context.state[_CKKS_STATE] = ConfigRecord(
            {"run_id": stored["run_id"], "state": export_ckks_key_holder(holder)}
        )
    out = ConfigRecord({"header": P.dumps(header)})
    return _reply(message, RecordDict({"ckks": out, "aggregate": P.array_record(flat=np.asarray(flat))}))


# ---------------------------------------------------------------------------------------------
# The client step
# ---------------------------------------------------------------------------------------------
def _round_context(rec: Any) -> Any:
    from fedsecure.types import RoundContext

    return RoundContext(
        round=int(rec["round"]),
        num_rounds=int(rec["num_rounds"]),
        sampled_clients=tuple(int(c) for c in rec["sampled"]),
        num_clients=int(rec["num_clients"]),
        seed=int(rec["seed"]),
        global_hash=str(rec["global_hash"]),
        run_id=str(rec["run_id"]),
    )


def _load_defenses(rt: NodeRuntime, rec: Any, run_info: Any) -> list[Any]:
    defenses = rt.defenses()
    states = P.loads(str(rec["defense_state"]))
    if len(states) != len(defenses):
        raise NodeProtocolError(f"server sent {len(states)} defense states for {len(defenses)} defenses")
    for d, state in zip(defenses, states, strict=True):
        d.setup(run_info)
        d.load_state_dict(state)
    return defenses


def handle_train(message: Any, context: Any) -> Any:
    """Train this SuperNode's sampled clients from the global adapter and encode their updates."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsecure.federation.client import run_client
    from fedsecure.types import InvalidUpdateError

    t_handler = time.perf_counter()
    rt = NodeRuntime(context)
    rec = _config(message, "round")
    ctx = _round_context(rec)
    if ctx.run_id != rt.config.config_hash():
        raise NodeProtocolError(
            f"training request for run {ctx.run_id!r}, this SuperNode runs "
            f"{rt.config.config_hash()!r} (a different scenario)"
        )
    clients = [int(c) for c in rec["clients"]]
    rt.check_clients(clients)
    simulated_drop = {int(c) for c in rec["drop"]}
    run_info = P.run_info_from_json(str(rec["run_info"]))
    defenses = _load_defenses(rt, rec, run_info)
    names = P.loads(str(rec["names"]))
    global_state = P.adapter_from_record(message.content.array_records["global"], names=names)
    encoder = _encoder_for(rt, message, ctx, global_state, context)
    model, tok = rt.model()
    features = {cid: rt.features(cid) for cid in clients}
    meta = ConfigRecord({"node_setup_s": time.perf_counter() - t_handler})
    content = RecordDict()
    for cid in clients:
        announced = encoder.announced_hash(cid, ctx)
        res = run_client(
            model=model,
            global_state=global_state,
            announced_hash=announced,
            features=features[cid],
            num_examples=rt.num_examples(cid),
            fed=rt.config.federation,
            defenses=defenses,
            ctx=ctx,
            client_id=cid,
            pad_token_id=int(tok.pad_token_id),
        )
        update = res.update
        meta[P.client_key("metrics", cid)] = P.dumps({k: float(v) for k, v in update.metrics.items()})
        meta[P.client_key("train_s", cid)] = float(res.train_seconds)
        meta[P.client_key("num_examples", cid)] = int(update.num_examples)
        if cid in simulated_drop:
            meta[P.client_key("status", cid)] = "dropped"
            continue
        try:
            update.validate_against(global_state)
            status = encoder.encode(update, content, meta)
        except InvalidUpdateError as err:
            meta[P.client_key("status", cid)] = "rejected"
            meta[P.client_key("reason", cid)] = err.reason
            continue
        meta[P.client_key("status", cid)] = status
    meta["defense_state"] = P.dumps([d.state_dict() for d in defenses])
    meta["node_handler_s"] = time.perf_counter() - t_handler
    content["meta"] = meta
    return _reply(message, content)


class _PlainEncoder:
    """``plain``: the update itself travels (as Flower arrays)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def announced_hash(self, client_id: int, ctx: Any) -> str:
        return ctx.global_hash

    def encode(self, update: Any, content: Any, meta: Any) -> str:
        content[P.client_key("delta", update.client_id)] = P.adapter_to_record(update.delta)
        return "ok"


class _SecAggEncoder:
    """``secagg`` stage 3: quantise ``delta * num_examples`` and mask it (this client's SecAggClient)."""

    def __init__(self, message: Any, ctx: Any, global_state: Mapping[str, Any], context: Any) -> None:
        self.rec = message.content.config_records.get("secagg")
        if self.rec is None:
            raise NodeProtocolError("secure-aggregation training request without forwarded shares")
        self.ctx = ctx
        self.context = context
        self.names = list(global_state)
        self.clients: dict[int, tuple[Any, str]] = {}
        for cid in _stage_clients(self.rec, "forwarded"):
            loaded = _load_secagg(context, cid, round_=ctx.round, run_id=ctx.run_id)
            if loaded is not None:
                self.clients[cid] = loaded

    def announced_hash(self, client_id: int, ctx: Any) -> str:
        # the hash announced (and bound into the keys) at stage 1, not the one in this message
        loaded = self.clients.get(client_id)
        return loaded[1] if loaded is not None else ctx.global_hash

    def encode(self, update: Any, content: Any, meta: Any) -> str:
        import warnings

        from fedsecure.defenses.secagg.protocol import ForwardedShares
        from fedsecure.types import InvalidUpdateError

        cid = update.client_id
        if cid not in self.clients:
            return "lost"  # no secure-aggregation state for this round: this client left the protocol
        client, global_hash = self.clients[cid]
        weight = float(update.num_examples)
        if weight > client.setup.max_weight:
            raise InvalidUpdateError(
                cid,
                f"num_examples={update.num_examples} exceeds the secagg "
                f"max_weight={client.setup.max_weight:g} "
                "the ring was sized for; set [transport] max_weight to at least the largest num_examples",
            )
        import torch

        vec = torch.cat([update.delta[k].detach().reshape(-1).to(torch.float32) for k in self.names]).numpy()
        forwarded = ForwardedShares.from_bytes(bytes(self.rec[P.client_key("forwarded", cid)]))
        t0 = time.perf_counter()
        msg = client.masked_input(forwarded, vec, weight=weight)
        meta[P.client_key("mask_s", cid)] = time.perf_counter() - t0
        if client.clipped:
            warnings.warn(
                f"secagg: client {cid} clipped {client.clipped} of {vec.size} coordinates to "
                f"clip_range={client.setup.clip_range}; raise clip_range if the delta is legitimately larger",
                stacklevel=2,
            )
        meta[P.client_key("clipped", cid)] = int(client.clipped)
        meta[P.client_key("weight", cid)] = float(msg.weight)
        content[P.client_key("masked", cid)] = P.array_record(vector=msg.vector)
        _save_secagg(self.context, client, global_hash=global_hash, run_id=self.ctx.run_id)
        return "ok"


class _CkksEncoder:
    """``ckks``: encrypt ``delta * num_examples`` under the key holder's public context."""

    def __init__(self, rt: NodeRuntime, message: Any, ctx: Any, global_state: Mapping[str, Any]) -> None:
        from fedsecure.defenses.ckks import CkksClient, PublicRoundKey, RoundLayout
        from fedsecure.models.lora import FlatSpec

        rec = message.content.config_records.get("ckks")
        if rec is None:
            raise NodeProtocolError("CKKS training request without the public context")
        transport = rt.transport()
        self.params = transport.params
        key_round = int(rec["key_round"])
        key = PublicRoundKey(
            round=None if key_round < 0 else key_round,
            context_bytes=bytes(rec["context"]),
            fingerprint=str(rec["fingerprint"]),
        )
        from fedsecure.defenses.ckks import context_fingerprint

        if context_fingerprint(key.context_bytes, run_id=ctx.run_id, round=key.round) != key.fingerprint:
            raise NodeProtocolError("the CKKS public context does not match its fingerprint")
        self.client = CkksClient(params=self.params)
        self.client.load(key)  # refuses a context that holds a secret key
        n = sum(int(math.prod(t.shape)) for t in global_state.values())
        enc = message.content.array_records.get("ckks_index")
        everything = np.arange(n)
        encrypted = everything if enc is None else np.asarray(enc["encrypted_index"].numpy(), dtype=np.int64)
        self.layout = RoundLayout(
            round=ctx.round,
            spec=FlatSpec.of(global_state),
            slots=self.params.slots,
            encrypted_index=encrypted,
            plaintext_index=np.setdiff1d(everything, encrypted, assume_unique=True),
        )
        self.per_client_bound = float(rec["per_client_bound"])

    def announced_hash(self, client_id: int, ctx: Any) -> str:
        return ctx.global_hash

    def encode(self, update: Any, content: Any, meta: Any) -> str:
        from flwr.app import ConfigRecord

        cid = update.client_id
        t0 = time.perf_counter()
        payload, sizes = self.client.seal(update, layout=self.layout, per_client_bound=self.per_client_bound)
        rec = ConfigRecord(
            {
                "payload": payload,
                "encrypt_s": time.perf_counter() - t0,
                "ciphertext_bytes": int(sizes["ciphertext"]),
                "plaintext_bytes": int(sizes["plaintext"]),
            }
        )
        content[P.client_key("ckks", cid)] = rec
        if self.layout.num_plaintext:
            mask = self.layout.mask()
            plain = {k: v.detach().float() * mask[k] for k, v in update.delta.items()}
            content[P.client_key("plain", cid)] = P.adapter_to_record(plain)
        return "ok"


def _encoder_for(
    rt: NodeRuntime, message: Any, ctx: Any, global_state: Mapping[str, Any], context: Any
) -> Any:
    name = rt.config.transport.name
    if name == "plain":
        return _PlainEncoder(ctx)
    if name == "secagg":
        return _SecAggEncoder(message, ctx, global_state, context)
    if name == "ckks":
        return _CkksEncoder(rt, message, ctx, global_state)
    raise NodeProtocolError(f"transport {name!r} has no Flower client role (plain, secagg, ckks)")
