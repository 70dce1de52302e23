"""Markdown summaries and terminal tables of results: utility, privacy, attacks, cost side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsecure.experiment import Results


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers)] + [[_fmt(x) for x in r] for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(c, widths, strict=True)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline(results: Results) -> dict[str, Any]:
    """One row: the privacy-utility-cost figures of a run."""
    u, p, c = results.utility, results.privacy, results.cost
    best_auc = None
    for a in results.attacks:
        auc = a.get("metrics", {}).get("auc") if a.get("applicable") else None
        if isinstance(auc, float) and (best_auc is None or auc > best_auc):
            best_auc = auc
    return {
        "run": results.name,
        "transport": results.federation.get("transport"),
        "defenses": ",".join(results.federation.get("defenses", [])) or "none",
        "eval_loss": u.get("eval_loss"),
        "perplexity": u.get("eval_perplexity"),
        "eps_sample": p.get("epsilon_sample_level"),
        "eps_client": p.get("epsilon_client_level"),
        "best_attack_auc": best_auc,
        "wall_s": c.get("wall_s"),
        "up_bytes/client/round": c.get("bytes_up_per_client_per_round"),
    }


def attack_rows(results: Results) -> list[list[Any]]:
    rows = []
    for a in results.attacks:
        m = a.get("metrics", {})
        tpr = m.get("tpr_at_fpr", {}) if isinstance(m.get("tpr_at_fpr"), Mapping) else {}
        ci = m.get("auc_ci")
        rows.append(
            [
                a["name"],
                "yes" if a.get("applicable") else "no",
                m.get("auc"),
                f"[{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if isinstance(ci, list | tuple) and len(ci) == 2 else "-",
                tpr.get("0.01"),
                m.get("epsilon_lower_bound"),
                a.get("reason", "")[:80] if not a.get("applicable") else "",
            ]
        )
    return rows


RECONSTRUCTION_HEADERS = ["attack", "view", "ROUGE-1", "ROUGE-L", "token recall", "PII recovered", "exact",
                          "in regime", "why not"]


def reconstruction_rows(results: Results) -> list[list[Any]]:
    """Rows for attacks that reconstruct text (gradient inversion): what the server read back."""
    rows = []
    for a in results.attacks:
        m = a.get("metrics", {})
        if not a.get("applicable") or "rougeL" not in m:
            continue
        recs = (a.get("details") or {}).get("attacks") or []
        reasons = [r for rec in recs for r in rec.get("reasons", [])]
        rows.append([
            a["name"],
            m.get("view", "-"),
            m.get("rouge1"), m.get("rougeL"), m.get("token_recall"), m.get("pii_recovery"), m.get("exact_match"),
            "yes" if m.get("in_regime") else "no",
            reasons[0][:80] if reasons and not m.get("in_regime") else "",
        ])
    return rows


def render_summary(results: Results) -> str:
    u, c = results.utility, results.cost
    lines = [f"# fedsecure run: {results.name}", ""]
    lines.append(f"config hash `{results.config_hash}`; versions: "
                 + ", ".join(f"{k} {v}" for k, v in results.versions.items()))
    lines.append("")
    h = headline(results)
    lines.append(markdown_table(list(h), [list(h.values())]))
    lines += ["", "## Utility", ""]
    rows = [[i, loss] for i, loss in enumerate(u.get("eval_loss_by_round", []))]
    lines.append(f"Initial eval loss {_fmt(u.get('eval_loss_initial'))} "
                 f"(perplexity {_fmt(u.get('eval_perplexity_initial'))}).")
    lines.append("")
    lines.append(markdown_table(["round", "eval_loss"], rows))
    pd = results.privacy.get("defenses", {})
    if pd:
        lines += ["", "## Privacy", ""]
        for name, rep in pd.items():
            lines.append(f"- **{name}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rep.items()
                                                     if not isinstance(v, Mapping | list)))
            ledger = rep.get("per_client_epsilon") if isinstance(rep, Mapping) else None
            if isinstance(ledger, Mapping) and ledger:
                lines.append("  - per-client ε: " + ", ".join(f"{k}: {_fmt(v, 3)}" for k, v in ledger.items()))
    if results.attacks:
        lines += ["", "## Attacks", ""]
        lines.append(markdown_table(
            ["attack", "applicable", "AUC", "AUC 95% CI", "TPR@1%FPR", "ε lower bound", "reason"],
            attack_rows(results)))
        recon = reconstruction_rows(results)
        if recon:
            lines += ["", "Text reconstruction (gradient inversion; details in results.json):", ""]
            lines.append(markdown_table(RECONSTRUCTION_HEADERS, recon))
    lines += ["", "## Cost", ""]
    lines.append(markdown_table(
        ["wall s", "federation s", "mean round s", "overhead", "up B/client/round", "down B/client/round",
         "peak RSS MB"],
        [[c.get("wall_s"), c.get("federation_s"),
          (sum(c["round_s"]) / len(c["round_s"])) if c.get("round_s") else None,
          c.get("overhead_fraction"), c.get("bytes_up_per_client_per_round"),
          c.get("bytes_down_per_client_per_round"), c.get("peak_rss_mb")]]))
    rej = results.federation.get("rejected_updates", [])
    if rej:
        lines += ["", "## Rejected updates", ""]
        for r in rej:
            lines.append(f"- round {r['round']}, client {r['client_id']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def write_summary(results: Results, path: str | Path) -> None:
    Path(path).write_text(render_summary(results))


def grid_table(outs: Sequence[tuple[Mapping[str, Any], Results]]) -> tuple[list[str], list[list[Any]]]:
    keys = sorted({k for p, _ in outs for k in p})
    rows = []
    headers: list[str] = []
    for point, res in outs:
        h = headline(res)
        headers = keys + [k for k in h if k != "run"]
        rows.append([point.get(k) for k in keys] + [v for k, v in h.items() if k != "run"])
    return headers, rows


def write_grid_summary(outs: Sequence[tuple[Mapping[str, Any], Results]], path: str | Path) -> None:
    headers, rows = grid_table(outs)
    Path(path).write_text("# fedsecure grid\n\n" + markdown_table(headers, rows) + "\n")
