"""The command line: catalogs, a run on the tiny model, clear errors."""

from __future__ import annotations

import json

from fedsecure.cli import main


def test_catalog_listings(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny" in out
    assert main(["datasets"]) == 0
    assert "private-records" in capsys.readouterr().out
    for kind in ("transports", "aggregators", "defenses", "attacks"):
        assert main([kind]) == 0
    assert "plain" in capsys.readouterr().out


def test_run_tiny_from_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--quiet", "--out", str(out), "--set", "model.name=tiny", "--set", "federation.rounds=1",
               "--set", "federation.local_steps=2", "--set", "data.num_clients=2",
               "--set", "data.examples_per_client=8",
               "--set", "data.max_length=64"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "eval_loss" in text and "results:" in text
    res = json.loads((out / "results.json").read_text())
    assert res["federation"]["rounds"] == 1 and res["config"]["model"]["name"] == "tiny"


def test_cli_errors_are_clear(capsys, tmp_path):
    assert main(["run", "--set", "model.name=tiny", "--set", "federation.rounds=0", "--out", str(tmp_path)]) == 2
    assert "federation.rounds must be >= 1" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
