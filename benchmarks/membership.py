"""Membership attacks on the same federated runs as the defenses: no defense vs DP-SGD eps 8 vs eps 1.

Runs ``attacks/membership.toml`` three times (its ``[grid]`` of defenses) through
``fedsecure.experiment.Experiment`` -- the federation, then every membership attack of the
scenario on the released adapter and on the server's per-client view -- and writes
``benchmarks/results/membership.json``: a list of the runs' ``results.json`` objects, each with
a ``"defense"`` label ("none", "dp-sgd eps=8", "dp-sgd eps=1"), plus a compact ``"table"``
(attack -> AUC, TPR@1%FPR, empirical epsilon lower bound) per run for reading at a glance.

Run: ``.venv/bin/python benchmarks/membership.py [--quick] [--only none "dp-sgd eps=8" "dp-sgd eps=1"]
[--runs-dir DIR]``
(--quick: the tiny model, 1 round, fewer candidates -- a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsecure.config import config_from_dict, load_tree  # noqa: E402
from fedsecure.experiment import Experiment  # noqa: E402

SCENARIO = ROOT / "attacks" / "membership.toml"
OUT = ROOT / "benchmarks" / "results" / "membership.json"

DEFENSES: list[tuple[str, list[dict[str, Any]]]] = [
    ("none", []),
    ("dp-sgd eps=8", [{"name": "dp-sgd", "target_epsilon": 8.0, "max_grad_norm": 1.0}]),
    ("dp-sgd eps=1", [{"name": "dp-sgd", "target_epsilon": 1.0, "max_grad_norm": 1.0}]),
]

QUICK = {
    "model": {"name": "tiny"},
    "data": {"examples_per_client": 12, "num_eval": 16, "num_nonmembers": 16, "max_length": 64},
    "federation": {"rounds": 1, "local_steps": 3},
}


def _merge(tree: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict):
            _merge(tree.setdefault(k, {}), v)
        else:
            tree[k] = v


def _table(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for a in results["attacks"]:
        m = a.get("metrics", {})
        out[a["name"]] = {
            "applicable": a["applicable"],
            "auc": m.get("auc"),
            "tpr_at_1pct_fpr": (m.get("tpr_at_fpr") or {}).get("0.01"),
            "blind_baseline_auc": m.get("blind_baseline_auc"),
            "epsilon": m.get("epsilon"),
            "epsilon_lower_bound": m.get("epsilon_lower_bound"),
            "exposure_by_repetition": m.get("exposure_by_repetition"),
            "reason": a.get("reason", ""),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model smoke run")
    p.add_argument("--out", default=str(OUT))
    p.add_argument(
        "--only", nargs="+", choices=[label for label, _ in DEFENSES], metavar="DEFENSE",
        help="run only these defense settings (labels: %(choices)s); the runs of other labels already in --out are "
        "kept, so the three runs can be measured in separate sessions",
    )
    p.add_argument(
        "--runs-dir", default=None,
        help="also keep each run's results directory (adapter, config.toml, results.json, summary.md, ROC plots) "
        "under DIR/<defense>, e.g. to audit the released adapter again with `fedsecure audit`",
    )
    args = p.parse_args(argv)
    out = Path(args.out)

    base_tree = load_tree(SCENARIO)
    base_tree.pop("grid", None)
    if args.quick:
        _merge(base_tree, QUICK)
        for a in base_tree.get("attacks", []):
            if a["name"] == "canary-exposure":
                a["num_candidates"] = 63
            if a["name"] == "rmia":
                a["reference_steps"] = 2
                a["num_reference_adapters"] = 2
    order = [label for label, _ in DEFENSES]
    runs: list[dict[str, Any]] = []
    if args.only and out.exists():
        runs = [r for r in json.loads(out.read_text()) if r.get("defense") not in args.only]
    for label, defenses in DEFENSES:
        if args.only and label not in args.only:
            continue
        tree = copy.deepcopy(base_tree)
        tree["defenses"] = copy.deepcopy(defenses)
        tree["name"] = f"{tree['name']}[{label}]"
        cfg = config_from_dict(tree)
        t0 = time.perf_counter()
        run_dir = None if args.runs_dir is None else Path(args.runs_dir) / label.replace(" ", "_").replace("=", "")
        results = Experiment(cfg).run(out_dir=run_dir).to_dict()
        results["defense"] = label
        results["wall_s"] = time.perf_counter() - t0
        results["table"] = _table(results)
        runs.append(results)
        runs.sort(key=lambda r: order.index(r["defense"]) if r.get("defense") in order else len(order))
        _write(out, runs)  # after every run: a long measurement interrupted later keeps what it finished
        print(f"== {label} ({results['wall_s']:.0f} s)", flush=True)
        for name, row in results["table"].items():
            if not row["applicable"]:
                print(f"  {name:>18}: not applicable ({row['reason']})")
                continue
            eps = row["epsilon_lower_bound"]
            eps_s = "" if eps is None else f"  eps_lb {eps:.2f} (claimed {row['epsilon']:.2f})"
            blind = row["blind_baseline_auc"]
            blind_s = "n/a" if blind is None else f"{blind:.3f}"
            print(
                f"  {name:>18}: AUC {row['auc']:.3f}  TPR@1%FPR {row['tpr_at_1pct_fpr']:.3f}  blind {blind_s}{eps_s}",
                flush=True,
            )
    print(f"wrote {out}")
    return 0


def _write(out: Path, runs: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=2, default=_default, allow_nan=True) + "\n")
    tmp.replace(out)


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, float) and math.isinf(obj):
        return str(obj)
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
