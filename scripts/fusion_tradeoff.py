"""Bounded fusion of the robust detector with the classifier's confidence, on validation data (issue 14).

The robust detector's margin m(x) = logit(in) - logit(out) holds under the 8/255 attack but is clean-weaker
than the classifier; the classifier's confidence is clean-strong but an attacker moves it at will. A fusion
that gives the classifier a *bounded* say, m(x) + a * log msp(x) (log msp lies in [-log K, 0] whatever the
input), moves every in-vs-out pair by at most a * log K, so its worst case is no worse than the detector's
worst case with that handicap:

    in:  min over the ball >= min m + a * (-log K)         out:  max over the ball <= max m + 0

This script measures both sides of that trade on validation data only (the calibration split against the
held-out outlier classes; `form_validation.validation_images`' seeded subsets): clean AUROC / FPR95 of the
fusion for a grid of a, and its worst case from the detector attacked with the `strong` protocol (PGD-100 at
8/255 on the detector score, 4 starts, both sides) plus the bound above. `--attack-fused A` also attacks the
fusion at weight A directly (PGD on the fused score): the bound is pessimistic (it lets the margin's minimum and
msp = 1/K happen at one point), an attack on the fused score shows how much (13-14 AUROC points on
robust:20261202 at a = 0.05 and 0.2).

    python scripts/fusion_tradeoff.py ~/oodguard-runs/robust-w48/guarded --out docs/bench/fusion_tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from form_validation import tensor_batches, validation_images  # noqa: E402  (the subsets every script measures)

WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def main() -> None:
    from oodguard.training import data
    from oodguard.training.evaluate import ATTACK_PROTOCOLS
    from oodguard.training.ood_metrics import ood_metrics
    from oodguard.training.score_selection import attack_in_batches, attacked_images
    from oodguard.training.scores import ScoreContext, compute_scores, forward_outputs, log_msp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="A composed run (`oodguard guard`) with held-out outlier classes.")
    ap.add_argument("--n-clean", type=int, default=2000, help="Images per side, clean.")
    ap.add_argument("--n-attack", type=int, default=300, help="Images per side attacked (the first of the clean ones).")
    ap.add_argument("--attack-fused", type=float, default=None, help="Also attack the fusion at this weight directly.")
    ap.add_argument("--n-fused", type=int, default=100, help="Images per side of that direct attack (the first ones).")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="Also write the numbers to this JSON file.")
    ap.add_argument("--scores-out", type=Path, default=None, help="Also write every image's scores to this .npz.")
    args = ap.parse_args()
    if not 1 <= args.n_attack <= args.n_clean or not 1 <= args.n_fused <= args.n_attack:
        raise SystemExit("fusion_tradeoff: need 1 <= --n-fused <= --n-attack <= --n-clean, got "
                         f"{args.n_fused}, {args.n_attack}, {args.n_clean}")
    torch.set_num_threads(args.threads)
    model, cal_x, out_x = validation_images(args.run, args.n_clean, "fusion_tradeoff")
    if not callable(getattr(model, "detector_logits", None)):
        raise SystemExit(f"fusion_tradeoff: {args.run} has no detector (compose one with `oodguard guard`)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_classes = int(model(data.to_tensor(cal_x[:1])).shape[1])
    log_k = math.log(n_classes)

    ctx = ScoreContext()

    def outputs(images: np.ndarray) -> dict[str, np.ndarray]:  # uint8 NHWC or float NCHW
        cols: dict[str, list[np.ndarray]] = {"margin": [], "log_msp": [], "energy": []}
        for x in tensor_batches(images, args.batch_size):
            logits, scores = compute_scores(model, x, ["detector", "energy"], ctx)  # one pass of both networks
            cols["margin"].append(scores["detector"].numpy())
            cols["log_msp"].append(log_msp(logits).numpy())
            cols["energy"].append(scores["energy"].numpy())
        return {k: np.concatenate(v) for k, v in cols.items()}

    started = time.perf_counter()
    clean_in, clean_out = outputs(cal_x), outputs(out_x)
    n = args.n_attack
    adv_in = outputs(attacked_images(model, "detector", ctx, cal_x[:n], -1.0, args.batch_size, 0, "strong"))
    adv_out = outputs(attacked_images(model, "detector", ctx, out_x[:n], +1.0, args.batch_size, 1, "strong"))
    attack_seconds = time.perf_counter() - started

    def pct(m: dict) -> dict:
        return {"auroc": round(100 * m["auroc"], 2), "fpr95": round(100 * m["fpr_at_95_tpr"], 2)}

    rows = []
    for a in WEIGHTS:
        clean = ood_metrics(clean_in["margin"] + a * clean_in["log_msp"], clean_out["margin"] + a * clean_out["log_msp"])
        # the worst case the bound allows: the detector's attacked margins, log msp at its extremes
        worst = ood_metrics(adv_in["margin"] - a * log_k, adv_out["margin"])
        rows.append({"weight": a, "clean": pct(clean), "strong_bound": pct(worst)})
        print(f"a = {a:4.2f}: clean AUROC {rows[-1]['clean']['auroc']:5.1f} FPR95 {rows[-1]['clean']['fpr95']:5.1f}"
              f" | strong (detector attacked + bound) AUROC {rows[-1]['strong_bound']['auroc']:5.1f} FPR95 "
              f"{rows[-1]['strong_bound']['fpr95']:5.1f}", flush=True)
    result = {
        "run": str(args.run), "n_clean": [int(len(cal_x)), int(len(out_x))], "n_attack": [n, n],
        "validation": "calibration split vs held-out outlier classes (seeded subsets of form_validation)",
        "fusion": "margin + a * log_msp; log_msp in [-log K, 0]", "log_k": log_k,
        "classifier_energy_clean": pct(ood_metrics(clean_in["energy"], clean_out["energy"])),
        "detector_strong_attacked": pct(ood_metrics(adv_in["margin"], adv_out["margin"])),
        "attack_seconds": round(attack_seconds, 1), "rows": rows,
    }
    print(f"classifier energy, clean: AUROC {result['classifier_energy_clean']['auroc']:.1f}; "
          f"detector under strong: {result['detector_strong_attacked']['auroc']:.1f} ({attack_seconds:.0f} s)")

    if args.attack_fused is not None:
        a = args.attack_fused
        attack = ATTACK_PROTOCOLS["strong"]

        def fused(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            out = forward_outputs(model, x, ["detector"])
            score = out.detector + a * log_msp(out.logits)
            return score, {"score": score}

        def attacked(images: np.ndarray, direction: float, seed: int) -> np.ndarray:
            # the fused score alone, from as many starts as the protocol has objectives (as for the detector score)
            return attack_in_batches(fused, images, direction, args.batch_size, seed, "strong", ("score",),
                                     attack.restarts * len(attack.objectives))[1]

        t0 = time.perf_counter()
        k = args.n_fused
        direct = ood_metrics(attacked(cal_x[:k], -1.0, 0), attacked(out_x[:k], +1.0, 1))
        bound = ood_metrics(adv_in["margin"][:k] - a * log_k, adv_out["margin"][:k])
        result["strong_direct"] = {"weight": a, "n": [k, k], **pct(direct), "bound_same_images": pct(bound),
                                   "seconds": round(time.perf_counter() - t0, 1)}
        print(f"a = {a}: strong on the fused score itself ({k} + {k}): AUROC {result['strong_direct']['auroc']:.1f} "
              f"FPR95 {result['strong_direct']['fpr95']:.1f}; the bound on the same images: AUROC "
              f"{100 * bound['auroc']:.1f} ({result['strong_direct']['seconds']:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.scores_out:  # per image, so other fusions can be read off without attacking again
        np.savez_compressed(args.scores_out, **{f"{side}_{k}": v for side, cols in
                                                (("clean_in", clean_in), ("clean_out", clean_out),
                                                 ("strong_in", adv_in), ("strong_out", adv_out))
                                                for k, v in cols.items()})


if __name__ == "__main__":
    main()
