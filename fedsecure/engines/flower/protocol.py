"""The wire contract between fedsecure's ServerApp and ClientApp on Flower's Message API.

Every exchange is one Flower :class:`~flwr.app.Message` per SuperNode (a SuperNode serves
one or more clients' data partitions and answers for all of them at once). Tensors travel
as Flower arrays (:class:`~flwr.app.ArrayRecord`, numpy ``.npy`` bytes, never pickle);
protocol messages of the secure transports travel as the bytes their own codecs define
(:mod:`fedsecure.defenses.secagg.protocol`, :mod:`fedsecure.defenses.ckks`); small
structured facts travel as JSON strings in :class:`~flwr.app.ConfigRecord` values.

Threat model of this layer: it adds nothing to and removes nothing from the transports'
guarantees. What a client sends is exactly what the transport's client role produces
(plaintext delta for ``plain``; masked ring vectors, shares and keys for ``secagg``;
ciphertexts for ``ckks``); secrets a party needs between two messages stay in its own
SuperNode's ``Context.state`` (on its machine) and are never put in a reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---- message types ("<category>.<action>", routed by the ClientApp) ----------------------
HELLO = "query.fedsecure_hello"
TRAIN = "train.fedsecure_round"
SECAGG_ADVERTISE = "query.fedsecure_secagg_advertise"
SECAGG_SHARE = "query.fedsecure_secagg_share"
SECAGG_UNMASK = "query.fedsecure_secagg_unmask"
CKKS_KEYGEN = "query.fedsecure_ckks_keygen"
CKKS_DECRYPT = "query.fedsecure_ckks_decrypt"

# ---- SuperNode roles (node_config "role") --------------------------------------------------
ROLE_CLIENTS = "clients"
ROLE_KEY_HOLDER = "key-holder"
ROLES = (ROLE_CLIENTS, ROLE_KEY_HOLDER)

# ---- run_config keys (declared in the app template's [tool.flwr.app.config]) --------------
RC_SCENARIO = "scenario"
RC_OUT_DIR = "out-dir"
RC_RESUME = "resume"
RC_DISCOVERY_TIMEOUT = "discovery-timeout-s"
RC_STAGE_TIMEOUT = "stage-timeout-s"
RC_TRAIN_TIMEOUT = "train-timeout-s"

WIRE_VERSION = 1


class NodeConfigError(ValueError):
    """A SuperNode's ``--node-config`` does not say which clients it serves (or says it wrongly)."""


@dataclass(frozen=True)
class NodeAssignment:
    """What one SuperNode is, parsed from its ``node_config``.

    Attributes
    ----------
    role: ``"clients"`` (serves client partitions) or ``"key-holder"`` (CKKS decryptor).
    client_ids: the clients whose data partitions this SuperNode serves (empty for a key holder).
    data_path: optional local file replacing ``data.path`` of a ``local`` dataset on this machine.
    """

    role: str
    client_ids: tuple[int, ...]
    data_path: str | None = None


def _int_list(text: Any, *, key: str) -> tuple[int, ...]:
    if isinstance(text, bool):
        raise NodeConfigError(f'node config {key}={text!r}: expected client ids like "0,3"')
    if isinstance(text, int):
        return (text,)
    if not isinstance(text, str):
        raise NodeConfigError(f'node config {key}={text!r}: expected client ids like "0,3"')
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        raise NodeConfigError(
            f'node config {key}={text!r}: expected comma-separated integers like "0,3"'
        ) from None
    if not ids:
        raise NodeConfigError(f"node config {key}={text!r} lists no client")
    return ids


def parse_node_config(node_config: Mapping[str, Any], *, num_clients: int) -> NodeAssignment:
    """Parse a SuperNode's ``--node-config``.

    Accepted keys: ``role`` (``"clients"`` default, or ``"key-holder"``); for a client node
    either ``client-ids="0,3"`` (explicit) or Flower's ``partition-id=i num-partitions=P``
    (this node serves clients ``c`` with ``c % P == i``); optional ``data-path``.

    Raises
    ------
    NodeConfigError
        With the offending key and an example of a valid configuration.
    """
    role = str(node_config.get("role", ROLE_CLIENTS))
    if role not in ROLES:
        raise NodeConfigError(f"node config role={role!r}: use one of {', '.join(ROLES)}")
    data_path = node_config.get("data-path")
    data_path = str(data_path) if data_path is not None else None
    if role == ROLE_KEY_HOLDER:
        if "client-ids" in node_config or "partition-id" in node_config:
            raise NodeConfigError(
                "a key-holder SuperNode serves no client data: drop client-ids/partition-id from "
                "its node config"
            )
        return NodeAssignment(role=role, client_ids=(), data_path=data_path)
    if "client-ids" in node_config:
        ids = _int_list(node_config["client-ids"], key="client-ids")
    elif "partition-id" in node_config:
        try:
            pid = int(node_config["partition-id"])
            parts = int(node_config.get("num-partitions", 0))
        except (TypeError, ValueError):
            raise NodeConfigError(
                f"node config partition-id={node_config.get('partition-id')!r} "
                f"num-partitions={node_config.get('num-partitions')!r}: both must be integers"
            ) from None
        if parts < 1 or not 0 <= pid < parts:
            raise NodeConfigError(
                f"node config partition-id={pid} num-partitions={parts}: need 0 <= partition-id < "
                "num-partitions"
            )
        ids = tuple(c for c in range(num_clients) if c % parts == pid)
        if not ids:
            raise NodeConfigError(
                f"node config partition-id={pid} num-partitions={parts} gives this SuperNode none of the "
                f"{num_clients} clients; use at most {num_clients} partitions"
            )
    else:
        raise NodeConfigError(
            "this SuperNode's node config does not say which clients it serves: start it with "
            "--node-config 'client-ids=\"0,3\"' or --node-config 'partition-id=0 num-partitions=3' "
            "(or 'role=\"key-holder\"' for the CKKS key holder)"
        )
    if len(set(ids)) != len(ids):
        raise NodeConfigError(f"node config lists a client twice: {list(ids)}")
    bad = [c for c in ids if not 0 <= c < num_clients]
    if bad:
        raise NodeConfigError(
            f"node config names clients {bad}, but the scenario has clients 0..{num_clients - 1} "
            "(data.num_clients)"
        )
    return NodeAssignment(role=role, client_ids=tuple(sorted(ids)), data_path=data_path)


# ---- JSON helpers (small public facts only) ------------------------------------------------
def dumps(obj: Any) -> str:
    """Compact JSON; NaN/Inf allowed (training metrics can be NaN)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, default=_json_default)


def loads(text: str) -> Any:
    return json.loads(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable on the fedsecure wire")


def run_info_to_json(run: Any) -> str:
    """Serialise a :class:`fedsecure.types.RunInfo` (public facts of the run)."""
    return dumps(
        {
            "num_clients": run.num_clients,
            "num_rounds": run.num_rounds,
            "clients_per_round": run.clients_per_round,
            "client_num_examples": {str(k): int(v) for k, v in run.client_num_examples.items()},
            "batch_size": run.batch_size,
            "local_steps": run.local_steps,
            "seed": run.seed,
            "num_parameters": run.num_parameters,
            "dropout_rate": run.dropout_rate,
        }
    )


def run_info_from_json(text: str) -> Any:
    from fedsecure.types import RunInfo

    d = loads(text)
    return RunInfo(
        num_clients=int(d["num_clients"]),
        num_rounds=int(d["num_rounds"]),
        clients_per_round=int(d["clients_per_round"]),
        client_num_examples={int(k): int(v) for k, v in d["client_num_examples"].items()},
        batch_size=int(d["batch_size"]),
        local_steps=int(d["local_steps"]),
        seed=int(d["seed"]),
        num_parameters=int(d["num_parameters"]),
        dropout_rate=float(d["dropout_rate"]),
    )


# ---- adapters as Flower arrays -------------------------------------------------------------
def adapter_to_record(state: Mapping[str, Any]) -> Any:
    """An adapter (name -> tensor, in order) as an :class:`~flwr.app.ArrayRecord` (exact fp32 bytes)."""
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for name, t in state.items():
        arr = t.detach().cpu().contiguous().numpy() if hasattr(t, "detach") else np.asarray(t)
        rec[name] = Array(arr)
    return rec


def adapter_from_record(record: Any, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The inverse of :func:`adapter_to_record` (``names`` fixes and checks the order)."""
    import torch

    keys = list(record.keys()) if names is None else list(names)
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"adapter record lacks tensors {missing[:3]}")
    out = {}
    for k in keys:
        arr = record[k].numpy()
        out[k] = torch.from_numpy(np.array(arr, copy=True))
    return out


def array_record(**arrays: np.ndarray) -> Any:
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = Array(np.ascontiguousarray(v))
    return rec


def client_key(prefix: str, client_id: int) -> str:
    """Record key of one client's item inside a per-node message (``"delta.3"``)."""
    return f"{prefix}.{int(client_id)}"


def merge_client_state(
    server_state: Mapping[str, Any], node_state: Mapping[str, Any], client_ids: Sequence[int]
) -> dict[str, Any]:
    """Fold a node's defense ``state_dict()`` into the server's, for the node's clients only.

    Client-side defense state is keyed by client id one level down (e.g. dp-sgd's
    ``{"histories": {"3": [...]}}``): the entries of ``client_ids`` are taken from the node
    (which trained them this round), everything else stays the server's.
    """
    out = json.loads(json.dumps(dict(server_state)))
    for key, node_value in node_state.items():
        mine = out.get(key)
        if isinstance(mine, dict) and isinstance(node_value, Mapping):
            for cid in client_ids:
                if str(cid) in node_value:
                    mine[str(cid)] = node_value[str(cid)]
    return out
