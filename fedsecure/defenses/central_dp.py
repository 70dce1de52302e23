"""``dp-fedavg``: user-level (client-level) DP for federated averaging.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018): every sampled client clips its model delta to L2 norm C;
the server forms the fixed-denominator estimator sum_i clip(Delta_i) / m (m = planned
clients per round) and adds N(0, (z C / m)^2) per coordinate. Accounting: the Poisson-
subsampled Gaussian with client sampling rate q = m / N over rounds (PRV or RDP), giving
client-level ε: the released models hide whether any one client took part (add/remove).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021): clients also report b_i = [||Delta_i|| <= C]; the
server estimates the unclipped fraction b~ = (sum b_i + N(0, sigma_b^2)) / m and updates
C <- C * exp(-eta_C (b~ - gamma)) (geometric update toward the gamma-quantile). Noise for
the update and for the count are split so the combined query has noise multiplier z:
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (their Thm. 1).

Modes and trust:

- ``central``: clients are trusted to clip (their clipping bounds the sensitivity); the
  server adds all the noise after aggregation. The guarantee protects against everyone who
  sees the released/global models (other clients, the public), not against the server,
  which sees the aggregate before noise (and each update with the plain transport).
- ``distributed``: each client adds its own noise share before secure aggregation, so the
  server only ever sees sum_i (clip(Delta_i) + noise_i). Needs a transport that hides
  individual updates (secagg, ckks). Adjacency is *zero-out* (a client's data replaced by
  a null contribution, the client still runs the protocol: Kairouz et al. 2021). Trust
  assumption: the shares of at least ``n_honest = min_surviving_clients - colluding_clients``
  clients stay secret (not known to the server) and were really added; each client adds
  variance (z C)^2 / n_honest, so any n_honest honest survivors reach the target. A round
  with fewer honest survivors (more dropouts than planned) is accounted with its smaller
  effective noise z * sqrt(k_honest / n_honest) -- honestly larger ε, never hidden.

Weighting: FedAvg weights by num_examples, which would make the sensitivity data-size
dependent. ``transform_update`` therefore sends num_examples = 1 (uniform weights), and
``post_aggregate`` rescales the uniform mean over the k arrived updates by k / m.

Noise source: ``secure_mode = false`` (experiments): the central noise comes from a torch
generator seeded by (run seed, round) -- reproducible, and removable by anyone who knows
the seed. Distributed shares are never seeded (a seeded share is known to the server):
they come from the OS CSPRNG. ``secure_mode = true``: exact discrete Gaussian noise
(Canonne, Kamath, Steinke 2020) on a power-of-two grid fine enough that rounding inflates
the sensitivity by at most 1% + sqrt(d) grid steps (accounted), via
:mod:`fedsecure._hazmat.noise`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch

from fedsecure.defenses.base import Defense
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
from fedsecure.registry import DEFENSES
from fedsecure.types import AdapterDelta, ClientUpdate, RoundContext, RunInfo, View, l2_norm

MODES = ("central", "distributed")
_GRID_PER_SQRT_D = 100  # grid steps per sensitivity unit, per sqrt(d): rounding adds <= 1% (+ sqrt(d) steps)


def _flatten(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in delta.values()]) if delta else torch.zeros(0)


def _unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> AdapterDelta:
    out: AdapterDelta = {}
    offset = 0
    for k, t in like.items():
        n = t.numel()
        out[k] = vec[offset : offset + n].reshape(t.shape).to(dtype=torch.float32, device=t.device)
        offset += n
    return out


def _pow2_at_most(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


@dataclasses.dataclass(frozen=True)
class Grid:
    """A power-of-two quantisation grid for exact discrete-Gaussian noise.

    ``step`` is the grid spacing; ``sensitivity`` the L2 sensitivity in grid units after
    rounding (true sensitivity / step + the rounding term); ``variance`` the integer noise
    variance in grid units so that sqrt(variance) >= noise_multiplier * sensitivity.
    """

    step: float
    sensitivity: float
    variance: int


def make_grid(*, sensitivity: float, dim: int, noise_multiplier: float, rounding: float, shares: int = 1) -> Grid:
    """Grid for a value of L2 sensitivity ``sensitivity`` (float units) in ``dim`` coordinates.

    ``rounding`` is the per-coordinate rounding term in the sensitivity bound (1 when the
    rounded value is a sum, 1/2 when one vector is rounded); ``shares`` splits the variance.
    """
    g = _GRID_PER_SQRT_D * math.sqrt(max(dim, 1))
    step = _pow2_at_most(sensitivity / g)
    sens_grid = sensitivity / step + rounding * math.sqrt(dim)
    var = math.ceil((noise_multiplier * sens_grid) ** 2 / shares)
    return Grid(step=step, sensitivity=sens_grid, variance=max(1, var))


@DEFENSES.register("dp-fedavg", help="Client-level DP-FedAvg (McMahan 2018): clip updates, Gaussian noise, client ε")
class DPFedAvgDefense(Defense):
    """Client-level DP-FedAvg, central or distributed noise, fixed or adaptive clipping.

    Parameters
    ----------
    target_epsilon:
        Client-level ε after all rounds (``inf``: clipping only). Or give ``noise_multiplier``.
    noise_multiplier:
        z, the noise std in units of the sensitivity C / m (alternative to ``target_epsilon``).
    target_delta:
        δ; default min(1e-5, 1/num_clients^1.1); must be < 1/num_clients.
    clip_norm:
        C, the L2 bound on each client's delta (the initial one with adaptive clipping).
    adaptive_clipping:
        Track the ``target_quantile`` of update norms (Andrew et al. 2021); central mode only.
    target_quantile, clip_learning_rate, clipped_count_stddev:
        gamma, eta_C and sigma_b of adaptive clipping (sigma_b default: m / 20).
    mode:
        ``"central"`` (server adds noise) or ``"distributed"`` (clients add shares; needs secagg/ckks).
    accountant:
        ``"prv"`` or ``"rdp"``.
    secure_mode:
        Exact discrete Gaussian noise from the OS CSPRNG (not reproducible).
    colluding_clients:
        Distributed mode: sampled clients whose shares may be known to the server.
    min_surviving_clients:
        Distributed mode: survivors the shares are calibrated for; default
        m - ceil(dropout_rate * m).
    """

    name = "dp-fedavg"
    requires_views: ClassVar[frozenset[View]] = frozenset()
    """Clipping is done by the (trusted) clients, noise after aggregation: no per-client view needed."""
    transform_priority: ClassVar[int] = 90
    """Clip and add the noise share last, after any other update transform, right before encoding."""

    def __init__(
        self,
        *,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        target_delta: float | None = None,
        clip_norm: float = 1.0,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        mode: str = "central",
        accountant: str = "prv",
        secure_mode: bool = False,
        colluding_clients: int = 0,
        min_surviving_clients: int | None = None,
    ) -> None:
        self.target_epsilon = check_epsilon(target_epsilon)
        self.fixed_noise_multiplier = check_noise_multiplier(noise_multiplier)
        if (self.target_epsilon is None) == (self.fixed_noise_multiplier is None):
            raise DPConfigError("dp-fedavg: set exactly one of target_epsilon or noise_multiplier")
        if target_delta is not None:
            check_delta(target_delta, num_units=0)
        self.target_delta = target_delta
        self.clip_norm = check_positive("clip_norm", clip_norm)
        if not isinstance(adaptive_clipping, bool):
            raise DPConfigError(f"adaptive_clipping must be true or false, got {adaptive_clipping!r}")
        self.adaptive_clipping = adaptive_clipping
        if not 0.0 < float(target_quantile) < 1.0:
            raise DPConfigError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = check_positive("clip_learning_rate", clip_learning_rate)
        self.clipped_count_stddev = (
            None if clipped_count_stddev is None else check_positive("clipped_count_stddev", clipped_count_stddev)
        )
        if mode not in MODES:
            raise DPConfigError(f"dp-fedavg mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        if adaptive_clipping and mode == "distributed":
            raise DPConfigError(
                "dp-fedavg: adaptive_clipping needs each client's clipped/unclipped bit summed under the same "
                "secure aggregation as the update; fedsecure sends it only in the central mode. Use mode = "
                "'central' with adaptive clipping, or a fixed clip_norm with mode = 'distributed'"
            )
        self.accountant = check_accountant(accountant)
        if not isinstance(secure_mode, bool):
            raise DPConfigError(f"secure_mode must be true or false, got {secure_mode!r}")
        self.secure_mode = secure_mode
        if not isinstance(colluding_clients, int) or colluding_clients < 0:
            raise DPConfigError(f"colluding_clients must be an integer >= 0, got {colluding_clients!r}")
        self.colluding_clients = colluding_clients
        if min_surviving_clients is not None and (
            not isinstance(min_surviving_clients, int) or min_surviving_clients < 1
        ):
            raise DPConfigError(f"min_surviving_clients must be a positive integer, got {min_surviving_clients!r}")
        self.min_surviving_clients = min_surviving_clients
        # set in setup()
        self.run: RunInfo | None = None
        self.delta = 0.0
        self.sampling_rate = 0.0
        self.noise_multiplier = 0.0  # z of the combined query
        self.update_noise_multiplier = 0.0  # z_Delta
        self.count_stddev = 0.0  # sigma_b
        self.honest_shares = 0
        self.current_clip = self.clip_norm
        self.clip_history: list[float] = [self.clip_norm]
        self.history: list[list[float]] = []
        self.round_noise: list[dict[str, float]] = []
        self._bits: dict[int, list[int]] = {}
        self._secure_rng: Any = None

    # ---- validation ----------------------------------------------------------------
    def conflicts(self, *, transport: Any, aggregator: Any, config: Any) -> list[str]:
        out = super().conflicts(transport=transport, aggregator=aggregator, config=config)
        agg_name = str(getattr(aggregator, "name", "") or type(aggregator).__name__)
        if aggregator is not None and "fedavg" not in agg_name.lower().replace("_", "").replace("-", ""):
            out.append(
                f"dp-fedavg bounds each client's influence on the mean of uniformly weighted, clipped updates; "
                f"aggregator {agg_name!r} changes that sensitivity: set [aggregator] name = 'fedavg'"
            )
        if self.mode == "distributed" and View.SERVER_PER_CLIENT in getattr(transport, "exposes", frozenset()):
            out.append(
                f"dp-fedavg mode = 'distributed' adds the noise on the clients, so each update carries only a "
                f"small share of it: transport {getattr(transport, 'name', transport)!r} shows every update to "
                "the server. Fix: [transport] name = 'secagg' (or 'ckks'), or mode = 'central'"
            )
        return out

    # ---- calibration ---------------------------------------------------------------
    def setup(self, run: RunInfo) -> None:
        self.run = run
        n, m, rounds = run.num_clients, run.clients_per_round, run.num_rounds
        if not 1 <= m <= n:
            raise DPConfigError(f"dp-fedavg needs 1 <= clients_per_round <= num_clients, got {m} of {n}")
        self.sampling_rate = m / n
        delta = self.target_delta if self.target_delta is not None else default_delta(n)
        self.delta = check_delta(delta, num_units=n, unit="clients", owner="dp-fedavg (client-level)")
        if self.fixed_noise_multiplier is not None:
            z = self.fixed_noise_multiplier
        else:
            assert self.target_epsilon is not None
            z = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sampling_rate,
                steps=rounds,
                accountant=self.accountant,
            )
        self.noise_multiplier = z
        self.update_noise_multiplier = z
        if self.adaptive_clipping:
            self.count_stddev = self.clipped_count_stddev if self.clipped_count_stddev is not None else m / 20.0
            if z > 0:
                if 2.0 * self.count_stddev <= z:
                    raise DPConfigError(
                        f"dp-fedavg: clipped_count_stddev = {self.count_stddev:.3g} is too small for the noise "
                        f"multiplier {z:.3g} (need 2 * sigma_b > z): raise clipped_count_stddev above {z / 2:.3g}"
                    )
                self.update_noise_multiplier = (z**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5
        if self.mode == "distributed":
            survivors = (
                self.min_surviving_clients
                if self.min_surviving_clients is not None
                else m - math.ceil(run.dropout_rate * m)
            )
            if survivors > m:
                raise DPConfigError(f"min_surviving_clients = {survivors} exceeds clients_per_round = {m}")
            self.honest_shares = survivors - self.colluding_clients
            if self.honest_shares < 1:
                raise DPConfigError(
                    f"dp-fedavg distributed: {survivors} planned survivors minus {self.colluding_clients} colluding "
                    "clients leaves no honest noise share; lower colluding_clients or sample more clients"
                )
        if self.secure_mode:
            from fedsecure._hazmat.noise import SecureRandom

            self._secure_rng = SecureRandom()

    def _require_setup(self) -> RunInfo:
        if self.run is None:
            raise DPConfigError("dp-fedavg: setup(run) must be called before training")
        return self.run

    # ---- client side ---------------------------------------------------------------
    def transform_update(self, update: ClientUpdate, *, ctx: RoundContext) -> ClientUpdate:
        self._require_setup()
        clip = self.current_clip
        norm = l2_norm(update.delta)
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        vec = _flatten(update.delta) * factor
        if self.adaptive_clipping:
            # the bit a client reports (Andrew et al.); summed with noise by the server
            self._bits.setdefault(ctx.round, []).append(int(norm <= clip))
        if self.mode == "distributed" and self.update_noise_multiplier > 0:
            vec = self._add_share(vec, clip)
        return dataclasses.replace(update, delta=_unflatten(vec, update.delta), num_examples=1)

    def _add_share(self, vec: torch.Tensor, clip: float) -> torch.Tensor:
        z = self.update_noise_multiplier
        d = vec.numel()
        if self.secure_mode:
            from fedsecure._hazmat.noise import discrete_gaussian, distributed_discrete_gaussian_tau

            grid = make_grid(sensitivity=clip, dim=d, noise_multiplier=z, rounding=0.5, shares=self.honest_shares)
            tau = distributed_discrete_gaussian_tau(grid.variance, self.honest_shares)
            if tau > 1e-9:
                raise DPConfigError(f"discrete Gaussian share variance {grid.variance} too small (tau = {tau:.2e})")
            ints = torch.round(vec / grid.step).to(torch.int64)
            noise = torch.from_numpy(discrete_gaussian(grid.variance, d, rng=self._secure_rng))
            return (ints + noise).double() * grid.step
        from fedsecure._hazmat.noise import secure_gaussian

        std = z * clip / math.sqrt(self.honest_shares)
        return vec + torch.from_numpy(secure_gaussian(d, std=std))

    # ---- server side ---------------------------------------------------------------
    def post_aggregate(self, delta: AdapterDelta, *, ctx: RoundContext, num_updates: int) -> AdapterDelta:
        run = self._require_setup()
        m = run.clients_per_round
        if num_updates < 1:
            raise DPConfigError("dp-fedavg.post_aggregate: no update arrived (num_updates = 0)")
        clip = self.current_clip
        total = _flatten(delta) * (num_updates / m)  # sum_i clip(Delta_i) / m from the uniform mean
        z = self.update_noise_multiplier
        effective_z = z
        if self.mode == "central" and z > 0:
            total = self._central_noise(total, clip=clip, m=m, ctx=ctx)
        elif self.mode == "distributed":
            honest = num_updates - self.colluding_clients
            effective_z = z * math.sqrt(max(0, min(honest, self.honest_shares)) / self.honest_shares)
        if self.adaptive_clipping:
            effective = self._update_clip(ctx=ctx, m=m)
        else:
            effective = effective_z
        self.history.append([effective, self.sampling_rate, 1])
        self.round_noise.append(
            {"round": ctx.round, "noise_multiplier": effective, "clip_norm": clip, "num_updates": num_updates}
        )
        return _unflatten(total, delta)

    def _central_noise(self, total: torch.Tensor, *, clip: float, m: int, ctx: RoundContext) -> torch.Tensor:
        z = self.update_noise_multiplier
        d = total.numel()
        if self.secure_mode:
            from fedsecure._hazmat.noise import discrete_gaussian

            grid = make_grid(sensitivity=clip / m, dim=d, noise_multiplier=z, rounding=1.0)
            ints = torch.round(total / grid.step).to(torch.int64)
            noise = torch.from_numpy(discrete_gaussian(grid.variance, d, rng=self._secure_rng))
            return (ints + noise).double() * grid.step
        gen = torch.Generator().manual_seed(_round_seed(ctx.seed, ctx.round))
        return total + torch.normal(0.0, z * clip / m, size=(d,), generator=gen, dtype=torch.float64)

    def _update_clip(self, *, ctx: RoundContext, m: int) -> float:
        bits = self._bits.pop(ctx.round, None)
        if bits is None:
            raise DPConfigError(
                "dp-fedavg adaptive clipping: no clipped/unclipped bits reached the server this round (the clients' "
                "transform_update ran in another process); use a fixed clip_norm in that deployment"
            )
        if self.secure_mode:
            from fedsecure._hazmat.noise import discrete_gaussian

            var = Fraction(self.count_stddev**2)  # exact value of the float
            noisy = sum(bits) + int(discrete_gaussian(var, 1, rng=self._secure_rng)[0])
        else:
            gen = torch.Generator().manual_seed(_round_seed(ctx.seed, ctx.round) ^ 0x5F5F)
            noisy = sum(bits) + float(torch.normal(0.0, self.count_stddev, size=(1,), generator=gen))
        frac = noisy / m
        self.current_clip = self.current_clip * math.exp(-self.clip_learning_rate * (frac - self.target_quantile))
        self.clip_history.append(self.current_clip)
        return self.noise_multiplier

    # ---- accounting ----------------------------------------------------------------
    def epsilon(self) -> float:
        return epsilon_of(self.history, delta=self.delta, accountant=self.accountant)

    def account(self, *, ctx: RoundContext) -> Mapping[str, float]:
        self._require_setup()
        return {"epsilon_client_level": self.epsilon()}

    def report(self) -> dict[str, Any]:
        run = self._require_setup()
        return {
            "epsilon_client_level": self.epsilon(),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            "clipped_count_stddev": self.count_stddev if self.adaptive_clipping else None,
            "clip_norm_history": list(self.clip_history),
            "client_sampling_rate": self.sampling_rate,
            "rounds_accounted": len(self.history),
            "planned_rounds": run.num_rounds,
            "per_round": list(self.round_noise),
            "mode": self.mode,
            "adjacency": "zero-out" if self.mode == "distributed" else "add/remove",
            "honest_shares": self.honest_shares if self.mode == "distributed" else None,
            "accountant": self.accountant,
            "secure_mode": self.secure_mode,
            "sampling_assumption": "Poisson client sampling at rate clients_per_round / num_clients",
        }

    # ---- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": history_to_json(self.history),
            "current_clip": self.current_clip,
            "clip_history": list(self.clip_history),
            "round_noise": [dict(r) for r in self.round_noise],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.history = history_to_json(state["history"])
            self.current_clip = float(state["current_clip"])
            self.clip_history = [float(c) for c in state["clip_history"]]
            self.round_noise = [dict(r) for r in state.get("round_noise", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise DPConfigError(f"dp-fedavg: invalid checkpoint state ({err})") from err


def _round_seed(seed: int, rnd: int) -> int:
    digest = hashlib.sha256(f"fedsecure/dp-fedavg/{seed}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


__all__ = ["DPFedAvgDefense", "Grid", "make_grid"]
