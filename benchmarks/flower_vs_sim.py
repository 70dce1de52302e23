"""The same scenario on the embedded simulation and on Flower's deployment engine, side by side.

Tiny model, 3 clients, 3 SuperNodes on 127.0.0.1 (one client each), plain and secagg
transports, same seed. For each transport it runs the simulation, then a local Flower
deployment (SuperLink + 3 SuperNodes + ``flwr run``), and records:

- ``max_abs_diff_final_adapter``: Flower vs the simulation with the same transport (0 expected:
  the client step is deterministic and secagg's round-to-nearest quantisation is too);
- for secagg, the adapter after round 0 against the *plain* simulation's: the difference must
  stay within the protocol's quantisation bound on the mean (``bound / total_weight`` per
  coordinate) plus the float32 rounding of the stored adapter (two ulps of its largest value);
- wall time per round on each engine, Flower's overhead per round (seconds and ratio), how the
  training stage splits into ClientApp process start (Python, flwr, torch imports), the
  node's model/data set-up and training, and the deployment's start/stop cost.

Writes ``benchmarks/results/flower_vs_sim.json``.

    .venv/bin/python benchmarks/flower_vs_sim.py            # 3 rounds, 4 local steps
    .venv/bin/python benchmarks/flower_vs_sim.py --quick    # 2 rounds, 2 local steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedsecure.config import config_from_dict
from fedsecure.engines.flower import FlowerOptions, run_flower
from fedsecure.experiment import Experiment
from fedsecure.federation.checkpoint import load_checkpoint
from fedsecure.models import load_adapter_file

RESULTS = Path(__file__).resolve().parent / "results" / "flower_vs_sim.json"


def scenario(transport: str, *, rounds: int, steps: int) -> Any:
    t: dict[str, Any] = {"name": transport}
    if transport == "secagg":
        t.update(max_dropout_fraction=0.0, max_corrupt_fraction=0.0)
    return config_from_dict(
        {
            "name": f"flower-vs-sim-{transport}",
            "seed": 0,
            "model": {"name": "tiny"},
            "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {
                "dataset": "private-records",
                "num_clients": 3,
                "examples_per_client": 16,
                "num_eval": 8,
                "num_nonmembers": 8,
                "canary_repetitions": [1],
                "max_length": 64,
            },
            "federation": {
                "rounds": rounds,
                "local_steps": steps,
                "batch_size": 4,
                "lr": 5e-3,
                "eval_batch_size": 8,
            },
            "transport": t,
        }
    )


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def round0_state(out: Path) -> dict[str, torch.Tensor]:
    """The global adapter after round 0 (both runs start from the same initial adapter)."""
    _, after, _ = load_checkpoint(out / "checkpoints" / "round_0000")
    return after


def total_weight(cfg: Any) -> int:
    """Sum of the clients' FedAvg weights (their example counts), as the engine computes them."""
    from fedsecure.registry import DATASETS

    ds = DATASETS.get(cfg.data.dataset)(**{"seed": cfg.seed, **dict(cfg.data.params)})
    return sum(len(c) for c in ds.clients)


def summary(res: Any) -> dict[str, Any]:
    return {
        "round_s": res.cost["round_s"],
        "round_s_mean": statistics.mean(res.cost["round_s"]),
        "local_train_s_mean": statistics.mean(res.cost["local_train_s"]),
        "eval_s_mean": statistics.mean(res.cost["eval_s"]),
        "federation_s": res.cost["federation_s"],
        "eval_loss_by_round": res.utility["eval_loss_by_round"],
    }


def measure(
    transport: str, *, rounds: int, steps: int, work: Path, plain_sim_out: Path | None
) -> dict[str, Any]:
    cfg = scenario(transport, rounds=rounds, steps=steps)
    t0 = time.perf_counter()
    sim = Experiment(cfg).run(out_dir=work / f"sim-{transport}")
    sim_wall = time.perf_counter() - t0
    run = run_flower(
        cfg,
        out_dir=work / f"flower-{transport}",
        options=FlowerOptions(supernodes=3, stage_timeout_s=300, train_timeout_s=600, run_timeout_s=3600),
    )
    fl = run.results
    s, f = summary(sim), summary(fl)
    timing = fl.cost["engine"]["train_stage_timing"]
    stage = statistics.mean(t["stage_s"] for t in timing)
    handler = statistics.mean(t["node_handler_s"] for t in timing)
    setup = statistics.mean(t["node_setup_s"] for t in timing)
    row: dict[str, Any] = {
        "transport": transport,
        "clients": 3,
        "supernodes": 3,
        "rounds": rounds,
        "local_steps": steps,
        "adapter_parameters": fl.federation["adapter_parameters"],
        "max_abs_diff_final_adapter": max_diff(
            load_adapter_file(work / f"sim-{transport}" / "adapter"),
            load_adapter_file(work / f"flower-{transport}" / "adapter"),
        ),
        "eval_loss_equal": s["eval_loss_by_round"] == f["eval_loss_by_round"],
        "simulation": {**s, "wall_s": sim_wall},
        "flower": {**f, "wall_s": run.wall_s, "messages": fl.cost["engine"]["messages"]},
        "flower_overhead_s_per_round": f["round_s_mean"] - s["round_s_mean"],
        "flower_round_time_ratio": f["round_s_mean"] / s["round_s_mean"],
        "flower_train_stage": {
            "stage_s_mean": stage,
            "process_start_and_transfer_s_mean": stage - handler,
            "node_model_and_data_setup_s_mean": setup,
            "node_training_and_encoding_s_mean": handler - setup,
        },
        "flower_deployment_start_stop_s": run.wall_s - fl.cost["wall_s"],
    }
    if transport == "secagg" and plain_sim_out is not None:
        rec = fl.cost["transport"]["rounds"][0]
        weight = total_weight(cfg)  # every client survives
        row["round0_vs_plain_max_abs_diff"] = max_diff(
            round0_state(work / "flower-secagg"), round0_state(plain_sim_out)
        )
        row["round0_quantisation_bound_per_coordinate"] = rec["quantisation_error_bound"] / weight
        # the new global adapter is stored in float32: adding the aggregate rounds each coordinate
        # to within half an ulp of its value, on both engines
        plain0 = round0_state(plain_sim_out)
        ulp = max(float(v.abs().max()) for v in plain0.values()) * 2.0**-23
        row["round0_float32_ulp_of_adapter"] = ulp
        row["round0_within_bound"] = (
            row["round0_vs_plain_max_abs_diff"] <= row["round0_quantisation_bound_per_coordinate"] + 2 * ulp
        )
        row["secagg_bytes_per_client_per_round"] = fl.cost["transport"]["total_bytes_per_client_mean"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 local steps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rounds, steps = (2, 2) if args.quick else (3, 4)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flower-vs-sim-") as tmp:
        work = Path(tmp)
        rows.append(measure("plain", rounds=rounds, steps=steps, work=work, plain_sim_out=None))
        rows.append(
            measure("secagg", rounds=rounds, steps=steps, work=work, plain_sim_out=work / "sim-plain")
        )
    doc = {
        "benchmark": "flower_vs_sim",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "note": "2 shared CPU cores; simulation and Flower measured one after the other in one run",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for r in rows:
        print(
            f"{r['transport']:>6}: sim {r['simulation']['round_s_mean']:.1f} s/round, flower "
            f"{r['flower']['round_s_mean']:.1f} s/round (x{r['flower_round_time_ratio']:.1f}, "
            f"+{r['flower_overhead_s_per_round']:.1f} s), "
            f"max |adapter diff| {r['max_abs_diff_final_adapter']:.3g}"
        )


if __name__ == "__main__":
    main()
