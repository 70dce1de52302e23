"""``dp-sgd``: sample-level DP-SGD on every client, with a per-client ε ledger.

Each client trains its local steps with DP-SGD (Abadi et al. 2016) through
:func:`fedsecure.defenses.dp.engine.private_training`: Poisson sampling at q = B / N_i,
per-sequence clipping to C, Gaussian noise σ_i·C per logical step. Each client has its own
accountant that persists across rounds: its ε grows only in rounds where it trains
(composition over all of its steps; the global models it receives are post-processing of
other clients' data and of its own earlier DP outputs, so adaptive composition holds).

Calibration (``setup``): σ_i is the smallest noise with which client i meets
``target_epsilon`` at δ_i after its *planned* number of rounds times ``local_steps``:

- ``participation = "worst-case"`` (default, honest): every round (``num_rounds``);
- ``participation = "expected"``: ceil(num_rounds * clients_per_round / num_clients); a
  client sampled more often than that ends above the target, and the ledger says so.

Threat model: example-level DP for each client's records against anyone who sees that
client's updates (the server, with any transport) or any later model. It says nothing
about *which* client took part (that is ``dp-fedavg``, client-level DP).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from fedsecure.defenses.base import Defense, TrainingSetup
from fedsecure.defenses.dp.accounting import (
    DPConfigError,
    calibrate_noise_multiplier,
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive,
    default_delta,
    epsilon_of,
    history_to_json,
)
from fedsecure.defenses.dp.engine import GRAD_SAMPLE_MODES, PrivateTraining, private_training
from fedsecure.registry import DEFENSES
from fedsecure.types import RoundContext, RunInfo

PARTICIPATION = ("worst-case", "expected")


class RowDataset(torch.utils.data.Dataset):
    """Rows of already-collated batches (for a client loader that is not a DataLoader)."""

    def __init__(self, batches: Any) -> None:
        self.rows: list[dict[str, torch.Tensor]] = []
        for batch in batches:
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise DPConfigError("dp-sgd needs batches that are dicts with input_ids/attention_mask/labels")
            n = int(batch["input_ids"].shape[0])
            for i in range(n):
                self.rows.append({k: v[i] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


_PAD = {"labels": -100, "attention_mask": 0}


def pad_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad 1-D row tensors (labels with -100, attention_mask and input_ids with 0)."""
    out: dict[str, torch.Tensor] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if vals[0].dim() == 0:
            out[k] = torch.stack(vals)
            continue
        width = max(v.shape[0] for v in vals)
        t = torch.full((len(vals), width, *vals[0].shape[1:]), _PAD.get(k, 0), dtype=vals[0].dtype)
        for i, v in enumerate(vals):
            t[i, : v.shape[0]] = v
        out[k] = t
    return out


def _dataset_of(loader: Any) -> tuple[Any, Callable[[list[Any]], Any] | None]:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return dataset, getattr(loader, "collate_fn", None)
    rows = RowDataset(loader)
    return rows, pad_collate


def _client_seed(seed: int, client_id: int, rnd: int) -> int:
    digest = hashlib.sha256(f"fedsecure/dp-sgd/{seed}/{client_id}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@DEFENSES.register("dp-sgd", help="Sample-level DP-SGD on each client (Poisson, per-sequence clipping), per-client ε")
class DPSGDDefense(Defense):
    """Sample-level DP-SGD in every client's local training (see the module docstring).

    Parameters
    ----------
    target_epsilon:
        ε each client must meet after its planned participation (``inf``: clipping only).
    noise_multiplier:
        Alternative to ``target_epsilon``: a fixed σ for every client.
    target_delta:
        δ per client; default min(1e-5, 1/N_i^1.1); must be < 1/N_i for every client.
    max_grad_norm:
        C, the per-example clipping bound.
    accountant:
        ``"prv"`` or ``"rdp"``.
    participation:
        ``"worst-case"`` (every round) or ``"expected"`` planned rounds per client.
    secure_mode:
        Noise and Poisson masks from the OS CSPRNG (not reproducible).
    grad_sample_mode:
        ``"auto"`` (verified fastest) or a fixed mode.
    max_physical_batch_size:
        Micro-batch rows (memory); default: the run's ``micro_batch_size`` or the whole batch.
    """

    name = "dp-sgd"
    requires_views: ClassVar[frozenset] = frozenset()

    def __init__(
        self,
        *,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        target_delta: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: str = "prv",
        participation: str = "worst-case",
        secure_mode: bool = False,
        grad_sample_mode: str = "auto",
        max_physical_batch_size: int | None = None,
    ) -> None:
        self.target_epsilon = check_epsilon(target_epsilon)
        self.fixed_noise_multiplier = check_noise_multiplier(noise_multiplier)
        if (self.target_epsilon is None) == (self.fixed_noise_multiplier is None):
            raise DPConfigError("dp-sgd: set exactly one of target_epsilon or noise_multiplier")
        if target_delta is not None:
            check_delta(target_delta, num_units=0)
        self.target_delta = target_delta
        self.max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        self.accountant = check_accountant(accountant)
        if participation not in PARTICIPATION:
            raise DPConfigError(
                f"dp-sgd participation must be one of {', '.join(PARTICIPATION)}, got {participation!r}"
            )
        self.participation = participation
        if not isinstance(secure_mode, bool):
            raise DPConfigError(f"secure_mode must be true or false, got {secure_mode!r}")
        self.secure_mode = secure_mode
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise DPConfigError(
                f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}"
            )
        self.grad_sample_mode = grad_sample_mode
        if max_physical_batch_size is not None and (
            not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1
        ):
            raise DPConfigError(f"max_physical_batch_size must be a positive integer, got {max_physical_batch_size!r}")
        self.max_physical_batch_size = max_physical_batch_size
        self.run: RunInfo | None = None
        self.noise_multipliers: dict[int, float] = {}
        self.deltas: dict[int, float] = {}
        self.sample_rates: dict[int, float] = {}
        self.histories: dict[int, list[list[float]]] = {}
        self.rounds_trained: dict[int, int] = {}
        self.planned_rounds = 0
        self._verified_mode: str | None = None
        self.last_private: PrivateTraining | None = None

    # ---- calibration ---------------------------------------------------------------
    def setup(self, run: RunInfo) -> None:
        self.run = run
        if run.local_steps < 1 or run.num_rounds < 1 or run.batch_size < 1:
            raise DPConfigError("dp-sgd needs local_steps >= 1, rounds >= 1 and batch_size >= 1")
        if self.participation == "worst-case":
            self.planned_rounds = run.num_rounds
        else:
            self.planned_rounds = max(1, math.ceil(run.num_rounds * run.clients_per_round / run.num_clients))
        steps = self.planned_rounds * run.local_steps
        for cid in range(run.num_clients):
            n = run.client_num_examples.get(cid)
            if n is None or n < 1:
                raise DPConfigError(f"dp-sgd: client {cid} has no examples (client_num_examples[{cid}] = {n})")
            if run.batch_size > n:
                raise DPConfigError(
                    f"dp-sgd: client {cid} has {n} examples, fewer than batch_size = {run.batch_size}; lower "
                    "[federation] batch_size or give every client more data"
                )
            delta = self.target_delta if self.target_delta is not None else default_delta(n)
            self.deltas[cid] = check_delta(delta, num_units=n, owner=f"client {cid}")
            self.sample_rates[cid] = run.batch_size / n
            if self.fixed_noise_multiplier is not None:
                self.noise_multipliers[cid] = self.fixed_noise_multiplier
            else:
                assert self.target_epsilon is not None
                self.noise_multipliers[cid] = calibrate_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.deltas[cid],
                    sample_rate=self.sample_rates[cid],
                    steps=steps,
                    accountant=self.accountant,
                )
            self.histories.setdefault(cid, [])
            self.rounds_trained.setdefault(cid, 0)

    # ---- client side ---------------------------------------------------------------
    def wrap_training(self, setup: TrainingSetup, *, client_id: int, ctx: RoundContext) -> TrainingSetup:
        run = self._require_setup()
        if client_id not in self.noise_multipliers:
            raise DPConfigError(f"dp-sgd: client {client_id} is not among the {run.num_clients} clients of setup()")
        dataset, collate_fn = _dataset_of(setup.data_loader)
        expected = run.client_num_examples[client_id]
        if len(dataset) != expected:
            raise DPConfigError(
                f"dp-sgd: client {client_id} trains on {len(dataset)} examples but the noise was calibrated for "
                f"{expected} (RunInfo.client_num_examples); they must agree"
            )
        mode = self._verified_mode or self.grad_sample_mode
        priv = private_training(
            model=setup.model,
            optimizer=setup.optimizer,
            dataset=dataset,
            collate_fn=collate_fn,
            batch_size=run.batch_size,
            noise_multiplier=self.noise_multipliers[client_id],
            target_delta=self.deltas[client_id],
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            secure_mode=self.secure_mode,
            grad_sample_mode=mode,
            max_physical_batch_size=self.max_physical_batch_size or setup.micro_batch_size,
            loss_fn=setup.loss_fn,
            seed=None if self.secure_mode else _client_seed(ctx.seed, client_id, ctx.round),
            enforce_budget=False,
            accountant_history=self.histories[client_id],
            loader_steps=run.local_steps,
            verify_mode=self._verified_mode is None,
        )
        self._verified_mode = priv.mode
        steps_before = priv.steps_taken

        def step_fn(batch: dict[str, torch.Tensor]) -> float:
            loss = priv.step(batch)
            self.histories[client_id] = history_to_json(priv.accountant_state.history)
            return loss

        def close() -> None:
            self.histories[client_id] = history_to_json(priv.accountant_state.history)
            if priv.steps_taken > steps_before:
                self.rounds_trained[client_id] += 1
            priv.close()

        setup.data_loader = priv.data_loader
        setup.step_fn = step_fn
        setup.close.append(close)
        setup.metrics.update(
            {
                "dp_noise_multiplier": priv.noise_multiplier,
                "dp_sample_rate": priv.sample_rate,
                "dp_max_grad_norm": priv.max_grad_norm,
            }
        )
        self.last_private = priv
        return setup

    # ---- accounting ----------------------------------------------------------------
    def epsilon_of_client(self, client_id: int) -> float:
        return epsilon_of(self.histories.get(client_id, []), delta=self.deltas[client_id], accountant=self.accountant)

    def account(self, *, ctx: RoundContext) -> Mapping[str, float]:
        self._require_setup()
        eps = [self.epsilon_of_client(c) for c, h in self.histories.items() if h]
        return {"epsilon_sample_level_max": max(eps) if eps else 0.0}

    def report(self) -> dict[str, Any]:
        self._require_setup()
        per_client = {c: self.epsilon_of_client(c) for c in sorted(self.histories)}
        over = sorted(
            c for c, e in per_client.items() if self.target_epsilon is not None and e > self.target_epsilon + 1e-9
        )
        return {
            "per_client_epsilon": per_client,
            "epsilon_sample_level_max": max(per_client.values()) if per_client else 0.0,
            "noise_multiplier": dict(sorted(self.noise_multipliers.items())),
            "delta": dict(sorted(self.deltas.items())),
            "sample_rate": dict(sorted(self.sample_rates.items())),
            "rounds_trained": dict(sorted(self.rounds_trained.items())),
            "target_epsilon": self.target_epsilon,
            "planned_rounds": self.planned_rounds,
            "participation": self.participation,
            "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm,
            "secure_mode": self.secure_mode,
            "grad_sample_mode": self._verified_mode or self.grad_sample_mode,
            "clients_over_target": over,
        }

    # ---- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": {str(c): h for c, h in self.histories.items()},
            "rounds_trained": {str(c): n for c, n in self.rounds_trained.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.histories = {int(c): history_to_json(h) for c, h in state["histories"].items()}
            self.rounds_trained = {int(c): int(n) for c, n in state["rounds_trained"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise DPConfigError(f"dp-sgd: invalid checkpoint state ({err})") from err

    def _require_setup(self) -> RunInfo:
        if self.run is None:
            raise DPConfigError("dp-sgd: setup(run) must be called before training")
        return self.run
