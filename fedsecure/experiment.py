"""Experiments: ``Experiment(config).run() -> Results``, and grids of them.

A run validates the whole combination first (every conflict in one error), then loads
the model and data, runs the federation on the embedded engine, runs the released-model
attacks, and writes a results directory:

- ``config.toml`` (resolved scenario), ``metrics.jsonl`` (one line per round),
- ``results.json`` (utility, privacy, attacks, cost, versions, config hash),
- ``summary.md``, ``adapter/`` (final adapter in PEFT format), ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedsecure.attacks.base import Attack, AttackResult, AttackTarget
from fedsecure.config import ConfigError, ExperimentConfig, expand_grid
from fedsecure.defenses.base import Defense
from fedsecure.federation.aggregation import Aggregator
from fedsecure.federation.transport import Transport
from fedsecure.registry import AGGREGATORS, ATTACKS, DATASETS, DEFENSES, TRANSPORTS
from fedsecure.types import RunInfo, View, num_parameters

log = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1
_VERSIONED = ("fedsecure", "torch", "transformers", "peft", "opacus", "tenseal", "flwr", "datasets", "cryptography")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class CompatibilityError(ConfigError):
    """The scenario's parts cannot run together; the message lists every conflict and its fix."""


@dataclass
class Results:
    """Everything a run measured; ``to_dict``/``from_dict`` round-trip through JSON."""

    name: str
    config_hash: str
    config: dict[str, Any]
    utility: dict[str, Any]
    privacy: dict[str, Any]
    attacks: list[dict[str, Any]]
    cost: dict[str, Any]
    federation: dict[str, Any]
    versions: dict[str, str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = RESULTS_SCHEMA_VERSION
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "config_hash": self.config_hash,
            "config": self.config,
            "utility": self.utility,
            "privacy": self.privacy,
            "attacks": self.attacks,
            "cost": self.cost,
            "federation": self.federation,
            "versions": self.versions,
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Results:
        keys = ("name", "config_hash", "config", "utility", "privacy", "attacks", "cost", "federation", "versions")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"not a fedsecure results object: missing {missing}")
        return cls(
            **{k: data[k] for k in keys},
            rounds=list(data.get("rounds", [])),
            schema_version=int(data.get("schema_version", RESULTS_SCHEMA_VERSION)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default, allow_nan=True)

    @classmethod
    def load(cls, path: str | Path) -> Results:
        p = Path(path)
        if p.is_dir():
            p = p / "results.json"
        return cls.from_dict(json.loads(p.read_text()))

    def attack(self, name: str) -> dict[str, Any]:
        for a in self.attacks:
            if a["name"] == name:
                return a
        raise KeyError(f"no attack {name!r} in results; have {[a['name'] for a in self.attacks]}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def build_plugins(config: ExperimentConfig) -> tuple[Transport, Aggregator, list[Defense], list[Attack]]:
    """Construct transport, aggregator, defenses and attacks; constructor errors are collected."""
    errs: list[str] = []

    def make(registry: Any, plugin: Any, where: str) -> Any:
        try:
            return registry.get(plugin.name)(**dict(plugin.params))
        except (ValueError, TypeError) as err:
            errs.append(f"{where} ({plugin.name}): {err}")
            return None

    transport = make(TRANSPORTS, config.transport, "transport")
    aggregator = make(AGGREGATORS, config.aggregator, "aggregator")
    defenses = [make(DEFENSES, d, f"defenses.{i}") for i, d in enumerate(config.defenses)]
    attacks = [make(ATTACKS, a, f"attacks.{i}") for i, a in enumerate(config.attacks)]
    if errs:
        raise CompatibilityError("invalid scenario:\n  - " + "\n  - ".join(errs))
    return transport, aggregator, [d for d in defenses if d], [a for a in attacks if a]


def validate_combination(
    config: ExperimentConfig, transport: Transport, aggregator: Aggregator, defenses: Sequence[Defense]
) -> list[str]:
    """Every conflict between the scenario's parts, each with its fix."""
    conflicts: list[str] = []
    if aggregator.needs_per_client and View.SERVER_PER_CLIENT not in transport.exposes:
        conflicts.append(
            f"aggregator {aggregator.name!r} needs per-client updates but transport {transport.name!r} exposes "
            f"only {', '.join(sorted(v.value for v in transport.exposes))}: use aggregator 'fedavg' with "
            f"{transport.name!r}, or transport 'plain' with {aggregator.name!r}"
        )
    names = [d.name for d in defenses]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        conflicts.append(f"defenses {dup} are listed more than once: keep one of each")
    for d in defenses:
        conflicts.extend(d.conflicts(transport=transport, aggregator=aggregator, config=config))
    fed = config.federation
    if fed.dropout_rate > 0 and transport.name == "plain" and fed.sampled_per_round(2) < 1:
        conflicts.append("dropout_rate > 0 needs at least 2 clients per round")
    return conflicts


class Experiment:
    """One scenario run.

    Parameters
    ----------
    config:
        A validated :class:`~fedsecure.config.ExperimentConfig`.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.transport, self.aggregator, self.defenses, self.attacks = build_plugins(config)
        conflicts = validate_combination(config, self.transport, self.aggregator, self.defenses)
        if conflicts:
            raise CompatibilityError(
                "these parts cannot run together:\n  - " + "\n  - ".join(conflicts)
            )
        self.client_hook: Callable[..., Any] | None = None
        self.engine_factory: Callable[..., Any] | None = None
        """Builds the round engine from SimulationEngine's keyword arguments (None: the embedded engine)."""
        self.model: Any = None
        self.tokenizer: Any = None
        self.dataset: Any = None

    def run(self, *, out_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> Results:
        """Run the federation, then the released-model attacks; write ``out_dir`` if given."""
        from fedsecure.data.tokenize import encode_dataset
        from fedsecure.federation.client import derive_seed
        from fedsecure.federation.simulation import SimulationEngine, peak_rss_mb
        from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, save_adapter

        cfg = self.config
        t_start = time.perf_counter()
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if not resume and (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
            _write_config(out / "config.toml", cfg.to_dict())
        base, tok = load_model(cfg.model.name, seed=0)
        torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
        lora: LoraSettings = cfg.lora
        model = attach_lora(base, lora)
        self.model, self.tokenizer = model, tok
        ds = DATASETS.get(cfg.data.dataset)(**{"seed": cfg.seed, **dict(cfg.data.params)})
        self.dataset = ds
        max_len = cfg.data.max_length
        client_feats = [encode_dataset(tok, list(c), max_length=max_len) for c in ds.clients]
        eval_feats = encode_dataset(tok, list(ds.eval), max_length=max_len)
        eval_groups = [ex.get("locale", ex.get("source")) for ex in ds.eval]
        if all(g is None for g in eval_groups):
            eval_groups = None
        client_groups: dict[int, Any] = {}
        for i, c in enumerate(ds.clients):
            labels = [ex.get("locale", ex.get("source")) for ex in c if "canary_id" not in ex]
            labels = [x for x in labels if x is not None]
            if labels:
                client_groups[i] = max(set(labels), key=labels.count)
        global_state = get_adapter_state(model)
        fed = cfg.federation
        sizes = {i: len(c) for i, c in enumerate(ds.clients)}
        empty = [i for i, n in sizes.items() if n == 0]
        if empty:
            raise ConfigError(f"clients {empty} have no training examples: lower data.num_clients or add data")
        steps = fed.local_steps
        if steps is None:
            assert fed.local_epochs is not None
            steps = fed.local_epochs * max(1, math.ceil(max(sizes.values()) / fed.batch_size))
        run_info = RunInfo(
            num_clients=len(ds.clients),
            num_rounds=fed.rounds,
            clients_per_round=fed.sampled_per_round(len(ds.clients)),
            client_num_examples=sizes,
            batch_size=fed.batch_size,
            local_steps=steps,
            seed=cfg.seed,
            num_parameters=num_parameters(global_state),
            dropout_rate=fed.dropout_rate,
        )
        self.transport.setup(run_info)
        for d in self.defenses:
            d.setup(run_info)
        observers = [a for a in self.attacks if a.when == "round"]
        finals = [a for a in self.attacks if a.when == "final"]
        views = frozenset(self.transport.exposes) | {View.RELEASED_MODEL}
        for a in self.attacks:
            setup = getattr(a, "setup", None)
            if callable(setup):
                setup(run_info=run_info, dataset=ds)
        engine = (self.engine_factory or SimulationEngine)(
            config=cfg,
            model=model,
            tokenizer=tok,
            client_features=client_feats,
            client_num_examples=sizes,
            eval_features=eval_feats,
            eval_groups=eval_groups,
            client_groups=client_groups,
            transport=self.transport,
            aggregator=self.aggregator,
            defenses=self.defenses,
            observers=[a for a in observers if not a.applicability(views, transport_name=self.transport.name)
                       or _runs_on_aggregate(a)],
            ground_truth={i: list(c) for i, c in enumerate(ds.clients)},
            out_dir=out,
            progress=progress,
            client_hook=self.client_hook,
        )
        engine.run_info = run_info
        t_fed = time.perf_counter()
        final_state = engine.run(global_state=global_state, resume=resume)
        fed_s = time.perf_counter() - t_fed
        if out is not None:
            save_adapter(model, out / "adapter")
        privacy = self._privacy(engine.history)
        t_att = time.perf_counter()
        attack_results = self._run_attacks(observers, finals, views, model, tok, ds, privacy)
        attacks_s = time.perf_counter() - t_att
        results = self._results(engine, final_state, privacy, attack_results, fed_s, attacks_s, t_start, peak_rss_mb())
        if out is not None:
            results.out_dir = str(out)
            (out / "results.json").write_text(results.to_json())
            from fedsecure.report.summary import write_summary

            write_summary(results, out / "summary.md")
        return results

    # ---------------------------------------------------------------- pieces
    def _privacy(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        privacy: dict[str, Any] = {"defenses": {}}
        last: dict[str, float] = dict(history[-1]["privacy"]) if history else {}
        privacy["epsilon"] = last
        for d in self.defenses:
            privacy["defenses"][d.name] = d.report()
        sample = [v for k, v in last.items() if "sample" in k]
        client = [v for k, v in last.items() if "client" in k]
        privacy["epsilon_sample_level"] = max(sample) if sample else None
        privacy["epsilon_client_level"] = max(client) if client else None
        deltas = [r.get("delta") for r in privacy["defenses"].values() if isinstance(r, Mapping) and r.get("delta")]
        privacy["delta"] = deltas[0] if deltas else None
        return privacy

    def _run_attacks(
        self,
        observers: Sequence[Attack],
        finals: Sequence[Attack],
        views: frozenset[View],
        model: Any,
        tok: Any,
        ds: Any,
        privacy: Mapping[str, Any],
    ) -> list[AttackResult]:
        results: list[AttackResult] = []
        for a in observers:
            reason = a.applicability(views, transport_name=self.transport.name)
            if reason and not _runs_on_aggregate(a):
                results.append(AttackResult.not_applicable(a, reason))
            else:
                results.append(a.finish())
        if not finals:
            return results
        claimed = privacy.get("epsilon_sample_level") or privacy.get("epsilon_client_level")
        target = AttackTarget(
            model=model,
            tokenizer=tok,
            members=ds.members(),
            nonmembers=list(ds.nonmembers),
            canaries=list(ds.canaries),
            population=list(ds.eval),
            model_spec=self.config.model.name,
            lora_config=self.config.lora,
            max_length=self.config.data.max_length,
            seed=self.config.seed,
            claimed_epsilon=claimed,
            extra={"delta": privacy.get("delta") or 1e-5, "config": self.config},
        )
        for a in finals:
            reason = a.applicability(views, transport_name=self.transport.name)
            results.append(AttackResult.not_applicable(a, reason) if reason else a.run(target))
        return results

    def _results(
        self,
        engine: Any,
        final_state: Mapping[str, torch.Tensor],
        privacy: dict[str, Any],
        attacks: Sequence[AttackResult],
        fed_s: float,
        attacks_s: float,
        t_start: float,
        peak_mb: float,
    ) -> Results:
        hist = engine.history
        evals = [(r["round"], r["eval_loss"]) for r in hist if "eval_loss" in r]
        final = next((r for r in reversed(hist) if "eval_loss" in r), {})
        utility = {
            "eval_loss_initial": engine.initial_eval.get("eval_loss"),
            "eval_perplexity_initial": engine.initial_eval.get("eval_perplexity"),
            "eval_loss": final.get("eval_loss"),
            "eval_perplexity": final.get("eval_perplexity"),
            "eval_loss_by_round": [loss for _, loss in evals],
            "eval_loss_by_client": final.get("eval_loss_by_client", {}),
        }
        round_s = [r["round_s"] for r in hist]
        local_s = [r["local_train_s"] for r in hist]
        up = [v for r in hist for v in r["bytes_up"].values()]
        down = [v for r in hist for v in r["bytes_down"].values()]
        cost = {
            "wall_s": time.perf_counter() - t_start,
            "federation_s": fed_s,
            "attacks_s": attacks_s,
            "round_s": round_s,
            "local_train_s": local_s,
            "eval_s": [r["eval_s"] for r in hist],
            "overhead_fraction": (
                max(0.0, 1 - sum(local_s) / sum(round_s)) if round_s and sum(round_s) > 0 else None
            ),
            "bytes_up_per_client_per_round": (sum(up) / len(up)) if up else 0,
            "bytes_down_per_client_per_round": (sum(down) / len(down)) if down else 0,
            "peak_rss_mb": peak_mb,
            "transport": engine.transport.cost_report(),
            "plaintext_fraction": engine.transport.plaintext_fraction(),
        }
        federation = {
            "transport": self.transport.name,
            "aggregator": self.aggregator.name,
            "defenses": [d.name for d in self.defenses],
            "num_clients": len(engine.client_features),
            "rounds": len(hist),
            "adapter_parameters": num_parameters(final_state),
            "rejected_updates": [dict(x, round=r["round"]) for r in hist for x in r["rejected"]],
            "dropped": {str(r["round"]): r["dropped"] for r in hist if r["dropped"]},
            "dataset": dict(self.dataset.summary()) if self.dataset is not None else {},
        }
        return Results(
            name=self.config.name,
            config_hash=self.config.config_hash(),
            config=self.config.to_dict(),
            utility=utility,
            privacy=privacy,
            attacks=[a.to_dict() for a in attacks],
            cost=cost,
            federation=federation,
            versions=package_versions(),
            rounds=list(hist),
        )


def _runs_on_aggregate(attack: Attack) -> bool:
    """Observers that declare they also run on the aggregate view (e.g. inversion)."""
    return bool(getattr(attack, "runs_on_aggregate", False))


def _write_config(path: Path, tree: Mapping[str, Any]) -> None:
    from fedsecure.report.toml_writer import dumps

    path.write_text(dumps(tree))


def run_grid(
    config: ExperimentConfig, *, out_dir: str | Path | None = None, progress: bool = False
) -> list[tuple[dict[str, Any], Results]]:
    """Run every point of ``config.grid`` (or the config itself without a grid)."""
    points = expand_grid(config) or [({}, config)]
    outs = []
    for i, (point, cfg) in enumerate(points):
        sub = None
        if out_dir is not None:
            sub = Path(out_dir) / (f"point_{i:02d}" if point else "")
        res = Experiment(cfg).run(out_dir=sub, progress=progress)
        outs.append((point, res))
    if out_dir is not None and len(points) > 1:
        from fedsecure.report.summary import write_grid_summary

        write_grid_summary(outs, Path(out_dir) / "summary.md")
        (Path(out_dir) / "grid.json").write_text(
            json.dumps([{"point": p, **r.to_dict()} for p, r in outs], indent=2, default=_json_default)
        )
    return outs
