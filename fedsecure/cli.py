"""Command line: ``fedsecure run|models|datasets|transports|defenses|attacks|audit``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _default_out(name: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
    return Path("runs") / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsecure.config import expand_grid, load_config
    from fedsecure.experiment import Experiment, run_grid
    from fedsecure.report.summary import (
        RECONSTRUCTION_HEADERS,
        attack_rows,
        grid_table,
        headline,
        reconstruction_rows,
        text_table,
    )

    cfg = load_config(args.scenario, overrides=args.set or [])
    if args.engine == "flower":
        from fedsecure.engines.flower import run_on_flower

        return run_on_flower(cfg, args)
    out = Path(args.out) if args.out else _default_out(cfg.name)
    print(f"fedsecure: running {cfg.name!r} ({cfg.model.name}, {cfg.transport.name}, "
          f"defenses: {', '.join(d.name for d in cfg.defenses) or 'none'}) -> {out}", file=sys.stderr)
    if cfg.grid:
        points = expand_grid(cfg)
        print(f"fedsecure: grid of {len(points)} runs", file=sys.stderr)
        outs = run_grid(cfg, out_dir=out, progress=not args.quiet)
        headers, rows = grid_table(outs)
        print(text_table(headers, rows))
        return 0
    res = Experiment(cfg).run(out_dir=out, resume=args.resume, progress=not args.quiet)
    h = headline(res)
    print()
    print(text_table(list(h), [list(h.values())]))
    losses = res.utility.get("eval_loss_by_round", [])
    if losses:
        print(f"\neval loss: initial {res.utility.get('eval_loss_initial'):.4f} -> "
              + " -> ".join(f"{x:.4f}" for x in losses))
    if res.attacks:
        print()
        print(text_table(["attack", "applicable", "AUC", "AUC 95% CI", "TPR@1%FPR", "eps LB", "reason"],
                         attack_rows(res)))
        recon = reconstruction_rows(res)
        if recon:
            print()
            print(text_table(RECONSTRUCTION_HEADERS, recon))
    print(f"\nresults: {out / 'results.json'}  summary: {out / 'summary.md'}")
    return 0


def _cmd_list(kind: str) -> int:
    from fedsecure import registry

    reg = {
        "models": registry.MODELS,
        "datasets": registry.DATASETS,
        "transports": registry.TRANSPORTS,
        "aggregators": registry.AGGREGATORS,
        "defenses": registry.DEFENSES,
        "attacks": registry.ATTACKS,
    }[kind]
    desc = reg.describe()
    width = max((len(n) for n in desc), default=0)
    for name, text in desc.items():
        print(f"{name.ljust(width)}  {text}")
    if kind == "models":
        print(f"{'<dir or HF id>'.ljust(width)}  any local model directory (no hub access at run time)")
    return 0


def _cmd_audit(argv: Sequence[str]) -> int:
    from fedsecure.attacks.audit import audit_main

    return audit_main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsecure",
        description="Federated LoRA fine-tuning with pluggable defenses and attacks, measured side by side.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario (the embedded default without a file)")
    r.add_argument("scenario", nargs="?", help="scenario TOML (e.g. attacks/membership.toml); default: embedded")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key, e.g. --set federation.rounds=5 --set model.name=tiny")
    r.add_argument("--out", help="results directory (default: runs/<name>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    r.add_argument("--engine", choices=("simulation", "flower"), default="simulation",
                   help="simulation (default, one process) or flower (SuperLink + SuperNodes)")
    r.add_argument("--supernodes", type=int, default=None, help="flower: number of local SuperNodes")
    r.add_argument("--superlink", default=None, help="flower: address of an existing SuperLink")
    r.add_argument("--tls", action="store_true", help="flower: local SuperLink/SuperNodes over TLS (fresh CA)")
    r.add_argument("--root-certificates", default=None, metavar="CA.pem",
                   help="flower: CA certificate of the --superlink's TLS certificate")
    r.add_argument("--insecure", action="store_true", help="flower: connect to --superlink without TLS")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    for kind in ("models", "datasets", "transports", "aggregators", "defenses", "attacks"):
        sub.add_parser(kind, help=f"list the registered {kind}")
    sub.add_parser("audit", help="audit a trained PEFT adapter for membership leakage (see fedsecure audit -h)",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fedsecure.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "audit":
        return _cmd_audit(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_list(args.command)
    except (ConfigError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"fedsecure: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
