"""The server step: a plain function of its inputs (the same code on every engine).

collect (tolerating dropouts) -> ``transport.combine`` -> aggregator -> ``transport.open``
-> ``post_aggregate`` (central DP noise) -> apply -> accountants. Observers run after.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsecure.defenses.base import Defense
from fedsecure.federation.aggregation import Aggregator
from fedsecure.federation.transport import Sealed, Transport
from fedsecure.types import AdapterDelta, ClientUpdate, RoundContext, View


class TooFewUpdatesError(RuntimeError):
    """Not enough client updates arrived to aggregate this round."""


def sample_clients(*, num_clients: int, per_round: int, seed: int, round_index: int) -> tuple[int, ...]:
    """Uniform sample without replacement, deterministic in (seed, round)."""
    from fedsecure.federation.client import derive_seed

    rng = np.random.default_rng(derive_seed(seed, round_index, "sample"))
    chosen = rng.choice(num_clients, size=per_round, replace=False)
    return tuple(sorted(int(c) for c in chosen))


@dataclass
class ServerRoundResult:
    new_global: AdapterDelta
    delta: AdapterDelta
    aggregated_clients: tuple[int, ...]
    per_client_plaintext: list[ClientUpdate] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)


def server_round(
    *,
    global_state: Mapping[str, torch.Tensor],
    ctx: RoundContext,
    sealed: Sequence[Sealed],
    dropped: Sequence[int],
    transport: Transport,
    aggregator: Aggregator,
    defenses: Sequence[Defense],
    updates_meta: Mapping[int, ClientUpdate] | None = None,
    min_updates: int = 1,
) -> ServerRoundResult:
    """Combine the sealed updates that arrived and apply the aggregate to ``global_state``.

    ``updates_meta`` carries each arrived client's public metadata (id, example count);
    its ``delta`` is used only when the transport exposes per-client plaintext.
    """
    if len(sealed) < min_updates:
        raise TooFewUpdatesError(
            f"round {ctx.round}: only {len(sealed)} of {len(ctx.sampled_clients)} sampled clients sent an "
            f"update (need {min_updates}); lower federation.dropout_rate or sample more clients"
        )
    t0 = time.perf_counter()
    combined = transport.combine(sealed, ctx=ctx, dropped=dropped)
    t1 = time.perf_counter()
    per_client: list[ClientUpdate] = []
    if transport.exposes & {View.SERVER_PER_CLIENT, View.SERVER_PER_CLIENT_PARTIAL}:
        for s in sealed:
            if s.plaintext is not None:
                meta = (updates_meta or {}).get(s.client_id)
                per_client.append(
                    ClientUpdate(
                        client_id=s.client_id,
                        round=ctx.round,
                        delta=s.plaintext,
                        num_examples=int(s.weight),
                        metrics=dict(meta.metrics) if meta else {},
                    )
                )
    if aggregator.needs_per_client:
        if View.SERVER_PER_CLIENT not in transport.exposes:
            raise RuntimeError(f"aggregator {aggregator.name} needs per-client updates (validation should catch this)")
        delta = aggregator.aggregate(per_client)
        t2 = time.perf_counter()
    else:
        opened = transport.open(combined, ctx=ctx)
        t2 = time.perf_counter()
        delta = aggregator.from_sum(opened, total_weight=combined.total_weight)
    for d in defenses:
        delta = d.post_aggregate(delta, ctx=ctx, num_updates=len(sealed))
    for k, v in delta.items():
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"round {ctx.round}: the aggregate of {k} is not finite; the global model is kept")
    new_global = {k: global_state[k].float() + delta[k].float() for k in global_state}
    privacy: dict[str, float] = {}
    for d in defenses:
        privacy.update({k: float(v) for k, v in d.account(ctx=ctx).items()})
    t3 = time.perf_counter()
    return ServerRoundResult(
        new_global=new_global,
        delta=delta,
        aggregated_clients=combined.client_ids,
        per_client_plaintext=per_client,
        seconds={"combine_s": t1 - t0, "open_s": t2 - t1, "apply_s": t3 - t2},
        privacy=privacy,
    )


def public_metadata(updates: Mapping[int, ClientUpdate]) -> dict[int, dict[str, Any]]:
    return {cid: {"num_examples": u.num_examples} for cid, u in updates.items()}
