"""The embedded simulation engine: all parties in one process, run round by round.

The client step (:func:`fedsecure.federation.client.run_client`) and the server step
(:func:`fedsecure.federation.server.server_round`) are the same functions any other
engine calls; this module only schedules them, simulates dropouts, runs observers,
evaluates, checkpoints and measures cost.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.attacks.base import Attack, RoundObservation
from fedsecure.config import ExperimentConfig
from fedsecure.defenses.base import Defense
from fedsecure.federation.aggregation import Aggregator
from fedsecure.federation.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedsecure.federation.client import derive_seed, run_client
from fedsecure.federation.evaluation import evaluate
from fedsecure.federation.server import ServerRoundResult, sample_clients, server_round
from fedsecure.federation.transport import Sealed, Transport, delta_nbytes
from fedsecure.models.lora import set_adapter_state
from fedsecure.types import (
    AdapterDelta,
    ClientUpdate,
    InvalidUpdateError,
    RoundAbortedError,
    RoundContext,
    adapter_hash,
)

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``."""

    round: int
    sampled: list[int]
    aggregated: list[int]
    dropped: list[int]
    rejected: list[dict[str, Any]]
    round_s: float
    local_train_s: float
    eval_s: float
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    client_metrics: dict[int, dict[str, float]]
    eval: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    server_s: dict[str, float] = field(default_factory=dict)
    update_norms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sampled": self.sampled,
            "aggregated": self.aggregated,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "round_s": self.round_s,
            "local_train_s": self.local_train_s,
            "overhead_fraction": max(0.0, 1.0 - self.local_train_s / self.round_s) if self.round_s > 0 else 0.0,
            "eval_s": self.eval_s,
            "bytes_up": {str(k): v for k, v in self.bytes_up.items()},
            "bytes_down": {str(k): v for k, v in self.bytes_down.items()},
            "client_metrics": {str(k): v for k, v in self.client_metrics.items()},
            "update_norms": {str(k): v for k, v in self.update_norms.items()},
            **self.eval,
            "privacy": self.privacy,
            "server_s": self.server_s,
        }


@dataclass
class ClientPhase:
    """What the clients' part of a round produced, as the server receives it."""

    sealed: list[Sealed]
    sent_meta: dict[int, ClientUpdate]
    rejected: list[dict[str, Any]]
    client_metrics: dict[int, dict[str, float]]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    norms: dict[int, float]
    local_s: float
    dropped: list[int]
    """Sampled clients whose update did not arrive (simulated or real dropouts)."""


ClientHook = Callable[[ClientUpdate, RoundContext], ClientUpdate]


class SimulationEngine:
    """Run a federation in-process.

    Parameters
    ----------
    config: the validated scenario.
    model: the peft model shared by all simulated parties (adapters are swapped in).
    tokenizer: its tokenizer.
    client_features: per-client tokenised training examples.
    eval_features / eval_groups: held-out eval examples and their group (locale) labels.
    client_groups: each client's group label, for per-client eval figures.
    client_hook: test hook applied to each client's update before it is validated
        (e.g. to inject a faulty client); ``None`` in normal runs.
    """

    def __init__(
        self,
        *,
        config: ExperimentConfig,
        model: Any,
        tokenizer: Any,
        client_features: Sequence[Sequence[Mapping[str, Sequence[int]]]],
        client_num_examples: Mapping[int, int],
        eval_features: Sequence[Mapping[str, Sequence[int]]],
        eval_groups: Sequence[Any] | None,
        client_groups: Mapping[int, Any],
        transport: Transport,
        aggregator: Aggregator,
        defenses: Sequence[Defense],
        observers: Sequence[Attack],
        ground_truth: Mapping[int, Sequence[Mapping[str, Any]]],
        out_dir: Path | None,
        progress: bool = False,
        client_hook: ClientHook | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.client_features = client_features
        self.client_num_examples = client_num_examples
        self.eval_features = eval_features
        self.eval_groups = eval_groups
        self.client_groups = client_groups
        self.transport = transport
        self.aggregator = aggregator
        self.defenses = list(defenses)
        self.observers = list(observers)
        self.ground_truth = ground_truth
        self.out_dir = out_dir
        self.progress = progress
        self.client_hook = client_hook
        self.history: list[dict[str, Any]] = []
        self.initial_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _evaluate(self, state: AdapterDelta) -> dict[str, Any]:
        fed = self.config.federation
        feats = self.eval_features
        groups = self.eval_groups
        if fed.max_eval_examples is not None:
            feats = feats[: fed.max_eval_examples]
            groups = groups[: fed.max_eval_examples] if groups is not None else None
        set_adapter_state(self.model, state)
        out = evaluate(self.model, feats, batch_size=fed.eval_batch_size, pad_token_id=self._pad_id(), groups=groups)
        by_group = out.pop("eval_loss_by_group", None)
        if by_group is not None:
            out["eval_loss_by_client"] = {
                str(c): by_group[str(g)] for c, g in self.client_groups.items() if str(g) in by_group
            }
        return out

    def _drop(self, sampled: Sequence[int], round_index: int) -> list[int]:
        rate = self.config.federation.dropout_rate
        if rate <= 0:
            return []
        rng = np.random.default_rng(derive_seed(self.config.seed, round_index, "dropout"))
        k = math.floor(rate * len(sampled))
        return sorted(int(c) for c in rng.choice(list(sampled), size=k, replace=False)) if k else []

    # ------------------------------------------------------------------ main loop
    def run(self, *, global_state: AdapterDelta, resume: bool = False) -> AdapterDelta:
        """Run every round from ``global_state`` (or the latest checkpoint when ``resume``)."""
        cfg = self.config
        fed = cfg.federation
        num_clients = len(self.client_features)
        per_round = fed.sampled_per_round(num_clients)
        start = 0
        ckpt_dir = self.out_dir / "checkpoints" if self.out_dir else None
        if resume and ckpt_dir is not None:
            latest = latest_checkpoint(ckpt_dir)
            if latest is not None:
                last_round, global_state, state = load_checkpoint(latest)
                start = last_round + 1
                self.history = state.get("history", [])
                self.initial_eval = state.get("initial_eval", {})
                for d, ds in zip(self.defenses, state.get("defenses", []), strict=False):
                    d.load_state_dict(ds)
                log.info("resuming after round %d from %s", last_round, latest)
                assert self.out_dir is not None
                with open(self.out_dir / "metrics.jsonl", "w") as fh:
                    for row in self.history:
                        fh.write(json.dumps(row) + "\n")
        if start == 0 and not self.initial_eval:
            self.initial_eval = self._evaluate(global_state)
        rounds = range(start, fed.rounds)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=fed.rounds, initial=start, desc="rounds", unit="round", leave=True)
        for r in rounds:
            global_state = self._round(r, global_state, per_round=per_round, num_clients=num_clients)
            if ckpt_dir is not None and ((r + 1) % fed.checkpoint_every == 0 or r + 1 == fed.rounds):
                save_checkpoint(
                    ckpt_dir,
                    round_index=r,
                    global_state=global_state,
                    state={
                        "history": self.history,
                        "initial_eval": self.initial_eval,
                        "defenses": [d.state_dict() for d in self.defenses],
                    },
                )
            if bar is not None:
                last = self.history[-1]
                bar.set_postfix(eval_loss=f"{last.get('eval_loss', float('nan')):.4f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        set_adapter_state(self.model, global_state)
        return global_state

    def _client_phase(
        self, *, ctx: RoundContext, sent_state: AdapterDelta, dropped: Sequence[int]
    ) -> ClientPhase:
        """Run the sampled clients' step and encode their updates (an engine may do this remotely)."""
        fed = self.config.federation
        r = ctx.round
        sealed: list[Sealed] = []
        sent_meta: dict[int, ClientUpdate] = {}
        rejected: list[dict[str, Any]] = []
        client_metrics: dict[int, dict[str, float]] = {}
        bytes_up: dict[int, int] = {}
        bytes_down: dict[int, int] = {}
        norms: dict[int, float] = {}
        local_s = 0.0
        down = delta_nbytes(sent_state)
        for cid in ctx.sampled_clients:
            res = run_client(
                model=self.model,
                global_state=sent_state,
                announced_hash=ctx.global_hash,
                features=self.client_features[cid],
                num_examples=self.client_num_examples[cid],
                fed=fed,
                defenses=self.defenses,
                ctx=ctx,
                client_id=cid,
                pad_token_id=self._pad_id(),
                progress=self.progress,
            )
            local_s += res.train_seconds
            update = res.update
            if self.client_hook is not None:
                update = self.client_hook(update, ctx)
            client_metrics[cid] = dict(update.metrics)
            bytes_down[cid] = down
            if cid in dropped:
                continue
            try:
                update.validate_against(sent_state)
            except InvalidUpdateError as err:
                log.warning("round %d: rejected update: %s", r, err)
                rejected.append({"client_id": cid, "reason": err.reason})
                continue
            norms[cid] = float(
                math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.delta.values()))
            )
            s = self.transport.encode(update, ctx=ctx)
            sealed.append(s)
            sent_meta[cid] = update
            bytes_up[cid] = s.nbytes
        return ClientPhase(
            sealed=sealed,
            sent_meta=sent_meta,
            rejected=rejected,
            client_metrics=client_metrics,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            norms=norms,
            local_s=local_s,
            dropped=sorted(set(dropped)),
        )

    def _round(self, r: int, global_state: AdapterDelta, *, per_round: int, num_clients: int) -> AdapterDelta:
        cfg = self.config
        fed = cfg.federation
        t_round = time.perf_counter()
        sampled = sample_clients(num_clients=num_clients, per_round=per_round, seed=cfg.seed, round_index=r)
        sent_state = global_state
        for obs in self.observers:
            craft = getattr(obs, "craft_global", None)
            if getattr(obs, "malicious", False) and craft is not None:
                crafted = craft(global_state, r)
                if crafted is not None:
                    sent_state = crafted
        ctx = RoundContext(
            round=r,
            num_rounds=fed.rounds,
            sampled_clients=sampled,
            num_clients=num_clients,
            seed=cfg.seed,
            global_hash=adapter_hash(sent_state),
            run_id=cfg.config_hash(),
        )
        self.transport.begin_round(ctx, template=sent_state, client_ids=sampled)
        phase = self._client_phase(ctx=ctx, sent_state=sent_state, dropped=self._drop(sampled, r))
        sealed, sent_meta, rejected = phase.sealed, phase.sent_meta, phase.rejected
        client_metrics, bytes_up, bytes_down = phase.client_metrics, phase.bytes_up, phase.bytes_down
        norms, local_s, dropped = phase.norms, phase.local_s, phase.dropped
        not_sent = sorted(set(sampled) - {s.client_id for s in sealed})
        try:
            result = server_round(
                global_state=sent_state,
                ctx=ctx,
                sealed=sealed,
                dropped=not_sent,
                transport=self.transport,
                aggregator=self.aggregator,
                defenses=self.defenses,
                updates_meta=sent_meta,
            )
        except RoundAbortedError as err:
            # e.g. too few secure-aggregation shares survived: keep the global adapter, record it
            log.warning("round %d aborted: %s", r, err)
            rejected = [*rejected, {"client_id": "all", "reason": f"round aborted: {err}"}]
            result = ServerRoundResult(
                new_global={k: v.clone() for k, v in global_state.items()},
                delta={k: torch.zeros_like(v) for k, v in global_state.items()},
                aggregated_clients=(),
            )
        round_s = time.perf_counter() - t_round
        for cid, extra in getattr(self.transport, "last_round_bytes", {}).items():
            bytes_up[cid] = extra.get("up", bytes_up.get(cid, 0))
            bytes_down[cid] = bytes_down.get(cid, 0) + extra.get("down", 0)
        t_obs = time.perf_counter()
        if self.observers:
            views = self.transport.exposes
            observation = RoundObservation(
                ctx=ctx,
                views=views,
                global_before=sent_state,
                aggregate=result.delta,
                updates=result.per_client_plaintext,
                model=self.model,
                tokenizer=self.tokenizer,
                train_config=cfg,
                ground_truth={c: self.ground_truth.get(c, ()) for c in sampled},
            )
            for obs in self.observers:
                obs.observe_round(observation)
        obs_s = time.perf_counter() - t_obs
        eval_metrics: dict[str, Any] = {}
        t_eval = time.perf_counter()
        if (r + 1) % fed.eval_every == 0 or r + 1 == fed.rounds:
            eval_metrics = self._evaluate(result.new_global)
        eval_s = time.perf_counter() - t_eval
        rec = RoundRecord(
            round=r,
            sampled=list(sampled),
            aggregated=list(result.aggregated_clients),
            dropped=sorted(set(dropped)),
            rejected=rejected,
            round_s=round_s,
            local_train_s=local_s,
            eval_s=eval_s,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_metrics=client_metrics,
            eval=eval_metrics,
            privacy=result.privacy,
            server_s={**result.seconds, "observers_s": obs_s},
            update_norms=norms,
        )
        row = rec.to_dict()
        self.history.append(row)
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return result.new_global
