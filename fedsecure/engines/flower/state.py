"""A party's protocol state between two Flower messages (each handled by a fresh ClientApp process).

Flower's deployment engine starts one ClientApp process per message; what a party must
remember from one protocol stage to the next lives in its SuperNode's ``Context.state``
(kept in the SuperNode's memory on that party's machine, never sent to the SuperLink).
This module turns the two stateful roles into bytes and back -- explicit JSON with hex
fields, never pickle:

- a secure-aggregation client (:class:`~fedsecure.defenses.secagg.protocol.SecAggClient`)
  between ``advertise_keys``, ``share_keys``, ``masked_input`` and ``unmask``: its two
  X25519 private keys, its self-mask seed, its neighbours' advertised keys and the shares it
  holds for them -- exactly the secrets the in-process object keeps, dropped at the same
  stage (the exported state after ``unmask`` holds none);
- the CKKS key holder (:class:`~fedsecure.defenses.ckks.CkksKeyHolder`) between key
  generation and decryption: its TenSEAL context *with* the secret key, the public context
  it published, and the rounds it has already decrypted (the one-decryption-per-round rule
  survives process boundaries).

Threat model: these bytes are as secret as the objects they encode. They are written only
into the owning SuperNode's context, which Flower keeps local to that SuperNode; anyone who
can read a SuperNode's memory learns that party's round secrets, as with the in-process
objects. They are never logged.
"""

from __future__ import annotations

import json
from typing import Any

_SECAGG_MAGIC = "fedsecure/secagg-client-state/v1"
_CKKS_MAGIC = "fedsecure/ckks-key-holder-state/v1"


class StateFormatError(ValueError):
    """Bytes that are not a state this module wrote (or of another version)."""


def _hex(b: bytes | None) -> str | None:
    return None if b is None else bytes(b).hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def export_secagg_client(client: Any, *, global_hash: str) -> bytes:
    """Serialise a :class:`SecAggClient` (unsigned rounds) with its current round secrets."""
    from fedsecure._hazmat import agreement as ka

    if client.setup.signed:
        raise ValueError("signed secure-aggregation rounds (signed_keys) cannot be carried between processes")
    doc = {
        "magic": _SECAGG_MAGIC,
        "client_id": client.client_id,
        "setup": client.setup.to_bytes().hex(),
        "global_hash": global_hash,
        "stage": client.stage.value,
        "enc_sk": _hex(ka.x25519_private_bytes(client._enc_sk)) if client._enc_sk is not None else None,
        "mask_sk": _hex(ka.x25519_private_bytes(client._mask_sk)) if client._mask_sk is not None else None,
        "self_seed": _hex(client._self_seed),
        "peer_keys": {str(c): m.to_bytes().hex() for c, m in client._peer_keys.items()},
        "held_seed": {str(c): s.hex() for c, s in client._held_seed.items()},
        "held_key": {str(c): s.hex() for c, s in client._held_key.items()},
        "share_senders": sorted(int(c) for c in client.share_senders),
        "clipped": int(client.clipped),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def import_secagg_client(data: bytes) -> tuple[Any, str]:
    """Rebuild a :class:`SecAggClient` from :func:`export_secagg_client`; returns it and its global hash.

    The round set-up is re-validated by the constructor (the cheap malicious-server checks
    run again in every process).
    """
    from fedsecure._hazmat import agreement as ka
    from fedsecure.defenses.secagg.protocol import AdvertiseKeys, ClientStage, RoundSetup, SecAggClient

    try:
        doc = json.loads(bytes(data).decode())
        if doc.get("magic") != _SECAGG_MAGIC:
            raise StateFormatError("not a fedsecure secure-aggregation client state")
        setup = RoundSetup.from_bytes(bytes.fromhex(doc["setup"]))
        client = SecAggClient(int(doc["client_id"]), setup, global_hash=str(doc["global_hash"]))
        client.stage = ClientStage(doc["stage"])
        client._enc_sk = ka.x25519_from_private_bytes(_unhex(doc["enc_sk"])) if doc["enc_sk"] else None
        client._mask_sk = ka.x25519_from_private_bytes(_unhex(doc["mask_sk"])) if doc["mask_sk"] else None
        client._self_seed = _unhex(doc["self_seed"]) or b""
        client._peer_keys = {
            int(c): AdvertiseKeys.from_bytes(bytes.fromhex(m)) for c, m in doc["peer_keys"].items()
        }
        client._held_seed = {int(c): bytes.fromhex(s) for c, s in doc["held_seed"].items()}
        client._held_key = {int(c): bytes.fromhex(s) for c, s in doc["held_key"].items()}
        client.share_senders = frozenset(int(c) for c in doc["share_senders"])
        client.clipped = int(doc["clipped"])
    except StateFormatError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise StateFormatError(f"corrupt secure-aggregation client state ({type(err).__name__})") from None
    return client, str(doc["global_hash"])


def export_ckks_key_holder(holder: Any) -> bytes:
    """Serialise a :class:`CkksKeyHolder` that has generated a context (secret key included)."""
    if holder._secret_context is None or holder._public is None:
        raise ValueError("the key holder has no context to export; call new_context first")
    secret = holder._secret_context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    pub = holder._public
    doc = {
        "magic": _CKKS_MAGIC,
        "secret_context": secret.hex(),
        "public_round": pub.round,
        "public_context": pub.context_bytes.hex(),
        "fingerprint": pub.fingerprint,
        "opened_rounds": sorted(int(r) for r in holder._opened_rounds),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def import_ckks_key_holder(data: bytes, *, params: Any, flooding_std_coeff_units: float) -> Any:
    """Rebuild a :class:`CkksKeyHolder` from :func:`export_ckks_key_holder`."""
    from fedsecure.defenses.ckks import CkksKeyHolder, PublicRoundKey, _tenseal

    try:
        doc = json.loads(bytes(data).decode())
        if doc.get("magic") != _CKKS_MAGIC:
            raise StateFormatError("not a fedsecure CKKS key-holder state")
        holder = CkksKeyHolder(params=params, flooding_std_coeff_units=flooding_std_coeff_units)
        holder._secret_context = _tenseal().context_from(bytes.fromhex(doc["secret_context"]), n_threads=1)
        holder._public = PublicRoundKey(
            round=doc["public_round"],
            context_bytes=bytes.fromhex(doc["public_context"]),
            fingerprint=str(doc["fingerprint"]),
        )
        holder._opened_rounds = {int(r) for r in doc["opened_rounds"]}
    except StateFormatError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise StateFormatError(f"corrupt CKKS key-holder state ({type(err).__name__})") from None
    if not holder._secret_context.has_secret_key():
        raise StateFormatError("the CKKS key-holder state carries no secret key")
    return holder
