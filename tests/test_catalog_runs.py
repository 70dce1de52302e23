"""Every scenario in the top-level attacks/ and defenses/ catalogs runs, shrunk to the tiny model.

The catalogs are what users run first; a scenario that parses but fails at run time (a plug-in
argument renamed, a combination that the validator refuses) would only show up for them.
Every grid point is constructed and validated; one point per file runs end to end.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedsecure.config import expand_grid, load_config
from fedsecure.experiment import Experiment

ROOT = Path(__file__).resolve().parents[1]
CATALOG = sorted([*ROOT.glob("attacks/*.toml"), *ROOT.glob("defenses/*.toml")])

SHRINK = [
    "model.name=tiny",
    "data.examples_per_client=8",
    "data.num_eval=8",
    "data.max_length=64",
    "federation.local_steps=1",
    "federation.batch_size=4",
]

# Per-attack arguments that make a catalog entry slow on purpose (sized for smollm2 measurements).
ATTACK_SHRINK = {
    "rmia": {"num_reference_adapters": 2, "reference_steps": 1},
    "canary-exposure": {"num_candidates": 20},
    "client-membership": {"records_per_client": 2},
    "inversion": {"beam_width": 2},
}


def _shrunk(path: Path):
    cfg = load_config(path, overrides=SHRINK)
    rounds = 2 if any(a.name == "inversion" for a in cfg.attacks) else 1
    extra = [f"federation.rounds={rounds}"]
    if "num_nonmembers" in cfg.data.params:
        extra.append("data.num_nonmembers=8")
    for i, a in enumerate(cfg.attacks):
        for k, v in ATTACK_SHRINK.get(a.name, {}).items():
            if k in a.params:
                extra.append(f"attacks.{i}.{k}={v}")
    return load_config(path, overrides=[*SHRINK, *extra])


@pytest.mark.parametrize("path", CATALOG, ids=[f"{p.parent.name}/{p.name}" for p in CATALOG])
def test_catalog_scenario_runs_on_tiny(path, tmp_path):
    cfg = _shrunk(path)
    points = expand_grid(cfg) or [({}, cfg)]
    for _, point_cfg in points:
        Experiment(point_cfg)  # builds every plug-in and validates the combination
    res = Experiment(points[0][1]).run(out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "results.json").exists()
    assert math.isfinite(res.utility["eval_loss"])
    for a in points[0][1].attacks:
        out = res.attack(a.name)
        assert (out["applicable"] and out["metrics"]) or (not out["applicable"] and out["reason"]), out
