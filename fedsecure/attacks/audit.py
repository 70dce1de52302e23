"""Audit a trained LoRA adapter for membership leakage: ``fedsecure audit``.

Works on any PEFT LoRA adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), trained in fedsecure or anywhere else, on top of a base
model that fedsecure can load (a catalog name, a local directory or an offline HF id).
Given records the adapter was trained on (members) and records from the same
distribution it never saw (non-members), it runs the released-model membership attacks of
:mod:`fedsecure.attacks.membership` (and, with canaries, :mod:`fedsecure.attacks.canaries`)
and writes ``audit.json``, ``roc.png`` (log-log ROC), ``report.md`` and ``report.html``.

Threat model: the auditor has the adapter, the base model and labelled candidate records;
the attacks model an adversary with the released adapter (see each attack's threat model).
Adapters are read only from safetensors (never unpickled), and the adapter is checked
against the base model before use: the modules it targets must exist in the base and every
tensor must fit the module's shape, otherwise :class:`AdapterMismatchError` says which
module differs and why.

The blind baseline (a text-only classifier, Das et al. 2024) is reported beside each
attack: an attack AUC close to it means the member/non-member sets differ in distribution,
not that the adapter leaks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import inspect
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsecure.attacks.base import AttackResult, AttackTarget
from fedsecure.data.base import Canary, DataError, Example
from fedsecure.data.tokenize import DEFAULT_SYSTEM
from fedsecure.registry import ATTACKS

__all__ = [
    "DEFAULT_AUDIT_ATTACKS",
    "AdapterMismatchError",
    "audit_main",
    "check_adapter_compatibility",
    "load_adapter_for_audit",
    "read_canaries",
    "read_examples",
    "run_audit",
]

DEFAULT_AUDIT_ATTACKS: tuple[str, ...] = ("loss", "zlib", "min-k", "min-k++", "reference-base")
"""Attacks run by default; ``rmia`` is added with population data and ``canary-exposure`` with canaries."""


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model (different architecture or size)."""


# --------------------------------------------------------------------------- input files


def read_examples(path: str | Path, *, what: str = "examples") -> list[Example]:
    """Records from a JSONL / JSON / CSV / Parquet file (or a ``save_to_disk`` directory).

    Each row needs ``prompt`` and ``response`` text fields, or a single ``text`` field (then
    the whole text is the response, with an empty prompt).

    Raises
    ------
    DataError
        For a missing file, an unreadable format or rows without the needed fields.
    """
    from fedsecure.data.local import read_rows

    rows, columns = read_rows(path)
    if not rows:
        raise DataError(f"{what}: {path} holds no rows")
    has_pair = "prompt" in columns and "response" in columns
    if not has_pair and "text" not in columns:
        raise DataError(
            f"{what}: {path} needs 'prompt' and 'response' columns, or a 'text' column; found {', '.join(columns)}"
        )
    out: list[Example] = []
    for i, row in enumerate(rows):
        if has_pair:
            prompt, response = row.get("prompt"), row.get("response")
        else:
            prompt, response = "", row.get("text")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise DataError(
                f"{what}: {path} row {i} needs a non-empty text "
                f"{'response' if has_pair else 'text'} (and a text prompt); got {type(response).__name__}"
            )
        out.append({"prompt": prompt, "response": response, "id": str(row.get("id") or f"{what}-{i}")})
    return out


def read_canaries(path: str | Path) -> list[Canary]:
    """Canaries from a JSONL / JSON / CSV file.

    Fields: ``prompt``, ``prefix``, ``secret``, ``alphabet``, ``repetitions`` (how many times
    the canary was in the training data; 0 for a reference canary that never was), and
    optionally ``canary_id``, ``length`` (default: the secret's length) and ``client_id``.
    """
    from fedsecure.data.local import read_rows

    rows, columns = read_rows(path)
    needed = ("prompt", "prefix", "secret", "alphabet", "repetitions")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"canaries: {path} misses columns {missing}; each canary needs {', '.join(needed)}")
    out = []
    for i, row in enumerate(rows):
        reps = int(row["repetitions"])
        secret = str(row["secret"])
        client = row.get("client_id")
        out.append(
            Canary(
                canary_id=str(row.get("canary_id") or f"canary-{i}"),
                prompt=str(row["prompt"]),
                prefix=str(row["prefix"]),
                secret=secret,
                alphabet=str(row["alphabet"]),
                length=int(row.get("length") or len(secret)),
                repetitions=reps,
                client_id=int(client) if client is not None and reps > 0 else (-1 if reps == 0 else 0),
            )
        )
    return out


# --------------------------------------------------------------------------- adapter loading

_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear-like module, (num_embeddings, dim) of an Embedding, else None."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style (weight is [in, out])
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def check_adapter_compatibility(
    base: torch.nn.Module,
    adapter_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    base_name: str = "",
) -> None:
    """Raise :class:`AdapterMismatchError` unless the adapter fits ``base``.

    Checks that the adapter is LoRA, that every listed ``target_modules`` entry names a
    module of the base, and that every LoRA tensor matches its base module's shape
    (``lora_A``: ``[r, in_features]``, ``lora_B``: ``[out_features, r]``; embeddings
    ``[r, num_embeddings]`` / ``[embedding_dim, r]``); other tensors (``modules_to_save``)
    must match the base parameter of the same name.
    """
    trained_on = adapter_config.get("base_model_name_or_path") or "an unknown base model"
    where = f"base model {base_name!r}" if base_name else "the base model"
    peft_type = str(adapter_config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterMismatchError(f"adapter is of type {peft_type}; fedsecure audit supports LoRA adapters only")
    modules = dict(base.named_modules())
    target = adapter_config.get("target_modules")
    if isinstance(target, list | tuple):  # a string is a regex or "all-linear": checked per tensor below
        missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in modules if n)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _linear_dims(m) is not None})
            raise AdapterMismatchError(
                f"adapter targets modules {missing} that {where} does not have (the adapter was trained on "
                f"{trained_on!r}); the base's Linear/Embedding modules are {linear[:20]}. Use the base model the "
                "adapter was trained on"
            )
    base_params = dict(base.named_parameters())
    for key, tensor in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = _LORA_PART.match(name)
        if match is None:  # a full tensor (modules_to_save, saved embedding layers)
            ref = base_params.get(name.replace(".base_layer.", "."))
            if ref is None:
                ref = base_params.get(name)
            if ref is None:
                raise AdapterMismatchError(
                    f"adapter tensor {key!r} has no counterpart in {where} (trained on {trained_on!r})"
                )
            if tuple(ref.shape) != tuple(tensor.shape):
                raise AdapterMismatchError(
                    f"adapter tensor {key!r} has shape {tuple(tensor.shape)} but {where} has {tuple(ref.shape)} "
                    f"(adapter trained on {trained_on!r})"
                )
            continue
        module_name, kind = match["module"], match["kind"]
        module = modules.get(module_name)
        if module is None:
            raise AdapterMismatchError(
                f"adapter tensor {key!r} adapts module {module_name!r}, which {where} does not have; the adapter "
                f"was trained on {trained_on!r} (a different architecture or depth)"
            )
        dims = _linear_dims(module)
        if dims is None:
            raise AdapterMismatchError(
                f"adapter tensor {key!r} adapts {module_name!r}, a {type(module).__name__} in {where}; LoRA "
                "expects a Linear or Embedding module there"
            )
        if tensor.ndim != 2:
            raise AdapterMismatchError(f"adapter tensor {key!r} has {tensor.ndim} dimensions, expected 2")
        d_in, d_out = dims
        if kind in ("lora_A", "lora_embedding_A"):
            expected, got, label = d_in, int(tensor.shape[1]), "input size"
        else:
            expected, got, label = d_out, int(tensor.shape[0]), "output size"
        if got != expected:
            raise AdapterMismatchError(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)}: it expects {label} {got} for "
                f"{module_name!r}, but {where} has {expected}. The adapter was trained on {trained_on!r}, a model of "
                "a different size (e.g. hidden size); use that base model"
            )


def load_adapter_for_audit(base: str, adapter_dir: str | Path, *, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``base`` and the LoRA adapter in ``adapter_dir`` (safetensors only), checked.

    Returns
    -------
    (peft_model, tokenizer, adapter_config)
        The peft model has the adapter loaded as ``default`` and is in eval mode.

    Raises
    ------
    FileNotFoundError
        If the adapter directory or its files are missing.
    ValueError
        If the weights are not safetensors (refused, never unpickled).
    AdapterMismatchError
        If the adapter does not fit the base model.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from fedsecure.models import load_adapter_config, load_adapter_file, load_model

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"--adapter {str(adapter_dir)!r} is not a directory (expected a PEFT adapter folder)")
    config = load_adapter_config(adapter_dir)
    tensors = load_adapter_file(adapter_dir)
    model, tokenizer = load_model(base, seed=seed)
    check_adapter_compatibility(model, config, tensors, base_name=base)
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "inference_mode")}
    kwargs["base_model_name_or_path"] = config.get("base_model_name_or_path")
    try:
        lora_config = LoraConfig(**kwargs)
        peft_model = get_peft_model(model, lora_config)
    except (ValueError, TypeError) as err:
        raise AdapterMismatchError(
            f"peft could not apply the adapter config of {adapter_dir} to {base!r}: {err}"
        ) from err
    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter tensors in {adapter_dir} do not match its config on {base!r}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise AdapterMismatchError(
                f"adapter tensor {k!r} has shape {tuple(tensors[k].shape)}, the model expects {tuple(v.shape)}"
            )
    result = set_peft_model_state_dict(peft_model, dict(tensors))
    if getattr(result, "unexpected_keys", None):
        raise AdapterMismatchError(f"peft did not accept adapter tensors {result.unexpected_keys[:3]}")
    peft_model.eval()
    return peft_model, tokenizer, config


# --------------------------------------------------------------------------- audit


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        m = r.get("metrics", {})
        if not r.get("applicable", False):
            rows.append([r["name"], "no", "", "", "", "", "", r.get("reason", "")])
            continue
        ci = m.get("auc_ci") or [None, None]
        tpr = m.get("tpr_at_fpr", {})
        eps = ""
        if "epsilon_lower_bound" in m:
            eps = f"ε ≥ {_fmt(m['epsilon_lower_bound'], 2)} (claimed {_fmt(m.get('epsilon'), 2)})"
        rows.append(
            [
                r["name"],
                "yes",
                f"{_fmt(m.get('auc'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]",
                _fmt(tpr.get("0.01")),
                _fmt(tpr.get("0.001")),
                _fmt(tpr.get("0.0")),
                _fmt(m.get("blind_baseline_auc")),
                eps,
            ]
        )
    return rows


_HEADER = ["attack", "applicable", "AUC [95% CI]", "TPR@1%FPR", "TPR@0.1%FPR", "TPR@0FPR", "blind AUC", "note"]


def _canary_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    for r in results:
        if r["name"] == "canary-exposure" and r.get("applicable"):
            return [
                [
                    c["canary_id"],
                    str(c["repetitions"]),
                    str(c["rank"]),
                    f"{_fmt(c['exposure_rank'], 2)} / {_fmt(c['exposure_rank_max'], 2)}",
                    _fmt(c["exposure_skew_normal"], 2),
                ]
                for c in r.get("details", {}).get("canaries", [])
            ]
    return []


_CANARY_HEADER = ["canary", "repetitions", "rank", "rank exposure (bits) / max", "skew-normal exposure (bits)"]


def _markdown(audit: Mapping[str, Any]) -> str:
    lines = [
        "# fedsecure membership audit",
        "",
        f"- base model: `{audit['base']}`",
        f"- adapter: `{audit['adapter']}` (trained on `{audit['adapter_config'].get('base_model_name_or_path')}`, "
        f"r={audit['adapter_config'].get('r')}, target modules {audit['adapter_config'].get('target_modules')})",
        f"- members: {audit['num_members']}, non-members: {audit['num_nonmembers']}, "
        f"population: {audit['num_population']}, canaries: {audit['num_canaries']}",
        f"- created: {audit['created']}",
        "",
        "Scores: higher = more likely member. AUC with a 95% bootstrap interval; TPR at a fixed FPR uses the "
        "non-strict bound (largest TPR with FPR <= the level). The blind baseline is a text-only classifier on "
        "the same records: an attack near it shows a distribution shift between the sets, not leakage.",
        "",
        "## Membership inference",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(audit["attacks"])]
    canary = _canary_rows(audit["attacks"])
    if canary:
        lines += ["", "## Canary exposure (Secret Sharer)", ""]
        lines += ["| " + " | ".join(_CANARY_HEADER) + " |", "|" + "---|" * len(_CANARY_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in canary]
        lines += ["", "High exposure of an inserted canary means the adapter memorised it; reference canaries "
                  "(repetitions 0) were never trained on and show the baseline."]
    if audit.get("roc_png"):
        lines += ["", "## ROC (log-log)", "", f"![ROC]({audit['roc_png']})"]
    lines += ["", "## Threat models", ""]
    lines += [f"- **{r['name']}**: {r['threat_model']}" for r in audit["attacks"]]
    return "\n".join(lines) + "\n"


def _html(audit: Mapping[str, Any]) -> str:
    e = html.escape

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    cfg = audit["adapter_config"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedsecure membership audit</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
        "<h1>fedsecure membership audit</h1><ul>",
        f"<li>base model: <code>{e(str(audit['base']))}</code></li>",
        f"<li>adapter: <code>{e(str(audit['adapter']))}</code> (trained on "
        f"<code>{e(str(cfg.get('base_model_name_or_path')))}</code>, r={e(str(cfg.get('r')))}, "
        f"target modules {e(str(cfg.get('target_modules')))})</li>",
        f"<li>members: {audit['num_members']}, non-members: {audit['num_nonmembers']}, population: "
        f"{audit['num_population']}, canaries: {audit['num_canaries']}</li>",
        f"<li>created: {e(audit['created'])}</li></ul>",
        "<p>Scores: higher = more likely member. The blind baseline is a text-only classifier on the same "
        "records: an attack near it shows a distribution shift between the sets, not leakage.</p>",
        "<h2>Membership inference</h2>",
        table(_HEADER, _rows(audit["attacks"])),
    ]
    canary = _canary_rows(audit["attacks"])
    if canary:
        parts += ["<h2>Canary exposure (Secret Sharer)</h2>", table(_CANARY_HEADER, canary)]
    if audit.get("roc_png"):
        parts += ["<h2>ROC (log-log)</h2>", f"<img src='{e(audit['roc_png'])}' alt='ROC curves'>"]
    parts += ["<h2>Threat models</h2><ul>"]
    parts += [f"<li><b>{e(r['name'])}</b>: {e(r['threat_model'])}</li>" for r in audit["attacks"]]
    parts += ["</ul></body></html>"]
    return "\n".join(parts) + "\n"


def _check_disjoint(members: Sequence[Example], nonmembers: Sequence[Example]) -> None:
    keys = {(m["prompt"], m["response"]) for m in members}
    both = [n for n in nonmembers if (n["prompt"], n["response"]) in keys]
    if both:
        raise DataError(
            f"{len(both)} record(s) appear both in members and non-members (e.g. id {both[0].get('id')!r}); a record "
            "cannot be both: remove the duplicates"
        )


def run_audit(
    *,
    base: str,
    adapter_dir: str | Path,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    canaries: Sequence[Canary] | None = None,
    population: Sequence[Example] | None = None,
    out_dir: str | Path,
    attacks: Sequence[str] | None = None,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    max_length: int = 128,
    system_prompt: str | None = DEFAULT_SYSTEM,
    claimed_epsilon: float | None = None,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict[str, Any]:
    """Run membership attacks on a trained adapter and write the audit report.

    Parameters
    ----------
    base:
        Base model: catalog name, local directory or offline HF id.
    adapter_dir:
        PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    members, nonmembers:
        Records (``prompt``/``response``) the adapter was / was not trained on, same distribution.
    canaries:
        Optional inserted canaries (with their repetition counts) for the exposure attack.
    population:
        Optional extra records of the same distribution, disjoint from both sets, to train
        reference adapters (enables ``rmia``).
    out_dir:
        Output directory for ``audit.json``, ``roc.png``, ``report.md``, ``report.html``.
    attacks:
        Attack names (see ``fedsecure attacks``); default :data:`DEFAULT_AUDIT_ATTACKS`, plus
        ``rmia`` with population data and ``canary-exposure`` with canaries.
    attack_options:
        Per-attack constructor keyword arguments, e.g. ``{"rmia": {"reference_steps": 200}}``.
    max_length:
        Token truncation length (use the training length).
    system_prompt:
        System prompt used in training (``None``: none).
    claimed_epsilon, delta:
        The DP guarantee claimed for the adapter, if any: each result then reports the
        empirical lower bound on epsilon beside it.
    seed:
        Seed of bootstrap intervals, candidate draws and reference training.

    Returns
    -------
    dict
        The ``audit.json`` content.
    """
    from fedsecure.metrics import plot_roc_loglog, roc_curve

    if not members or not nonmembers:
        raise DataError(f"members and non-members must be non-empty (got {len(members)} and {len(nonmembers)})")
    _check_disjoint(members, nonmembers)
    names = list(attacks) if attacks else list(DEFAULT_AUDIT_ATTACKS)
    if attacks is None:
        if population:
            names.append("rmia")
        if canaries:
            names.append("canary-exposure")
    for n in names:
        ATTACKS.get(n)  # unknown names fail before the model loads
    options = {k: dict(v) for k, v in (attack_options or {}).items()}
    unknown_opts = sorted(set(options) - set(names))
    if unknown_opts:
        raise ValueError(f"attack_options for {unknown_opts}, which are not among the attacks run ({names})")

    model, tokenizer, adapter_config = load_adapter_for_audit(base, adapter_dir, seed=seed)
    extra: dict[str, Any] = {"delta": float(delta), "system_prompt": system_prompt}
    target = AttackTarget(
        model=model,
        tokenizer=tokenizer,
        members=list(members),
        nonmembers=list(nonmembers),
        canaries=list(canaries or ()),
        population=list(population or ()),
        model_spec=base,
        max_length=int(max_length),
        seed=seed,
        claimed_epsilon=claimed_epsilon,
        extra=extra,
    )
    results: list[AttackResult] = []
    for n in names:
        cls = ATTACKS.get(n)
        kwargs = dict(options.get(n, {}))
        if "seed" in inspect.signature(cls).parameters:
            kwargs.setdefault("seed", seed)
        attack = cls(**kwargs)
        if getattr(attack, "when", "final") != "final":
            results.append(
                AttackResult.not_applicable(
                    attack, "observes federated rounds (server view); an audit has only the released adapter"
                )
            )
            continue
        results.append(attack.run(target))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for r in results:
        d = r.details
        if r.applicable and "scores_members" in d and "scores_nonmembers" in d:
            fpr, tpr, _ = roc_curve(scores_members=d["scores_members"], scores_nonmembers=d["scores_nonmembers"])
            curves[r.name] = (fpr, tpr)
    roc_name = None
    if curves:
        plot_roc_loglog(curves, out / "roc.png", title="Membership inference (log-log ROC)")
        roc_name = "roc.png"
    audit = {
        "base": base,
        "adapter": str(adapter_dir),
        "adapter_config": {
            k: adapter_config.get(k)
            for k in ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "peft_type")
        },
        "num_members": len(members),
        "num_nonmembers": len(nonmembers),
        "num_population": len(population or ()),
        "num_canaries": len(canaries or ()),
        "max_length": int(max_length),
        "seed": seed,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "attacks": [r.to_dict() for r in results],
        "roc_png": roc_name,
    }
    if isinstance(audit["adapter_config"]["target_modules"], set):
        audit["adapter_config"]["target_modules"] = sorted(audit["adapter_config"]["target_modules"])
    (out / "audit.json").write_text(json.dumps(audit, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(_markdown(audit))
    (out / "report.html").write_text(_html(audit))
    return audit


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("fedsecure", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsecure audit",
        description="Membership-inference audit of a trained LoRA adapter (any PEFT adapter, safetensors).",
    )
    p.add_argument("--base", required=True, help="base model: catalog name (tiny, smollm2-135m), directory or HF id")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--members", required=True, help="records the adapter was trained on (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--nonmembers", required=True, help="records of the same distribution it never saw")
    p.add_argument("--canaries", help="inserted canaries (JSONL/CSV: prompt, prefix, secret, alphabet, repetitions)")
    p.add_argument("--population", help="extra same-distribution records for reference adapters (enables rmia)")
    p.add_argument("--out", default="audit-report", help="output directory (default: ./audit-report)")
    p.add_argument("--attacks", help=f"comma-separated attack names (default: {','.join(DEFAULT_AUDIT_ATTACKS)})")
    p.add_argument("--max-length", type=int, default=128, help="token truncation length used in training")
    p.add_argument(
        "--system-prompt",
        default=DEFAULT_SYSTEM,
        help="system prompt used in training; 'none' for no system message",
    )
    p.add_argument("--epsilon", type=float, help="the DP epsilon claimed for the adapter, to compare with")
    p.add_argument("--delta", type=float, default=1e-5, help="the DP delta of that claim (default 1e-5)")
    p.add_argument("--num-candidates", type=int, help="canary candidates per canary (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    return p


def audit_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedsecure audit``; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        members = read_examples(args.members, what="members")
        nonmembers = read_examples(args.nonmembers, what="nonmembers")
        canaries = read_canaries(args.canaries) if args.canaries else None
        population = read_examples(args.population, what="population") if args.population else None
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
        options: dict[str, dict[str, Any]] = {}
        runs_canaries = "canary-exposure" in attacks if attacks is not None else bool(canaries)
        if args.num_candidates is not None and runs_canaries:
            options["canary-exposure"] = {"num_candidates": args.num_candidates}
        audit = run_audit(
            base=args.base,
            adapter_dir=args.adapter,
            members=members,
            nonmembers=nonmembers,
            canaries=canaries,
            population=population,
            out_dir=args.out,
            attacks=attacks,
            attack_options=options,
            max_length=args.max_length,
            system_prompt=None if args.system_prompt.lower() == "none" else args.system_prompt,
            claimed_epsilon=args.epsilon,
            delta=args.delta,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"fedsecure audit: error: {err}", file=sys.stderr)
        return 2
    for row in _rows(audit["attacks"]):
        print(f"{row[0]:>16}  AUC {row[2] or '-':<24} TPR@1%FPR {row[3] or '-':<6} blind {row[6] or '-':<6} {row[7]}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(audit_main())
