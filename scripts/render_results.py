"""Render the method comparison (every run's eval.json, and eval_strong where present) as markdown tables.

    python scripts/render_results.py docs/results-robustness.json            # summary + per-set tables
    python scripts/render_results.py docs/results-robustness.json --long     # every metric, long format
    python scripts/render_results.py docs/results-default.json --summary --score energy  # the short table only
    python scripts/render_results.py docs/results-default.json --default     # the shipped model, per set
    python scripts/render_results.py EVAL_DIR/eval.json --certified          # certified (IBP) rows, per set

The clean and `paper` numbers come from RUN/eval (--eval-samples images per set), the `strong` ones
from RUN/eval_strong (a smaller seeded subset: 100 PGD steps per image and score).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("auroc", "AUROC ↑"), ("fpr_at_95_tpr", "FPR95 ↓"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑"))
SCORES = ("msp", "energy")
SYNTHETIC = ("gaussian", "uniform", "blobs")  # the built-in noise sets (ood_sets.SYNTHETIC_SETS)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _methods(data: dict) -> list[str]:
    return [m for m in data["runs"] if "eval" in data["runs"][m]]


def _with_ood_only(ev: dict, attacks: list[str]) -> list[str]:
    """Each attack, followed by its OOD-side-only variant where the eval.json has one (the protocol the ALOE
    and ATOM papers report: clean in-distribution scores vs attacked OOD scores)."""
    out = []
    for a in attacks:
        out.append(a)
        if a != "none" and any(f"{a}_ood_only" in per for sets in ev["results"].values() for per in sets.values()):
            out.append(f"{a}_ood_only")
    return out


def _attacks(run: dict) -> list[tuple[str, dict]]:
    """(protocol, eval.json holding it) for clean, paper and, where run, strong (each both sides, then OOD side only)."""
    out = [(a, run["eval"]) for a in _with_ood_only(run["eval"], list(run["eval"]["attacks"]))]
    if "eval_strong" in run:
        strong = [a for a in run["eval_strong"]["attacks"] if a != "none"]
        out += [(a, run["eval_strong"]) for a in _with_ood_only(run["eval_strong"], strong)]
    return out


def _cell(run: dict, score: str, ood: str, attack: str) -> dict | None:
    for a, ev in _attacks(run):
        if a == attack:
            return ev["results"].get(score, {}).get(ood, {}).get(attack)
    return None


def _is_synthetic(ev: dict, ood: str) -> bool:
    """Synthetic noise sets are reported apart from real ones and never averaged with them."""
    source = ev.get("ood_sets", {}).get(ood, {}).get("source", "")
    return source.startswith("synthetic:") or (not source and ood in SYNTHETIC)


def _accuracy(run: dict, attack: str, score: str = "msp") -> float | None:
    ev = dict(_attacks(run)).get(attack)
    if ev is None:
        return None
    acc = ev["accuracy"].get(attack)
    return acc.get(score) if isinstance(acc, dict) else acc


def _label(attack: str) -> str:
    return "clean" if attack == "none" else attack.replace("_ood_only", " (OOD only)")


def render_summary(data: dict, score: str = "msp") -> str:
    """One row per method and OOD set (real sets first, synthetic noise in its own table); no averages."""
    runs, methods = data["runs"], _methods(data)
    first = runs[methods[0]]
    attacks = [a for a, _ in _attacks(first)]
    if score not in first["eval"]["results"]:
        raise SystemExit(f"render_results: no {score!r} results in this file; it has "
                         f"{', '.join(first['eval']['results'])} (use --score)")
    sets = list(first["eval"]["results"][score])
    names = {"paper": "`paper` (ε = 1/255, 10 steps, both sides)", "paper_ood_only": "`paper (OOD only)` (the same attack on the OOD side only)",
             "strong": "`strong` (ε = 8/255, 100 steps, both sides)", "strong_ood_only": "`strong (OOD only)`"}
    out = []
    for title, group in (("Real OOD sets", [s for s in sets if not _is_synthetic(first["eval"], s)]),
                         ("Synthetic noise (not averaged with real sets)", [s for s in sets if _is_synthetic(first["eval"], s)])):
        if not group:
            continue
        out += [f"{title}; {score.upper()} score; percent; images per side in the n columns. Attacks: "
                + ", ".join(names[a] for a in attacks if a in names) + ".", "",
                "| method | OOD set | test acc. | " + " | ".join(f"AUROC {_label(a)} ↑" for a in attacks) + " | "
                + " | ".join(f"FPR95 {_label(a)} ↓" for a in attacks) + " | " + " | ".join(f"n {_label(a)}" for a in attacks) + " |",
                "|---|---|" + "---:|" * (1 + 3 * len(attacks))]
        for m in methods:
            run = runs[m]
            for ood in group:
                cells_by_attack = [_cell(run, score, ood, a) for a in attacks]
                cells = [_pct(run["eval"]["accuracy"]["clean"])]
                cells += [_pct(c["auroc"]) if c else "–" for c in cells_by_attack]
                cells += [_pct(c["fpr_at_95_tpr"]) if c else "–" for c in cells_by_attack]
                cells += [str(c["n_out"]) if c else "–" for c in cells_by_attack]
                out.append(f"| {m} | {ood} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_full(data: dict) -> str:
    runs, methods = data["runs"], _methods(data)
    first = runs[methods[0]]
    attacks = [a for a, _ in _attacks(first)]
    # accuracy under attack: the in-distribution side is attacked only in the both-sides protocols
    acc_attacks = [a for a in attacks if a != "none" and not a.endswith("_ood_only")]
    out = ["| method | test acc. clean | " + " | ".join(f"acc. under `{a}` attack (msp / energy)" for a in acc_attacks) + " |",
           "|---|---:|" + "---:|" * len(acc_attacks)]
    for m in methods:
        run = runs[m]
        cells = [f"{_pct(_accuracy(run, a, 'msp'))} / {_pct(_accuracy(run, a, 'energy'))}" for a in acc_attacks]
        out.append(f"| {m} | {_pct(run['eval']['accuracy']['clean'])} | " + " | ".join(cells) + " |")
    for score in SCORES:
        if score not in first["eval"]["results"]:
            continue
        out += ["", f"**Score `{score}`**: AUROC ↑ / FPR95 ↓ (percent; in-distribution = CIFAR-10 test = positive class)", "",
                "| OOD set | attack | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
        for ood in first["eval"]["results"][score]:
            for attack in attacks:
                cells = []
                for m in methods:
                    r = _cell(runs[m], score, ood, attack)
                    cells.append("–" if r is None else f"{_pct(r['auroc'])} / {_pct(r['fpr_at_95_tpr'])}")
                out.append(f"| {ood} | {_label(attack)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_long(data: dict) -> str:
    runs, methods = data["runs"], _methods(data)
    out = ["| score | method | OOD set | attack | n in / out | " + " | ".join(label for _, label in METRICS) + " | det. error ↓ |",
           "|---|---|---|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for score in SCORES:
        for m in methods:
            for attack, ev in _attacks(runs[m]):
                for ood, per in ev["results"].get(score, {}).items():
                    r = per.get(attack)
                    if r is None:
                        continue
                    out.append(f"| {score} | {m} | {ood} | {_label(attack)} | {r['n_in']} / {r['n_out']} | "
                               + " | ".join(_pct(r[k]) for k, _ in METRICS) + f" | {_pct(r['detection_error'])} |")
    return "\n".join(out) + "\n"


def _n(m: dict) -> str:
    return f"{m['n_in']:,} + {m['n_out']:,}"


def render_default(data: dict) -> str:
    """The shipped model (make train-default's results): one row per OOD set and protocol, the served score,
    the upload forms, the score choice and the realised rates per form. Synthetic noise apart from real sets."""
    shipped = data["recipe"]["methods"].split(",")[0].strip()
    ev = data["runs"][shipped]["eval"]
    bundle = data["bundle_metrics"]
    served = bundle["validation"]["score"]
    sets = list(ev["results"][served])
    real = [k for k in sets if not ev["ood_sets"][k]["source"].startswith("synthetic:")]
    how = "chosen by `--score auto`" if "score_selection" in bundle else "named by `--score`"
    out = [f"Served score: `{served}` ({how}). Test accuracy {_pct(ev['accuracy']['clean'])}% "
           f"({ev['in_distribution']['n']:,} CIFAR-10 test images).", "",
           "| OOD set | protocol | images (in + OOD) | AUROC ↑ | FPR95 ↓ | AUPR-in ↑ | AUPR-out ↑ |", "|---|---|---:|---:|---:|---:|---:|"]
    labels = {"none": "clean", "paper": "`paper` worst case, both sides", "paper_ood_only": "`paper`, OOD side only",
              "strong": "`strong` worst case, both sides", "strong_ood_only": "`strong`, OOD side only"}
    for group in (real, [k for k in sets if k not in real]):
        for key in group:
            for attack, label in labels.items():
                m = ev["results"][served][key].get(attack)
                if m:
                    out.append(f"| {key}{'' if key in real else ' (synthetic)'} | {label} | {_n(m)} | {_pct(m['auroc'])} | "
                               f"{_pct(m['fpr_at_95_tpr'])} | {_pct(m['aupr_in'])} | {_pct(m['aupr_out'])} |")
    forms = bundle["validation"].get("forms", {})
    if forms:
        op = "tpr95"
        if bundle["validation"].get("form_conditional"):
            how = ("each form at its upload-form group's threshold (one calibration per group: the calibration split "
                   "uploaded in random forms of the group)")
        else:
            how = f"one threshold, calibrated on the calibration split in a mix of {', '.join(bundle['validation']['calibration_forms'])}"
        out += ["", f"Upload forms through the service's decoder, `{op}`: {how}; test split and real OOD sets:", "",
                "| form | group | realised TPR | " + " | ".join(f"FPR {k}" for k in real) + " |",
                "|---|---|---:|" + "---:|" * len(real)]
        for form, row in forms.items():
            out.append(f"| {form} | {row.get('group', '–')} | {_pct(row[op]['realised_tpr'])} | "
                       + " | ".join(_pct(row[op]["fpr"].get(k)) for k in real) + " |")
    sel = bundle.get("score_selection")
    if sel:
        out += ["", f"Score choice on validation data ({sel['in_distribution']} vs {sel['ood']}); rule: {sel['rule']}:", "",
                "| score | clean AUROC | clean FPR95 | `paper` AUROC | `paper` FPR95 |", "|---|---:|---:|---:|---:|"]
        for name, r in sel["candidates"].items():
            out.append(f"| {name}{' (chosen)' if name == sel['chosen'] else ''} | {_pct(r['clean']['auroc'])} | "
                       f"{_pct(r['clean']['fpr_at_95_tpr'])} | {_pct(r['attacked']['auroc'])} | "
                       f"{_pct(r['attacked']['fpr_at_95_tpr'])} |")
    return "\n".join(out) + "\n"


def render_certified(ev: dict) -> str:
    """The certified rows of one eval.json (`oodguard evaluate --certify`): per score, OOD set and radius,
    the guaranteed metrics (clean inliers vs the IBP bound of each OOD image's worst case) next to the clean
    ones. Synthetic noise after the real sets, never averaged with them."""
    cert = ev.get("certified") or {}
    if not cert:
        raise SystemExit("no certified rows in this eval.json (run `oodguard evaluate --certify ...`)")
    out = []
    for score in cert["scores"]:
        results = ev["results"][score]
        sets = sorted(results, key=lambda k: _is_synthetic(ev, k))
        out += [f"Score `{score}`; in-distribution: {ev['in_distribution']['spec']} test split, clean; percent.", "",
                "| OOD set | ε | images (in + OOD) | guaranteed AUROC ↑ | guaranteed FPR95 ↓ | clean AUROC ↑ | "
                "clean FPR95 ↓ | clean images |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key in sets:
            clean = results[key]["none"]
            for row, eps in cert["rows"].items():
                m = results[key].get(row)
                if m:
                    out.append(f"| {key}{' (synthetic)' if _is_synthetic(ev, key) else ''} | {eps * 255:.4g}/255 | "
                               f"{_n(m)} | {_pct(m['auroc'])} | {_pct(m['fpr_at_95_tpr'])} | {_pct(clean['auroc'])} | "
                               f"{_pct(clean['fpr_at_95_tpr'])} | {_n(clean)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--summary", action="store_true", help="Only the short table, one row per method and OOD set.")
    ap.add_argument("--score", default="msp", help="The score --summary tabulates (default msp).")
    ap.add_argument("--long", action="store_true", help="Every metric of every cell, one row each.")
    ap.add_argument("--default", action="store_true", help="The shipped model of docs/results-default.json, per set.")
    ap.add_argument("--certified", action="store_true", help="RESULTS is an eval.json: its certified (IBP) rows.")
    args = ap.parse_args()
    data = json.loads(args.results.read_text())
    if args.certified:
        print(render_certified(data), end="")
    elif args.default:
        print(render_default(data), end="")
    elif args.summary:
        print(render_summary(data, args.score), end="")
    elif args.long:
        print(render_long(data), end="")
    else:
        print("\n".join([render_summary(data, "msp"), render_summary(data, "energy"), render_full(data)]), end="")


if __name__ == "__main__":
    main()
