"""Flower deployment engine with real processes on 127.0.0.1: a SuperLink, SuperNodes, ``flwr run``.

- 2 rounds of the tiny model over TLS with 3 SuperNodes give the simulation's adapters exactly;
- a SuperNode SIGKILLed during a secure-aggregation round still yields the survivors' sum;
- a run that cannot start (a client without SuperNode) fails with a clear error from the CLI;
- every process is gone afterwards, on success and on failure.

Each test starts and stops its own deployment (minutes on 2 busy cores: marked slow, still run
by ``make test``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from fedsecure.config import config_from_dict
from fedsecure.engines.flower import FlowerOptions, LocalFederation, run_flower
from fedsecure.engines.flower.launcher import pid_alive
from fedsecure.experiment import Experiment, Results
from fedsecure.models import load_adapter_file
from fedsecure.report.toml_writer import dumps
from tests.conftest import tiny_tree
from tests.test_flower import survivors_fedavg

pytestmark = pytest.mark.slow

BOUNDS = {
    "discovery_timeout_s": 120.0,
    "stage_timeout_s": 120.0,
    "train_timeout_s": 240.0,
    "run_timeout_s": 900.0,
}


def _processes_using(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose environment points at this run's private FLWR_HOME."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and pid_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def _assert_all_gone(run_processes: list[int], flwr_home: Path) -> None:
    assert run_processes, "the run recorded no process"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        any(pid_alive(p) for p in run_processes) or _processes_using(flwr_home)
    ):
        time.sleep(0.2)
    assert [p for p in run_processes if pid_alive(p)] == []
    assert _processes_using(flwr_home) == []


def _cfg(**over: Any):
    small = {
        "federation.rounds": 1,
        "federation.local_steps": 2,
        "data.examples_per_client": 8,
        "data.num_eval": 4,
        "data.num_nonmembers": 4,
    }
    return config_from_dict(tiny_tree(**{**small, **over}))


def test_two_rounds_on_three_supernodes_over_tls_equal_the_simulation(tmp_path):
    cfg = _cfg(**{"data.num_clients": 3, "federation.rounds": 2})
    sim = Experiment(cfg).run(out_dir=tmp_path / "sim")
    lines: list[str] = []
    run = run_flower(
        cfg,
        out_dir=tmp_path / "flower",
        options=FlowerOptions(supernodes=3, tls=True, **BOUNDS),
        echo=lines.append,
    )
    assert run.status == "finished:completed"
    res = run.results
    assert isinstance(res, Results) and res.cost["engine"]["supernodes"] == 3
    assert sorted(len(c) for c in res.cost["engine"]["clients_per_supernode"].values()) == [1, 1, 1]
    a, b = load_adapter_file(tmp_path / "sim" / "adapter"), load_adapter_file(tmp_path / "flower" / "adapter")
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # plain transport, same seed: equal adapters
    assert res.utility["eval_loss_by_round"] == sim.utility["eval_loss_by_round"]
    assert set(res.to_dict()) == set(sim.to_dict()) and set(res.cost) - set(sim.cost) == {"engine"}
    assert [len(r["aggregated"]) for r in res.rounds] == [3, 3] and len(lines) == 2
    log = (tmp_path / "flower" / "flower" / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log  # TLS on the SuperLink's API
    _assert_all_gone(run.processes, tmp_path / "flower" / "flower" / "home")


def test_supernode_killed_during_a_secagg_round_still_gives_the_survivors_sum(tmp_path):
    cfg = _cfg(
        **{
            "data.num_clients": 8,
            "federation.local_steps": 1,
            "transport": {"name": "secagg", "max_dropout_fraction": 0.25, "max_corrupt_fraction": 0.0},
        }
    )
    killed: dict[str, Any] = {}

    def arm(fed: LocalFederation | None) -> None:
        assert fed is not None

        def watch() -> None:  # kill SuperNode 2 (clients 2 and 5) once its training request arrives
            log = fed.workdir / "logs" / "supernode-2.log"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and "pids" not in killed:
                if log.exists() and "Receiving: train.fedsecure_round" in log.read_text(errors="replace"):
                    killed["pids"] = fed.kill_supernode(2)
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()

    run = run_flower(
        cfg, out_dir=tmp_path / "run", options=FlowerOptions(supernodes=3, **BOUNDS), on_started=arm
    )
    assert killed.get("pids"), "SuperNode 2 was never killed"
    assert all(not pid_alive(p) for p in killed["pids"])
    res = run.results
    rec = res.cost["transport"]["rounds"][0]
    assert rec["status"] == "ok" and rec["engine"] == "flower"
    assert (
        rec["dropped_at"]["masked_input"] == [2, 5] and rec["survivors"] == 6 and rec["masks_regenerated"] > 0
    )
    assert res.rounds[0]["dropped"] == [2, 5] and res.rounds[0]["aggregated"] == [0, 1, 3, 4, 6, 7]
    start, mean, weight = survivors_fedavg(cfg, survivors=[0, 1, 3, 4, 6, 7], num_clients=8)
    final = load_adapter_file(tmp_path / "run" / "adapter")
    tol = rec["quantisation_error_bound"] / weight + 1e-6
    worst = max(float((final[k].double() - start[k].double() - mean[k]).abs().max()) for k in start)
    assert worst <= tol, (worst, tol)
    assert max(float(mean[k].abs().max()) for k in mean) > 100 * tol
    _assert_all_gone(run.processes, tmp_path / "run" / "flower" / "home")


def test_a_failing_run_reports_why_and_leaves_no_process(tmp_path, capsys, monkeypatch):
    from fedsecure.cli import main
    from fedsecure.engines.flower import launcher

    started: list[LocalFederation] = []
    real_start = LocalFederation.start

    def spy(self: LocalFederation) -> LocalFederation:
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(LocalFederation, "start", spy)
    # client 2 of 3 has no SuperNode: the ServerApp gives up after the discovery timeout
    monkeypatch.setattr(
        launcher,
        "default_node_configs",
        lambda *, supernodes, num_clients: ({"client-ids": "0"}, {"client-ids": "1"}),
    )
    real_options = launcher.options_from_args
    monkeypatch.setattr(
        launcher,
        "options_from_args",
        lambda args: dataclasses.replace(real_options(args), discovery_timeout_s=15.0),
    )
    scenario = tmp_path / "s.toml"
    scenario.write_text(dumps(tiny_tree(**{"data.num_clients": 3})))
    rc = main(
        [
            "run",
            str(scenario),
            "--engine",
            "flower",
            "--supernodes",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "the fedsecure ServerApp failed" in err and "clients [2] are served by no SuperNode" in err
    assert not (tmp_path / "out" / "results.json").exists()
    fed = started[0]
    _assert_all_gone(fed.ended, fed.flwr_home)
