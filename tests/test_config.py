"""Scenario loading and validation: errors name the key, the allowed values and the fix."""

from __future__ import annotations

import pytest

from fedsecure.config import ConfigError, apply_override, config_from_dict, expand_grid, load_config, parse_value
from tests.conftest import tiny_tree


def test_embedded_default_loads():
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.transport.name == "plain" and cfg.aggregator.name == "fedavg"
    assert cfg.federation.rounds >= 2


def test_overrides_are_typed():
    cfg = load_config(overrides=["federation.rounds=5", "model.name=tiny", "federation.lr=1e-2",
                                 "lora.target_modules=['q_proj']"])
    assert cfg.federation.rounds == 5 and cfg.model.name == "tiny"
    assert cfg.federation.lr == pytest.approx(1e-2)
    assert cfg.lora.target_modules == ("q_proj",)
    assert parse_value("abc") == "abc" and parse_value("true") is True


def test_list_overrides_by_index():
    tree = tiny_tree(defenses=[{"name": "x", "a": 1}])
    apply_override(tree, "defenses.0.a=3")
    assert tree["defenses"][0]["a"] == 3
    with pytest.raises(ConfigError, match="out of range"):
        apply_override(tree, "defenses.4.a=3")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(tree, "federation.rounds")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"federation.rounds": 0}, "federation.rounds must be >= 1"),
        ({"federation.optimizer": "lion"}, "adamw, adam, sgd"),
        ({"federation.roundz": 3}, "unknown key federation.'roundz'"),
        ({"lora.rank": -1}, "lora.rank must be a positive integer"),
        ({"lora.target_modules": ["embed_tokens"]}, "target Linear layers"),
        ({"data.dataset": "nope"}, "registered: local, private-records"),
        ({"data.partition_typo": "iid"}, "unknown key 'partition_typo'"),
        ({"transport": {"name": "carrier-pigeon"}}, "unknown transport 'carrier-pigeon'; registered:"),
        ({"aggregator": {"name": "trimmed-mean", "trim": 0.2}}, "accepted: trim_fraction"),
        ({"federation.local_epochs": 1}, "exactly one of federation.local_steps and federation.local_epochs"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_malformed_scenarios_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_tree(**override))
    assert fragment in str(err.value)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_tree(**{"federation.rounds": 0, "lora.rank": 0, "bogus": 1}))
    msg = str(err.value)
    assert "federation.rounds" in msg and "lora.rank" in msg and "'bogus'" in msg


def test_unknown_model_lists_registered(tiny_config):
    from fedsecure.models import load_model

    with pytest.raises(ValueError, match="smollm2-135m, tiny"):
        load_model("no-such-model")


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[federation\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_grid_expansion():
    cfg = config_from_dict(tiny_tree(grid={"federation.lr": [0.1, 0.01], "lora.rank": [2, 4]}))
    points = expand_grid(cfg)
    assert len(points) == 4
    assert {(p["federation.lr"], p["lora.rank"]) for p, _ in points} == {(0.1, 2), (0.1, 4), (0.01, 2), (0.01, 4)}
    for p, c in points:
        assert c.federation.lr == p["federation.lr"] and c.lora.rank == p["lora.rank"] and not c.grid


def test_resolved_config_round_trips_through_toml(tmp_path):
    from fedsecure.report.toml_writer import dumps

    cfg = config_from_dict(tiny_tree(defenses=[], attacks=[{"name": "loss"}] if False else []))
    p = tmp_path / "c.toml"
    p.write_text(dumps(cfg.to_dict()))
    again = load_config(p)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()


def test_every_catalog_scenario_parses():
    """Each TOML in attacks/ and defenses/ is a valid scenario."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted([*root.glob("attacks/*.toml"), *root.glob("defenses/*.toml")])
    for f in files:
        load_config(f)
