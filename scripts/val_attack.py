"""OOD detection under attack on validation data: a recipe choice's robustness, never read off a test set.

For each run, `--n` calibration-split images (never trained on) and `--n` images of the held-out outlier
classes are attacked with an evaluation protocol's worst-case attack (`paper`: ε = 1/255, 10 steps, every
objective and 2 restarts; `strong`: ε = 8/255, 100 steps), inliers pushed down and outliers up, exactly as
`oodguard calibrate --score auto` attacks its candidates (`score_selection.attacked_images`), and scored by
the run's torch model (flip averaging as configured). Clean numbers on the same images are printed beside.

    python scripts/val_attack.py ~/oodguard-runs/q30/full ~/oodguard-runs/q30/full_evalbn --n 500 \
        --out docs/bench/val_attack.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from form_validation import tensor_batches, validation_images  # noqa: E402  (the subsets form_validation measures)


def main() -> None:
    from oodguard.training.ood_metrics import ood_metrics
    from oodguard.training.score_selection import SELECTION_ATTACKS, attacked_images
    from oodguard.training.scores import ScoreContext, scored_forward

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="Run directories (trained with held-out outlier classes).")
    ap.add_argument("--n", type=int, default=500, help="Images per side (seeded subsets).")
    ap.add_argument("--score", default="energy", choices=["msp", "energy"])
    ap.add_argument("--attack", default="paper", choices=list(SELECTION_ATTACKS))
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", type=Path, default=None, help="Also write the numbers to this JSON file.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.n < 1:
        raise SystemExit(f"val_attack: --n must be >= 1, got {args.n}")
    torch.set_num_threads(args.threads)
    ctx = ScoreContext()

    def scores(model, images: np.ndarray) -> np.ndarray:  # float NCHW (attacked) or uint8 NHWC (clean) images
        forward = scored_forward(model, args.score, ctx)
        with torch.no_grad():
            return np.concatenate([forward(x)[0].numpy() for x in tensor_batches(images, args.batch_size)])

    results = []
    for run_dir in args.runs:
        model, cal_x, out_x = validation_images(run_dir, args.n, "val_attack")
        model.eval()
        started = time.perf_counter()
        adv_in = attacked_images(model, args.score, ctx, cal_x, -1.0, args.batch_size, 0, args.attack)
        adv_out = attacked_images(model, args.score, ctx, out_x, +1.0, args.batch_size, 1, args.attack)
        clean = ood_metrics(scores(model, cal_x), scores(model, out_x))
        attacked = ood_metrics(scores(model, adv_in), scores(model, adv_out))
        row = {"run": str(run_dir), "score": args.score, "attack": args.attack, "n_in": int(len(cal_x)),
               "n_out": int(len(out_x)), "flip_average": bool(getattr(model, "flip_average", False)),
               "clean": {k: clean[k] for k in ("auroc", "fpr_at_95_tpr")},
               "attacked": {k: attacked[k] for k in ("auroc", "fpr_at_95_tpr")},
               "seconds": round(time.perf_counter() - started, 1)}
        print(f"{run_dir.name:>14}: clean AUROC {100 * clean['auroc']:5.1f} FPR95 {100 * clean['fpr_at_95_tpr']:5.1f}%"
              f" | {args.attack} both sides AUROC {100 * attacked['auroc']:5.1f} FPR95 "
              f"{100 * attacked['fpr_at_95_tpr']:5.1f}%  ({row['n_in']} + {row['n_out']}, {row['seconds']} s)",
              flush=True)
        results.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
