"""Orchestration overhead of the embedded federation engine.

For each model, runs a plain FedAvg federation and compares the wall time of each round
(client sampling, adapter load, local training, validation, encode, combine, aggregate,
apply; evaluation is timed separately and excluded) with the sum of the clients' pure
local-training time (the optimizer loop alone). Writes
``benchmarks/results/round_overhead.json``: one row per model with ``model``, ``clients``,
``round_s``, ``local_train_s``, ``overhead_fraction`` (1 - local_train_s / round_s).

    .venv/bin/python benchmarks/round_overhead.py            # tiny and smollm2-135m
    .venv/bin/python benchmarks/round_overhead.py --quick    # tiny only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fedsecure.config import load_config
from fedsecure.experiment import Experiment

RESULTS = Path(__file__).resolve().parent / "results" / "round_overhead.json"


def measure(model: str, *, clients: int, rounds: int, steps: int) -> dict:
    cfg = load_config(
        overrides=[
            f"model.name={model}",
            f"data.num_clients={clients}",
            f"federation.rounds={rounds}",
            f"federation.local_steps={steps}",
            "federation.batch_size=8",
            "data.max_length=128",
        ]
    )
    t0 = time.perf_counter()
    res = Experiment(cfg).run()
    wall = time.perf_counter() - t0
    rounds_rows = res.rounds
    round_s = [r["round_s"] for r in rounds_rows]
    local_s = [r["local_train_s"] for r in rounds_rows]
    return {
        "model": model,
        "clients": clients,
        "rounds": rounds,
        "local_steps": steps,
        "round_s": statistics.mean(round_s),
        "local_train_s": statistics.mean(local_s),
        "overhead_fraction": 1 - sum(local_s) / sum(round_s),
        "overhead_s_per_round": statistics.mean(r - t for r, t in zip(round_s, local_s, strict=True)),
        "eval_s_per_round": statistics.mean(r["eval_s"] for r in rounds_rows),
        "eval_loss_by_round": res.utility["eval_loss_by_round"],
        "experiment_wall_s": wall,
        "peak_rss_mb": res.cost["peak_rss_mb"],
        "adapter_parameters": res.federation["adapter_parameters"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = [measure("tiny", clients=4, rounds=3, steps=8)]
    if not args.quick:
        rows.append(measure("smollm2-135m", clients=4, rounds=2, steps=8))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    for r in rows:
        print(f"{r['model']:>14}: round {r['round_s']:.2f} s, local training {r['local_train_s']:.2f} s, "
              f"overhead {100 * r['overhead_fraction']:.2f}%")


if __name__ == "__main__":
    main()
