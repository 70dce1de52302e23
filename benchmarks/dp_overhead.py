"""DP-SGD overhead: DP step time / non-DP step time, and peak memory ratio, side by side.

For each model (``tiny``, ``smollm2-135m``) and LoRA placement (all linear layers; q/v only),
at sequence length 128 and batch 8:

- time: the same batch, one non-DP step (per-sequence loss, backward, optimizer step) and
  one DP step (:meth:`PrivateTraining.step`: per-sample gradients, clipping, noise,
  accounting, weight checks) on separate copies of the model, interleaved in rounds in one
  process; the figure is the median CPU time of the process per step (``time.process_time``,
  all threads: other jobs on a shared host do not inflate it), wall-clock medians beside it.
  Each per-sample-gradient mode (ew, hooks) and ``secure_mode`` are timed too; ``mode``
  is what ``grad_sample_mode="auto"`` chose, and why.
- memory: peak resident set size (Linux ``VmHWM``) of a fresh subprocess per variant, reset
  (``/proc/self/clear_refs`` = 5) after set-up so that the peak is the training steps'
  (3 steps); ``memory_ratio`` = DP peak RSS / non-DP peak RSS (whole process: what must
  fit in RAM), ``step_memory_ratio`` = the same for the increase above the post-set-up RSS.

Run: ``.venv/bin/python benchmarks/dp_overhead.py [--quick] [--threads N]`` (--quick: tiny only;
``--threads 1`` on a busy host: the CPU time of several OpenMP threads includes their spin-waits
while other jobs hold the cores, one thread's does not).
Writes ``benchmarks/results/dp_overhead.json`` (a list of rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsecure.defenses.dp import make_private  # noqa: E402
from fedsecure.models import LoraSettings, attach_lora, load_model  # noqa: E402
from fedsecure.models.loss import per_sequence_loss  # noqa: E402

SEQ, BATCH = 128, 8
TARGETS = {"all-linear": "all-linear", "q,v": ("q_proj", "v_proj")}
TIME_TARGET, MEMORY_TARGET = 1.15, 1.2
TIME_METHOD = (
    "median CPU time of this process (time.process_time, all threads) per step on a fixed batch, DP and "
    "non-DP interleaved in rounds in one process (separate copies of the model), after one warm-up step; "
    "CPU time because the host is shared with other jobs (wall-clock medians reported as wall_*)"
)
MEMORY_METHOD = (
    "peak RSS (VmHWM) of a fresh subprocess per variant during 3 steps, VmHWM reset after set-up; "
    "memory_ratio = peak_dp / peak_nodp, step_memory_ratio = (peak - post-setup RSS) ratio"
)


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100  # a prompt of 16 tokens, the rest supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i % BATCH] for k, v in self.batch.items()}


def _loader(batch: dict[str, torch.Tensor]) -> torch.utils.data.DataLoader:
    # 1000 examples, logical batch 8: only the sampling rate matters here, the timed batch is fixed
    return torch.utils.data.DataLoader(_Rows(batch, 1000), batch_size=BATCH)


def _model(name: str, targets: Any) -> tuple[torch.nn.Module, int]:
    base, tok = load_model(name, seed=0)
    peft = attach_lora(base, LoraSettings(rank=8, alpha=16, target_modules=targets))
    peft.train()
    return peft, len(tok)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _nodp_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    per_sequence_loss(model, batch).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _private(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, secure: bool) -> Any:
    return make_private(
        model=model,
        optimizer=torch.optim.AdamW(_trainable(model), lr=1e-4),
        data_loader=_loader(batch),
        noise_multiplier=1.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        grad_sample_mode=mode,
        secure_mode=secure,
        seed=None if secure else 0,
    )


def time_config(name: str, targets: Any, *, rounds: int, per_round: int) -> dict[str, Any]:
    model, vocab = _model(name, targets)
    batch = _batch(vocab)
    nodp_model = copy.deepcopy(model)
    nodp_opt = torch.optim.AdamW(_trainable(nodp_model), lr=1e-4)
    auto = _private(copy.deepcopy(model), batch, "auto", False)
    variants: dict[str, Any] = {"auto": auto}
    for mode in ("ew", "hooks"):
        if mode != auto.mode:
            variants[mode] = _private(copy.deepcopy(model), batch, mode, False)
    variants["secure"] = _private(copy.deepcopy(model), batch, auto.mode, True)
    cpu: dict[str, list[float]] = {"nodp": [], **{k: [] for k in variants}}
    wall: dict[str, list[float]] = {k: [] for k in cpu}

    def run(which: str) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        if which == "nodp":
            _nodp_step(nodp_model, nodp_opt, batch)
        else:
            variants[which].step(batch)
        cpu[which].append(time.process_time() - c0)
        wall[which].append(time.perf_counter() - w0)

    for which in cpu:  # warm-up, discarded
        run(which)
        cpu[which].clear()
        wall[which].clear()
    for r in range(rounds):
        order = list(cpu) if r % 2 == 0 else list(reversed(cpu))
        for which in order:
            for _ in range(per_round):
                run(which)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    medw = {k: statistics.median(v) for k, v in wall.items()}
    for v in variants.values():
        v.close()
    modes = {}
    for key in variants:
        if key == "secure":
            continue
        mode = auto.mode if key == "auto" else key
        modes[mode] = {
            "step_s": med[key],
            "time_ratio": med[key] / med["nodp"],
            "wall_time_ratio": medw[key] / medw["nodp"],
        }
    return {
        "mode": auto.mode,
        "mode_reason": auto.mode_reason,
        "mode_timings_cpu_s": auto.mode_timings,
        "step_s": med["auto"],
        "nodp_step_s": med["nodp"],
        "time_ratio": med["auto"] / med["nodp"],
        "wall_step_s": medw["auto"],
        "wall_nodp_step_s": medw["nodp"],
        "wall_time_ratio": medw["auto"] / medw["nodp"],
        "secure_mode_step_s": med["secure"],
        "secure_mode_time_ratio": med["secure"] / med["nodp"],
        "modes": modes,
        "trainable_parameters": sum(p.numel() for p in _trainable(model)),
        "timed_steps_per_variant": rounds * per_round,
        "cpu_step_s_range": {k: [min(v), max(v)] for k, v in cpu.items()},
    }


# ---------------------------------------------------------------------------------------
# memory: one fresh subprocess per variant
# ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, targets_key: str, which: str) -> dict[str, Any]:
    model, vocab = _model(name, TARGETS[targets_key])
    batch = _batch(vocab)
    if which == "nodp":
        opt = torch.optim.AdamW(_trainable(model), lr=1e-4)

        def step() -> None:
            _nodp_step(model, opt, batch)
    else:
        priv = _private(model, batch, "auto", False)

        def step() -> None:
            priv.step(batch)

    setup_peak = _status_kb("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS high-water mark to the current RSS
    base = _status_kb("VmRSS")
    for _ in range(3):
        step()
    peak = _status_kb("VmHWM")
    return {"base_rss_kb": base, "peak_rss_kb": peak, "setup_peak_rss_kb": setup_peak}


def memory_config(name: str, targets_key: str) -> dict[str, Any]:
    out = {}
    for which in ("nodp", "dp"):
        cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--child", name, targets_key, which]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"memory child failed: {res.stderr[-2000:]}")
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    d, n = out["dp"], out["nodp"]
    return {
        "memory_ratio": d["peak_rss_kb"] / n["peak_rss_kb"],
        "step_memory_ratio": (d["peak_rss_kb"] - d["base_rss_kb"]) / max(1, n["peak_rss_kb"] - n["base_rss_kb"]),
        "peak_rss_mb": d["peak_rss_kb"] / 1024,
        "nodp_peak_rss_mb": n["peak_rss_kb"] / 1024,
        "post_setup_rss_mb": d["base_rss_kb"] / 1024,
        "nodp_post_setup_rss_mb": n["base_rss_kb"] / 1024,
        "setup_peak_rss_mb": d["setup_peak_rss_kb"] / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--per-round", type=int, default=2, help="steps per variant per round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp_overhead.json"))
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch intra-op threads (0: torch's default). 1 makes CPU time immune to OpenMP spin-waits "
        "when other jobs share the cores",
    )
    p.add_argument("--child", nargs=3, metavar=("MODEL", "TARGETS", "WHICH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(*args.child)))
        return 0
    models = ["tiny"] if args.quick else ["tiny", "smollm2-135m"]
    rows = []
    for name in models:
        for key, targets in TARGETS.items():
            t0 = time.perf_counter()
            row: dict[str, Any] = {"model": name, "targets": key, "seq_len": SEQ, "batch_size": BATCH}
            row.update(time_config(name, targets, rounds=args.rounds, per_round=args.per_round))
            row.update(memory_config(name, key))
            row["meets_time_target"] = row["time_ratio"] <= TIME_TARGET
            row["meets_memory_target"] = row["memory_ratio"] <= MEMORY_TARGET
            row["time_method"] = TIME_METHOD
            row["memory_method"] = MEMORY_METHOD
            row["load_average"] = os.getloadavg()
            row["torch_threads"] = torch.get_num_threads()
            row["host"] = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"
            row["bench_s"] = time.perf_counter() - t0
            rows.append(row)
            print(
                f"{name:13s} {key:10s} mode={row['mode']:5s} dp {row['step_s']:.3f}s / nodp "
                f"{row['nodp_step_s']:.3f}s = {row['time_ratio']:.3f}x (wall {row['wall_time_ratio']:.3f}x)  "
                f"memory {row['memory_ratio']:.3f}x "
                f"(step {row['step_memory_ratio']:.2f}x)  secure {row['secure_mode_time_ratio']:.3f}x",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
