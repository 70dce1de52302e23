"""Gradient inversion of LoRA updates on SmolLM2-135M: what the server recovers, with and without defenses.

Each row is one client update computed for real (peft LoRA on q_proj/v_proj, float32, CPU)
from synthetic private records (``private-records``, Faker), attacked with
:func:`fedsecure.attacks.inversion.invert_update` and scored against the trained token
sequences (:func:`~fedsecure.attacks.inversion.score_reconstruction`).

- ``round``: ``later`` = the client starts from an adapter that was trained before (B != 0:
  ``WARM`` Adam steps on other records); ``first`` = peft's fresh adapter (B = 0).
- ``server``: ``honest`` or ``malicious`` (the quiet crafted adapter, A = 0 and tiny B).
- ``format``: ``plain`` = the record's text truncated to ``tokens`` tokens, every token
  supervised (so ``tokens`` is exact); ``chat`` = the project's chat tokenisation
  (``encode_example``: system/user/assistant template, response-only labels) at
  ``max_length = tokens``.
- ``defense``: ``none``; ``secagg-10`` = the server sees only the mean of 10 clients'
  updates (each client a different batch; the exact mean, i.e. before secagg's fixed-point
  quantisation -- the attacker's best case); ``dp-eps8`` / ``dp-eps1`` = DP-SGD on the
  client (per-example clipping to C = 1, Gaussian noise sigma x C on the sum) with the
  sigma that :func:`fedsecure.defenses.dp.accounting.calibrate_noise_multiplier` gives for
  (eps, delta = 1e-5) over the planned training (``DP_PLAN``); the server knows sigma (it is
  public) and whitens against it.
- the optimisation baseline (TAG/LAMP-style gradient matching) runs on one configuration
  for comparison (skipped with ``--quick``).

Run: ``.venv/bin/python benchmarks/inversion.py [--quick]`` -> benchmarks/results/inversion.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedsecure.attacks.inversion import (
    InversionSettings,
    TrainFacts,
    craft_adapter,
    invert_update,
    optimisation_baseline,
    score_reconstruction,
)
from fedsecure.data.tokenize import collate, encode_example
from fedsecure.models import LoraSettings, attach_lora, get_adapter_state, load_model, set_adapter_state
from fedsecure.models.loss import per_sequence_loss
from fedsecure.registry import DATASETS

MODEL = "smollm2-135m"
TARGETS = ("q_proj", "v_proj")
LR = {"sgd": 0.05, "adam": 3e-4}
WARM = {"optimizer": "adam", "lr": 1e-3, "steps": 20}
"""The "later round" adapter: 20 AdamW-style steps (lr 1e-3) on 16 other records, so B is no longer 0
(|B| ~ 1e-2, what a few federated rounds of the default AdamW recipe produce)."""
CLIP = 1.0
DP_DELTA = 1e-5
DP_PLAN = {"examples_per_client": 64, "rounds": 10, "local_steps": 1}
"""DP calibration plan: sample rate = batch / 64 examples, 10 rounds x 1 local step."""


@dataclass(frozen=True)
class Config:
    rank: int
    batch: int
    tokens: int
    round: str = "later"
    server: str = "honest"
    defense: str = "none"
    optimizer: str = "sgd"
    local_steps: int = 1
    format: str = "plain"
    baseline: bool = False


QUICK = [
    Config(8, 1, 16),
    Config(8, 1, 64),
    Config(64, 4, 32),
    Config(8, 1, 16, round="first"),
    Config(8, 1, 16, round="first", server="malicious"),
    Config(64, 1, 16, defense="secagg-10"),
    Config(64, 1, 16, defense="dp-eps8"),
]

FULL = [
    Config(8, 1, 16),
    Config(8, 1, 17),
    Config(8, 1, 32),
    Config(8, 1, 64),
    Config(64, 1, 32),
    Config(64, 1, 64),
    Config(64, 1, 128),
    Config(8, 4, 32),
    Config(64, 4, 16),
    Config(64, 4, 32),
    Config(8, 1, 16, round="first"),
    Config(64, 1, 16, round="first"),
    Config(8, 1, 16, round="first", server="malicious"),
    Config(64, 1, 64, round="first", server="malicious"),
    Config(64, 4, 32, round="first", server="malicious"),
    Config(8, 1, 16, optimizer="adam"),
    Config(8, 1, 16, round="first", server="malicious", optimizer="adam"),
    Config(64, 1, 16, local_steps=4),
    Config(64, 1, 16, round="first", server="malicious", local_steps=4),
    Config(64, 1, 48, format="chat"),
    Config(64, 1, 96, format="chat"),
    Config(8, 1, 16, defense="secagg-10"),
    Config(64, 1, 16, defense="secagg-10"),
    Config(64, 1, 16, defense="dp-eps8"),
    Config(64, 1, 16, defense="dp-eps1"),
    Config(8, 1, 16, defense="dp-eps8"),
    Config(8, 1, 16, baseline=True),
]


def records(n: int) -> list[dict[str, Any]]:
    ds = DATASETS.get("private-records")(
        num_clients=4, examples_per_client=max(8, n // 4 + 1), num_eval=0, num_nonmembers=0, seed=0,
        canary_repetitions=(1,), canaries_per_repetition=0,
    )
    out = [ex for c in ds.clients for ex in c if "canary_id" not in ex]
    return out[:n]


def encode(tok: Any, ex: dict[str, Any], cfg: Config) -> dict[str, list[int]]:
    if cfg.format == "chat":
        return encode_example(tok, ex, max_length=cfg.tokens)
    ids = list(tok(ex["response"], add_special_tokens=False)["input_ids"])[: cfg.tokens]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def sgd_or_adam(params: list[torch.nn.Parameter], cfg: Config, lr: float | None = None) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr or LR["adam"])
    return torch.optim.SGD(params, lr=lr or LR["sgd"])


def local_update(
    model: Any, tok: Any, glob: dict[str, torch.Tensor], batches: list[list[dict[str, list[int]]]], cfg: Config,
    dp_sigma: float = 0.0,
    lr: float | None = None,
) -> dict[str, torch.Tensor]:
    """The client's update from ``glob`` after one step per batch (DP-SGD when ``dp_sigma`` > 0)."""
    set_adapter_state(model, glob)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = sgd_or_adam(params, cfg, lr)
    for feats in batches:
        batch = collate(feats, pad_token_id=tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        if dp_sigma > 0:
            total = [torch.zeros_like(p) for p in params]
            for i in range(len(feats)):
                row = {k: v[i : i + 1] for k, v in batch.items()}
                g = torch.autograd.grad(per_sequence_loss(model, row).sum(), params)
                norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in g))
                f = min(1.0, CLIP / max(norm, 1e-12))
                for t, x in zip(total, g):
                    t.add_(x, alpha=f)
            gen = torch.Generator().manual_seed(1234)
            for p, t in zip(params, total):
                p.grad = (t + torch.randn(t.shape, generator=gen) * dp_sigma * CLIP) / len(feats)
        else:
            loss = per_sequence_loss(model, batch).sum() / len(feats)
            loss.backward()
        opt.step()
    model.eval()
    out = get_adapter_state(model)
    return {k: out[k] - glob[k] for k in out}


def warm_adapter(pm: Any, tok: Any, fresh: dict[str, torch.Tensor], pool: list[dict[str, Any]], rank: int):
    """The "later round" adapter (cached on disk: it is deterministic and slow on a busy CPU)."""
    from safetensors.torch import load_file, save_file

    from fedsecure.models import cache_dir

    name = f"warm-r{rank}-{WARM['optimizer']}-{WARM['lr']}-{WARM['steps']}.safetensors"
    path = cache_dir() / "bench-inversion" / name
    if path.exists():
        state = load_file(str(path))
        if set(state) == set(fresh):
            return {k: state[k] for k in fresh}
    warm_cfg = Config(rank, 4, 32, optimizer=WARM["optimizer"])
    feats = [encode(tok, ex, warm_cfg) for ex in pool[:16]]
    batches = [feats[(4 * i) % 16 : (4 * i) % 16 + 4] for i in range(WARM["steps"])]
    d = local_update(pm, tok, fresh, batches, warm_cfg, lr=WARM["lr"])
    warm = {k: (fresh[k] + d[k]).contiguous() for k in fresh}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(warm, str(path))
    return warm


def dp_sigma(defense: str, batch: int) -> float:
    from fedsecure.defenses.dp.accounting import calibrate_noise_multiplier

    eps = {"dp-eps8": 8.0, "dp-eps1": 1.0}[defense]
    q = batch / DP_PLAN["examples_per_client"]
    return calibrate_noise_multiplier(
        target_epsilon=eps, target_delta=DP_DELTA, sample_rate=q,
        steps=DP_PLAN["rounds"] * DP_PLAN["local_steps"], accountant="prv",
    )


def run_config(cfg: Config, base: Any, tok: Any, pool: list[dict[str, Any]], cache: dict[str, Any]) -> dict[str, Any]:
    t_setup = time.perf_counter()
    model = base[cfg.rank]
    fresh = cache[("fresh", cfg.rank)]
    glob = cache[("warm", cfg.rank)] if cfg.round == "later" else fresh
    if cfg.server == "malicious":
        glob = craft_adapter(glob, craft="quiet", seed=1)
    clients = 10 if cfg.defense == "secagg-10" else 1
    need = clients * cfg.batch * cfg.local_steps
    examples = pool[16 : 16 + need]  # the first 16 records warmed the adapter
    feats = [encode(tok, ex, cfg) for ex in examples]
    sigma = dp_sigma(cfg.defense, cfg.batch) if cfg.defense.startswith("dp") else 0.0
    deltas = []
    for c in range(clients):
        mine = feats[c * cfg.batch * cfg.local_steps : (c + 1) * cfg.batch * cfg.local_steps]
        batches = [mine[s * cfg.batch : (s + 1) * cfg.batch] for s in range(cfg.local_steps)]
        deltas.append(local_update(model, tok, glob, batches, cfg, dp_sigma=sigma))
    delta = {k: sum(d[k] for d in deltas) / clients for k in deltas[0]}
    setup_s = time.perf_counter() - t_setup
    lr = LR[cfg.optimizer]
    facts = TrainFacts(
        optimizer=cfg.optimizer, lr=lr, local_steps=cfg.local_steps, batch_size=cfg.batch, max_length=cfg.tokens
    )
    extra = lr * sigma * CLIP / cfg.batch * math.sqrt(cfg.local_steps) / clients if sigma else 0.0
    label_fn = None if cfg.format == "chat" else (lambda ids: list(ids))
    row: dict[str, Any] = {
        "model": MODEL, "rank": cfg.rank, "targets": list(TARGETS), "batch": cfg.batch, "tokens": cfg.tokens,
        "round": cfg.round, "server": cfg.server, "defense": cfg.defense, "optimizer": cfg.optimizer,
        "local_steps": cfg.local_steps, "format": cfg.format, "clients_in_update": clients,
        "dp_noise_multiplier": sigma or None, "update_seconds": round(setup_s, 2),
        "span_bound_tokens": 2 * cfg.rank + 1,
    }
    refs = [f["input_ids"] for f in feats]
    t0 = time.perf_counter()
    if cfg.baseline:
        seqs = optimisation_baseline(
            model, delta=delta, global_state=glob, length=cfg.tokens, batch=cfg.batch, steps=40, lr=0.1
        )
        seconds = time.perf_counter() - t0
        scored = score_reconstruction(tok, sequences=seqs, references=refs, reference_examples=examples)
        row.update(method="optimisation-baseline (40 Adam steps, cosine gradient matching)", in_regime=None,
                   certified=None, seconds=round(seconds, 2), **_metrics(scored))
        row["pairs"] = scored["pairs"][:2]
        return row
    rec = invert_update(
        model, tok, delta=delta, global_state=glob, facts=facts,
        settings=InversionSettings(max_tokens=cfg.tokens), label_fn=label_fn,
        expected_sequences=need, crafted=cfg.server == "malicious", extra_noise_std=extra,
    )
    seconds = time.perf_counter() - t0
    scored = score_reconstruction(
        tok, sequences=rec.sequences, references=refs, reference_examples=examples,
        recovered_token_set=rec.token_set.token_ids,
    )
    row.update(
        method=f"span/{rec.token_set.method}", route=rec.route, in_regime=rec.in_regime, certified=rec.certified,
        order_exact=rec.order_exact, token_rank=rec.token_set.rank, token_rows=rec.token_set.rows,
        reasons=rec.reasons, seconds=round(seconds, 2),
        seconds_by_stage={k: round(v, 2) for k, v in rec.seconds.items()}, **_metrics(scored),
    )
    row["pairs"] = scored["pairs"][:2]
    return row


def _metrics(scored: dict[str, Any]) -> dict[str, Any]:
    m = scored["metrics"]
    keys = ("tokenset_recall", "tokenset_precision", "token_recall", "token_precision", "rouge1", "rouge2",
            "rougeL", "exact_match", "pii_recovery", "pii_total")
    return {k: (round(float(m[k]), 4) if isinstance(m[k], float) and not math.isnan(m[k]) else m[k]) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "inversion.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", type=int, nargs="*", help="indices of configurations to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [configs[i] for i in args.only]
    _, tok = load_model(MODEL)
    pool = records(16 + max(10 * c.batch * c.local_steps for c in configs))
    base: dict[int, Any] = {}
    cache: dict[Any, Any] = {}
    for rank in sorted({c.rank for c in configs}):
        torch.manual_seed(0)
        m, _ = load_model(MODEL)
        pm = attach_lora(m, LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=TARGETS))
        base[rank] = pm
        fresh = get_adapter_state(pm)
        cache[("fresh", rank)] = fresh
        cache[("warm", rank)] = warm_adapter(pm, tok, fresh, pool, rank)
    rows = []
    for i, cfg in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {asdict(cfg)}", flush=True)
        row = run_config(cfg, base, tok, pool, cache)
        print(
            f"    token_recall(set)={row['tokenset_recall']} rougeL={row['rougeL']} pii={row['pii_recovery']} "
            f"in_regime={row.get('in_regime')} {row['seconds']} s",
            flush=True,
        )
        rows.append(row)
        _write(args.out, rows, args)
    _write(args.out, rows, args)


def _write(path: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out = {
        "benchmark": "inversion",
        "quick": bool(args.quick),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__},
        "settings": {"lr": LR, "warm": WARM, "dp_clip": CLIP, "dp_delta": DP_DELTA, "dp_plan": DP_PLAN,
                     "lora_alpha": "2 x rank", "dtype": "float32"},
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
