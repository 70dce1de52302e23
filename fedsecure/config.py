"""Scenario configuration: frozen dataclasses loaded from TOML and validated.

Errors name the key, the allowed values and the fix. ``--set key=value`` overrides are
applied to the raw TOML tree before validation (``value`` is parsed as a TOML value, so
``--set federation.rounds=5`` is an int and ``--set model.name=tiny`` a string).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure.models.lora import LoraSettings


class ConfigError(ValueError):
    """A scenario is malformed; the message lists every problem found."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "private-records"
    max_length: int = 128
    params: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the dataset builder (e.g. num_clients, examples_per_client)."""


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 3
    clients_per_round: int | None = None
    """How many clients train each round (None = all); or use ``client_fraction``."""
    client_fraction: float | None = None
    local_steps: int | None = 10
    local_epochs: int | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
    """Physical batch for gradient accumulation (None = the whole logical batch)."""
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    """FedProx proximal term weight (Li et al. 2020); 0 = FedAvg."""
    dropout_rate: float = 0.0
    """Fraction of the sampled clients that drop out after training (simulation)."""
    eval_every: int = 1
    eval_batch_size: int = 16
    max_eval_examples: int | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        errs = []
        if self.rounds < 1:
            errs.append(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.clients_per_round is not None and self.client_fraction is not None:
            errs.append("set only one of federation.clients_per_round and federation.client_fraction")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            errs.append(f"federation.clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.client_fraction is not None and not 0 < self.client_fraction <= 1:
            errs.append(f"federation.client_fraction must be in (0, 1], got {self.client_fraction}")
        if (self.local_steps is None) == (self.local_epochs is None):
            errs.append("set exactly one of federation.local_steps and federation.local_epochs")
        if self.local_steps is not None and self.local_steps < 1:
            errs.append(f"federation.local_steps must be >= 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs < 1:
            errs.append(f"federation.local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            errs.append(f"federation.batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            errs.append(f"federation.micro_batch_size must be in [1, batch_size], got {self.micro_batch_size}")
        if not self.lr > 0:
            errs.append(f"federation.lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            errs.append(f"federation.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.proximal_mu < 0:
            errs.append(f"federation.proximal_mu must be >= 0, got {self.proximal_mu}")
        if not 0 <= self.dropout_rate < 1:
            errs.append(f"federation.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            errs.append("federation.eval_every and federation.checkpoint_every must be >= 1")
        if errs:
            raise ConfigError("; ".join(errs))

    def sampled_per_round(self, num_clients: int) -> int:
        if self.clients_per_round is not None:
            return min(self.clients_per_round, num_clients)
        if self.client_fraction is not None:
            return max(1, round(self.client_fraction * num_clients))
        return num_clients


OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass(frozen=True)
class PluginConfig:
    """A registry name plus the keyword arguments of its constructor."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.params)}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole scenario. Build with :func:`load_config` or :func:`config_from_dict`."""

    name: str = "default"
    seed: int = 0
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    transport: PluginConfig = field(default_factory=lambda: PluginConfig("plain"))
    aggregator: PluginConfig = field(default_factory=lambda: PluginConfig("fedavg"))
    defenses: tuple[PluginConfig, ...] = ()
    attacks: tuple[PluginConfig, ...] = ()
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved tree (a valid TOML scenario)."""
        return _plain(self.raw)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading

_TOP_KEYS = {
    "name", "seed", "description", "model", "lora", "data", "federation",
    "transport", "aggregator", "defenses", "attacks", "grid",
}  # fmt: skip


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def parse_value(text: str) -> Any:
    """Parse ``text`` as a TOML value; fall back to the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to ``tree`` in place (list items by index: ``defenses.0.x``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, _, text = assignment.partition("=")
    set_path(tree, key.strip(), parse_value(text.strip()))


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {dotted!r}: use dotted names like federation.rounds")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _index(p, node, dotted)
            node = node[idx]
            continue
        if p not in node:
            node[p] = [] if nxt.isdigit() else {}
        node = node[p]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if idx == len(node):
            node.append(value)
        else:
            node[_index(last, node, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[:-1])} is not a table")


def _index(p: str, node: list, dotted: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"{dotted!r}: index {p!r} out of range (the list has {len(node)} items)")
    return int(p)


def _check_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str], errs: list[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    for k in unknown:
        errs.append(f"unknown key {section + '.' if section else ''}{k!r}; allowed: {', '.join(sorted(allowed))}")


def _dataclass_from(cls: type, section: str, data: Mapping[str, Any], errs: list[str], skip: Sequence[str] = ()) -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    _check_keys(section, data, names, errs)
    kwargs = {k: v for k, v in data.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        errs.append(str(err) if section in str(err) else f"[{section}] {err}")
        return cls()


def _plugin(section: str, item: Any, registry: Any, errs: list[str]) -> PluginConfig | None:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or "name" not in item:
        errs.append(f"{section} needs a table with a 'name' key (one of: {', '.join(registry.names())})")
        return None
    name = item["name"]
    params = {k: v for k, v in item.items() if k != "name"}
    if name not in registry:
        errs.append(f"{section}.name: unknown {registry.kind} {name!r}; registered: {', '.join(registry.names())}")
        return None
    errs.extend(check_kwargs(registry.get(name), params, where=f"{section} ({name})"))
    return PluginConfig(name=name, params=params)


def check_kwargs(target: Any, params: Mapping[str, Any], *, where: str) -> list[str]:
    """Errors for keyword arguments that ``target`` (a class or function) does not accept."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return []
    accepted = [n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    bad = sorted(set(params) - set(accepted))
    return [f"{where}: unknown key {k!r}; accepted: {', '.join(accepted) or '(none)'}" for k in bad]


def config_from_dict(tree: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a raw scenario tree; raise :class:`ConfigError` listing every problem."""
    from fedsecure.registry import AGGREGATORS, ATTACKS, DATASETS, DEFENSES, TRANSPORTS

    tree = copy.deepcopy(dict(tree))
    errs: list[str] = []
    _check_keys("", tree, sorted(_TOP_KEYS), errs)
    for sec in ("model", "lora", "data", "federation"):
        if sec in tree and not isinstance(tree[sec], Mapping):
            errs.append(f"[{sec}] must be a table")
            tree[sec] = {}
    model = _dataclass_from(ModelConfig, "model", tree.get("model", {}), errs)
    lora_raw = dict(tree.get("lora", {}))
    if isinstance(lora_raw.get("target_modules"), list):
        lora_raw["target_modules"] = tuple(lora_raw["target_modules"])
    lora = _dataclass_from(LoraSettings, "lora", lora_raw, errs, skip=("extra",))
    data_raw = dict(tree.get("data", {}))
    ds_name = data_raw.pop("dataset", DataConfig.dataset)
    max_length = data_raw.pop("max_length", DataConfig.max_length)
    if ds_name not in DATASETS:
        errs.append(f"data.dataset: unknown dataset {ds_name!r}; registered: {', '.join(DATASETS.names())}")
    else:
        errs.extend(check_kwargs(DATASETS.get(ds_name), {"seed": 0, **data_raw}, where="[data]"))
    if not isinstance(max_length, int) or max_length < 16:
        errs.append(f"data.max_length must be an integer >= 16, got {max_length!r}")
    data = DataConfig(dataset=ds_name, max_length=max_length, params=data_raw)
    fed = _dataclass_from(FederationConfig, "federation", tree.get("federation", {}), errs)
    transport = _plugin("transport", tree.get("transport", {"name": "plain"}), TRANSPORTS, errs)
    aggregator = _plugin("aggregator", tree.get("aggregator", {"name": "fedavg"}), AGGREGATORS, errs)
    defenses = []
    raw_def = tree.get("defenses", [])
    if not isinstance(raw_def, list):
        errs.append("defenses must be an array of tables: [[defenses]] name = ...")
        raw_def = []
    for i, d in enumerate(raw_def):
        p = _plugin(f"defenses.{i}", d, DEFENSES, errs)
        if p:
            defenses.append(p)
    attacks = []
    raw_att = tree.get("attacks", [])
    if not isinstance(raw_att, list):
        errs.append("attacks must be an array of tables: [[attacks]] name = ...")
        raw_att = []
    for i, a in enumerate(raw_att):
        p = _plugin(f"attacks.{i}", a, ATTACKS, errs)
        if p:
            attacks.append(p)
    grid_raw = tree.get("grid", {})
    grid: dict[str, tuple[Any, ...]] = {}
    if not isinstance(grid_raw, Mapping):
        errs.append("[grid] must be a table of dotted keys to lists")
    else:
        for k, v in grid_raw.items():
            if not isinstance(v, list) or not v:
                errs.append(f"grid.{k!r} must be a non-empty list of values")
            else:
                grid[k] = tuple(v)
    seed = tree.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        errs.append(f"seed must be a non-negative integer, got {seed!r}")
    if errs:
        raise ConfigError("invalid scenario:\n  - " + "\n  - ".join(errs))
    assert transport is not None and aggregator is not None
    return ExperimentConfig(
        name=str(tree.get("name", "default")),
        seed=seed,
        description=str(tree.get("description", "")),
        model=model,
        lora=lora,
        data=data,
        federation=fed,
        transport=transport,
        aggregator=aggregator,
        defenses=tuple(defenses),
        attacks=tuple(attacks),
        grid=grid,
        raw=tree,
    )


def load_tree(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        from importlib.resources import files

        text = files("fedsecure").joinpath("scenarios/default.toml").read_text()
        return tomllib.loads(text)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"scenario file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p} is not valid TOML: {err}") from err


def load_config(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a scenario (None = the embedded default) and apply ``key=value`` overrides."""
    tree = load_tree(path)
    for o in overrides:
        apply_override(tree, o)
    return config_from_dict(tree)


def expand_grid(config: ExperimentConfig) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """One config per point of ``[grid]`` (the cartesian product); [] without a grid."""
    import itertools

    if not config.grid:
        return []
    keys = list(config.grid)
    out = []
    for values in itertools.product(*(config.grid[k] for k in keys)):
        tree = copy.deepcopy(dict(config.raw))
        tree.pop("grid", None)
        point = dict(zip(keys, values, strict=True))
        for k, v in point.items():
            set_path(tree, k, v)
        tree["name"] = f"{config.name}[" + ",".join(f"{k}={v}" for k, v in point.items()) + "]"
        out.append((point, config_from_dict(tree)))
    return out
