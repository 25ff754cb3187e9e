"""eval.md and PNG plots from an evaluation (eval.json content + raw scores). matplotlib Agg only.

Tables: one per score, rows = OOD set x (clean / each attack / each certified radius), columns = metrics
in percent; plus the in-distribution accuracy, clean and under each attack. Plots per score: ROC curves
(clean solid, attacked dashed) and in-vs-out score histograms (one panel per OOD set x attack).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .ood_metrics import roc_curve

log = logging.getLogger(__name__)

EVAL_MD = "eval.md"
_COLUMNS = (
    ("fpr_at_95_tpr", "FPR95 ↓"),
    ("auroc", "AUROC ↑"),
    ("aupr_in", "AUPR-in ↑"),
    ("aupr_out", "AUPR-out ↑"),
    ("detection_error", "Det. err ↓"),
)


def _pct(v: float) -> str:
    return f"{100.0 * v:.2f}"


def _attack_label(name: str) -> str:
    return "clean" if name == "none" else name


def certified_label(eps: float) -> str:
    return f"certified (IBP), ε = {eps * 255:.4g}/255"


def render_markdown(report: dict[str, Any], plots: list[str] | None = None) -> str:
    ind = report["in_distribution"]
    model = report.get("model", {})
    lines = [
        f"# OOD evaluation of `{report['run_dir']}`",
        "",
        f"- Model: `{model.get('name', '?')}`, training method: `{report.get('method') or '?'}`",
        f"- In-distribution: {ind.get('spec')} test split, {ind.get('n')} images (positives)",
        "- OOD sets: " + ", ".join(f"{k} ({v.get('n')} images)" for k, v in report["ood_sets"].items()),
        f"- Created {report['created_at']}, code `{report.get('code_version') or 'unknown'}`",
        "",
        f"**Convention.** {report['convention']} All metrics in percent.",
        "",
        "**Attacks** (L∞ PGD, model in eval mode, both sides: inliers pushed to look OOD, OOD inputs "
        "pushed to look in-distribution; rows `<attack> (OOD only)` keep the inliers clean, the ALOE and ATOM "
        "papers' protocol):",
        "",
    ]
    for name, params in report["attacks"].items():
        if params:
            worst = (f"; worst case per image over {', '.join(params['objectives'])} x {params['restarts']} restart(s), "
                     "best iterate, 8-bit grid" if params.get("objectives") else "; the score only, last iterate")
            lines.append(f"- `{name}`: ε = {params['eps'] * 255:.3g}/255, {params['steps']} steps of "
                         f"{params['step_size'] * 255:.3g}/255, random start {'on' if params['random_start'] else 'off'}"
                         + worst)
    lines.append("- Per score: " + "; ".join(f"{k}: {v}" for k, v in report["attack_notes"].items()))
    certified = report.get("certified") or {}
    if certified:
        lines += ["", f"**Certified** rows (`--certify`, {certified['method']}): clean in-distribution scores vs a "
                  "sound upper bound of each OOD image's score over its whole ε-ball (∩ [0, 1]), so no attack within "
                  "ε does better; ties count against the detector. Scores: " + ", ".join(certified["scores"]) + "."]
    scores = list(report["results"])
    attacks = list(report["attacks"])

    lines += ["", "## In-distribution test accuracy", "",
              "Attacked rows: accuracy on the inliers attacked against each score.", "",
              "| | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    acc = report["accuracy"]
    lines.append("| clean | " + " | ".join(_pct(acc["clean"]) for _ in scores) + " |")
    for a in attacks:
        if a != "none":
            lines.append(f"| {a} | " + " | ".join(_pct(acc[a][s]) for s in scores) + " |")

    for score in scores:
        params = report.get("score_params", {}).get(score, {})
        suffix = f" ({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else ""
        lines += ["", f"## Score `{score}`{suffix}", "",
                  "| OOD set | attack | " + " | ".join(c for _, c in _COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(_COLUMNS)]
        for set_name, per_attack in report["results"][score].items():
            for a in attacks:
                for key, label in ((a, _attack_label(a)), (f"{a}_ood_only", f"{a} (OOD only)")):
                    m = per_attack.get(key)
                    if m:
                        lines.append(f"| {set_name} | {label} (n = {m['n_in']} + {m['n_out']}) | "
                                     + " | ".join(_pct(m[k]) for k, _ in _COLUMNS) + " |")
            for key, eps in certified.get("rows", {}).items():
                m = per_attack.get(key)
                if m:
                    lines.append(f"| {set_name} | {certified_label(eps)} (n = {m['n_in']} + {m['n_out']}) | "
                                 + " | ".join(_pct(m[k]) for k, _ in _COLUMNS) + " |")
    shifts = report.get("shifts") or {}
    if shifts.get("forms"):
        lines += ["", "## Upload forms (shifts, not attacks)", "",
                  f"Each image uploaded in the form named, decoded and resized as the service does. Threshold: "
                  f"`tpr95` calibrated on the calibration split ({shifts['calibration_images']} images): one "
                  f"threshold from a mix of {', '.join(shifts['calibration_forms'])} (`--no-form-calibration`), and, "
                  "where measured, one per upload-form group (the default bundle: each form at its group's "
                  "threshold). Real OOD sets only.", ""]
        if shifts.get("note"):  # e.g. a section recomputed after the rest of the evaluation
            lines += [f"Note: {shifts['note']}", ""]
        for score, thr in shifts["thresholds"].items():
            sets = list(next(iter(shifts["forms"].values()))["scores"][score]["sets"])
            per_group = all("form_conditional" in row["scores"][score] for row in shifts["forms"].values())
            group_cols = ("group | TPR, per group | " + " | ".join(f"FPR {k}, per group" for k in sets) + " | ") if per_group else ""
            lines += [f"### `{score}` (one threshold: {thr:.6g})", "",
                      "| form | accuracy | realised TPR, one threshold | "
                      + " | ".join(f"FPR {k} | AUROC {k}" for k in sets) + " | " + group_cols,
                      "|---|---:|---:|" + "---:|---:|" * len(sets) + ("---|---:|" + "---:|" * len(sets) if per_group else "")]
            for form, row in shifts["forms"].items():
                r = row["scores"][score]
                cells = (f"| {form} | {_pct(row['accuracy'])} | {_pct(r['realised_tpr'])} | "
                         + " | ".join(f"{_pct(r['sets'][k]['fpr'])} | {_pct(r['sets'][k]['auroc'])}" for k in sets) + " |")
                if per_group:
                    fc = r["form_conditional"]
                    cells += (f" {row['group']} | {_pct(fc['realised_tpr'])} | "
                              + " | ".join(_pct(fc["fpr"][k]) for k in sets) + " |")
                lines.append(cells)
            lines.append("")
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_score(out_dir: Path, score: str, report: dict[str, Any], raw: dict[str, np.ndarray]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(report["attacks"])
    sets = list(report["results"][score])
    written = []

    fig, ax = plt.subplots(figsize=(5.5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, set_name in enumerate(sets):
        for a in attacks:
            s_in, s_out = raw.get(f"{score}__in__{a}"), raw.get(f"{score}__{set_name}__{a}")
            if s_in is None or s_out is None:
                continue
            roc = roc_curve(s_in, s_out)
            auroc = report["results"][score][set_name][a]["auroc"]
            ax.plot(roc.fpr, roc.tpr, color=colours[i % len(colours)], linestyle="-" if a == "none" else "--",
                    label=f"{set_name} {_attack_label(a)} (AUROC {100 * auroc:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (in-distribution accepted)", title=f"ROC — {score}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    name = f"roc_{score}.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    written.append(name)

    fig, axes = plt.subplots(len(attacks), len(sets), figsize=(3.2 * len(sets), 2.6 * len(attacks)), squeeze=False)
    for r, a in enumerate(attacks):
        for c, set_name in enumerate(sets):
            ax = axes[r][c]
            s_in, s_out = raw.get(f"{score}__in__{a}"), raw.get(f"{score}__{set_name}__{a}")
            if s_in is None or s_out is None:
                ax.set_axis_off()
                continue
            lo, hi = float(min(s_in.min(), s_out.min())), float(max(s_in.max(), s_out.max()))
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
            ax.hist(s_in, bins=bins, alpha=0.6, density=True, label="in-distribution")
            ax.hist(s_out, bins=bins, alpha=0.6, density=True, label=set_name)
            ax.set_title(f"{set_name} — {_attack_label(a)}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{score} score (higher = more in-distribution)", fontsize=9)
    fig.tight_layout()
    name = f"hist_{score}.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    written.append(name)
    return written


def write_report(out_dir: str | Path, report: dict[str, Any], raw: dict[str, np.ndarray] | None) -> list[str]:
    """Write plots (when raw scores are given) and eval.md; returns the written file names."""
    out_dir = Path(out_dir)
    plots: list[str] = []
    if raw:
        for score in report["results"]:
            plots += _plot_score(out_dir, score, report, raw)
    (out_dir / EVAL_MD).write_text(render_markdown(report, plots), encoding="utf-8")
    return [EVAL_MD, *plots]
