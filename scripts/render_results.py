"""Render the method comparison (eval.json of each run) as markdown tables for docs/results.md / README.

    python scripts/render_results.py docs/results-default.json            # full tables
    python scripts/render_results.py docs/results-default.json --summary  # README's short table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("auroc", "AUROC ↑"), ("fpr_at_95_tpr", "FPR95 ↓"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean_over_sets(res: dict, score: str, attack: str, metric: str) -> float:
    values = [per_attack[attack][metric] for per_attack in res[score].values() if attack in per_attack]
    return sum(values) / len(values)


def render_full(data: dict) -> str:
    runs = data["runs"]
    methods = [m for m in runs if "eval" in runs[m]]
    first = runs[methods[0]]["eval"]
    attacks = list(first["attacks"])
    scores = [s for s in first["results"] if s in ("msp", "energy")]
    out = []
    out.append("| method | test acc. clean | acc. under `paper` attack (msp) |")
    out.append("|---|---:|---:|")
    for m in methods:
        acc = runs[m]["eval"]["accuracy"]
        attacked = acc.get("paper", {}).get("msp") if isinstance(acc.get("paper"), dict) else None
        out.append(f"| {m} | {_pct(acc['clean'])} | {_pct(attacked)} |")
    for score in scores:
        out.append("")
        out.append(f"**Score `{score}`** (percent; in-distribution = CIFAR-10 test = positive class)")
        out.append("")
        header = "| OOD set | attack | " + " | ".join(f"{m} {label}" for m in methods for _, label in METRICS[:2]) + " |"
        out.append(header)
        out.append("|---|---|" + "---:|" * (2 * len(methods)))
        for ood in first["results"][score]:
            for attack in attacks:
                cells = []
                for m in methods:
                    r = runs[m]["eval"]["results"][score][ood].get(attack)
                    cells += [_pct(r["auroc"]) if r else "–", _pct(r["fpr_at_95_tpr"]) if r else "–"]
                out.append(f"| {ood} | {'clean' if attack == 'none' else attack} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_summary(data: dict) -> str:
    runs = data["runs"]
    methods = [m for m in runs if "eval" in runs[m]]
    first = runs[methods[0]]["eval"]
    sets = ", ".join(first["results"]["msp"])
    out = [f"Mean over OOD sets ({sets}); MSP score; percent. `paper` attack: L∞ PGD, ε = 1/255, 10 steps.", "",
           "| method | test acc. | AUROC clean ↑ | AUROC attacked ↑ | FPR95 clean ↓ | FPR95 attacked ↓ |",
           "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        res = runs[m]["eval"]["results"]
        out.append(
            f"| {m} | {_pct(runs[m]['eval']['accuracy']['clean'])} | {_pct(_mean_over_sets(res, 'msp', 'none', 'auroc'))} | "
            f"{_pct(_mean_over_sets(res, 'msp', 'paper', 'auroc'))} | {_pct(_mean_over_sets(res, 'msp', 'none', 'fpr_at_95_tpr'))} | "
            f"{_pct(_mean_over_sets(res, 'msp', 'paper', 'fpr_at_95_tpr'))} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    data = json.loads(args.results.read_text())
    print(render_summary(data) if args.summary else render_full(data), end="")


if __name__ == "__main__":
    main()
