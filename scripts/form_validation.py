"""OOD rejection per upload form, on validation data: does a form move the score on its own?

For each run, `--n` calibration-split images (never trained on) and `--n` images of the held-out outlier
classes (never trained on) are uploaded in every form of training/shifts.py and decoded as the service
decodes them; the served model (flip averaging as configured) scores them with `--score`. Each form is judged
at its own TPR95 threshold, set by calibrate's rule (`threshold_for_tpr`, what the form-conditional bundle does), so the FPR column is what that form lets
through; the spread of FPR across forms is issue 12's "no form may move the score" on validation data, never
on a test set.

    python scripts/form_validation.py ~/oodguard-runs/exp/aloe_base ~/oodguard-runs/exp/aloe_blur --n 1000 \
        --out docs/bench/form_validation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def tensor_batches(images: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """Float NCHW batches of uint8 NHWC images (clean) or of float NCHW ones (attacked, as the attacks return them)."""
    from oodguard.training.data import iterate_batches

    if images.dtype == np.uint8:
        return [x for _, x in iterate_batches(images, batch_size)]
    return [torch.from_numpy(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def validation_images(run_dir: Path, n: int, script: str):
    """(model, n calibration-split images, n held-out-class outlier images) of a run: the seeded subsets every
    validation script measures, so their numbers are on the same images. A run without them exits naming why."""
    from oodguard.training.ood_sets import subset_indices
    from oodguard.training.run_dir import RunData, RunDirError

    try:
        run = RunData.open(run_dir.expanduser())
        model, _ = run.load_model()
        cal, out = run.calibration_set(), run.outlier_validation_set()
    except RunDirError as e:
        raise SystemExit(f"{script}: {e}") from None
    return model, cal.images[subset_indices(len(cal), n, seed=0)], out.images[subset_indices(len(out), n, seed=1)]


def main() -> None:
    from oodguard.training.calibrate import threshold_for_tpr
    from oodguard.training.data import iterate_batches
    from oodguard.training.ood_metrics import ood_metrics
    from oodguard.training import scores as score_fns
    from oodguard.training.shifts import FORMS, render_form

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="Run directories (trained with held-out outlier classes).")
    ap.add_argument("--n", type=int, default=1000, help="Images per side (seeded subsets).")
    ap.add_argument("--score", default="energy", choices=["msp", "energy"])
    ap.add_argument("--forms", default=",".join(FORMS), help="Comma-separated forms (default: all).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the numbers to this JSON file.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    score_fn = getattr(score_fns, args.score)  # msp or energy of the logits: pure functions

    def scores(model, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([score_fn(model(x)).numpy() for _, x in iterate_batches(images, 250)])

    results = []
    for run_dir in args.runs:
        model, cal_x, out_x = validation_images(run_dir, args.n, "form_validation")
        row = {"run": str(run_dir), "score": args.score, "flip_average": bool(getattr(model, "flip_average", False)),
               "n_in": int(len(cal_x)), "n_out": int(len(out_x)), "forms": {}}
        for form in forms:
            s_in, s_out = scores(model, render_form(cal_x, form)), scores(model, render_form(out_x, form))
            threshold = threshold_for_tpr(np.sort(s_in), 0.95)  # this form's own TPR95 point
            m = ood_metrics(s_in, s_out)
            row["forms"][form] = {"fpr_at_own_tpr95": float((s_out >= threshold).mean()), "auroc": m["auroc"]}
            print(f"{run_dir.name:>14} {form:>11}: FPR at its TPR95 {100 * row['forms'][form]['fpr_at_own_tpr95']:5.1f}%"
                  f"  AUROC {100 * m['auroc']:5.1f}", flush=True)
        fprs = [v["fpr_at_own_tpr95"] for v in row["forms"].values()]
        row["fpr_spread_points"] = 100 * (max(fprs) - row["forms"].get("stored", {"fpr_at_own_tpr95": min(fprs)})["fpr_at_own_tpr95"])
        print(f"{run_dir.name}: worst form's FPR minus stored: {row['fpr_spread_points']:.1f} points", flush=True)
        results.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
