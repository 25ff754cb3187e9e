"""Train the robust detector and build the `models/robust` bundle (`make train-robust`; issue 14).

1. The classifier: the shipped default model. Its training run is usually not on this machine (it was trained
   on a GPU), so by default it is rebuilt from `models/default` (scripts/run_from_bundle.py: the graph's weights,
   parity-checked against the bundle) into OUT/classifier. `--classifier RUN` uses a run directory instead.
2. `detector`: `oodguard train --recipe robust_disc` (a small_cnn in-vs-out detector, widths 48/96/192 as shipped
   since robust:20261202, PGD-3 adversarial training at ε = 8/255 on both sides, 8 epochs, ~1.25 h on 2 quiet
   cores; every epoch validated under PGD-10 on the calibration split vs the held-out outlier classes).
   Resumable: run the script again and it continues where it stopped.
3. The detector's epoch with the best validation AUROC under PGD-10 (validation data only; ties: the later
   epoch; a run with a weight average offers its trained weights too) is composed with the classifier:
   `oodguard guard` -> OUT/guarded.
4. `oodguard export` (energy, detector), `oodguard calibrate --score auto --auto-attack strong`: the served
   score chosen on validation data under the ε = 8/255 worst-case attack (energy: the default bundle's score).
5. `oodguard evaluate` on the test sets: clean, `paper` and `strong` (Tiny-ImageNet), certified bounds at 1/255
   and 2/255; calibrate again (the choice is reused) so the manifest carries the attacked FPRs; verify; copy to
   models/robust; write docs/results-robust.json.

Usage: python scripts/train_robust.py [--out DIR] [--classifier RUN] [--epochs 8] [--detector-kwargs JSON]
GPU one-liner for a wider detector (same recipe, CUDA, bf16 autocast):
    oodguard train --recipe robust_disc --device cuda --model-kwargs '{"widths": [64, 128, 256]}' --epochs 30 \
        --out runs/detector && python scripts/train_robust.py --out runs  (finds runs/detector completed)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import ROOT, _train, install_bundle, run_oodguard  # noqa: E402  (the same stage runner as the default bundle)

OOD_SETS = ("tinyimagenet", "gaussian", "uniform")


SHIPPED_DETECTOR_KWARGS = '{"widths": [48, 96, 192]}'  # robust:20261202; 1.5x the recipe's widths


def best_epoch_checkpoint(run: Path) -> tuple[Path, dict]:
    """The epoch checkpoint whose per-epoch validation (disc_val) has the highest AUROC under PGD-10. A run with
    --ema-decay validates two models an epoch, the weight average (its "model") and the trained weights
    (disc_val_trained_weights); when the trained weights win, they are written out as epoch_XXX_trained.pt, a
    checkpoint whose "model" they are, and the record returned carries their validation as its disc_val."""
    from oodguard.training.run_dir import load_checkpoint, save_checkpoint

    records = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
               if "disc_val" in r and isinstance(r.get("epoch"), int)]
    candidates = [(r[key]["auroc_pgd"], r["epoch"], key == "disc_val", r, key) for r in records
                  for key in ("disc_val", "disc_val_trained_weights") if key in r
                  if (run / "checkpoints" / f"epoch_{r['epoch']:03d}.pt").is_file()]
    if not candidates:
        sys.exit(f"{run}: no epoch checkpoint with a validation record (trained without --keep-epoch-checkpoints?)")
    *_, record, key = max(candidates, key=lambda c: c[:3])  # ties: the later epoch, then the average
    path = run / "checkpoints" / f"epoch_{record['epoch']:03d}.pt"
    if key == "disc_val":
        return path, record
    trained = path.with_name(f"{path.stem}_trained.pt")
    if not trained.is_file() or trained.stat().st_mtime < path.stat().st_mtime:  # else: written from this very epoch
        state = load_checkpoint(path)
        save_checkpoint(trained, {**state, "model": state["trained_model"], "chosen_from": f"{path.name}: trained_model"})
    return trained, {**record, "disc_val": record[key], "weights": "trained"}


def composed_from(guarded: Path, classifier: Path, checkpoint: Path) -> bool:
    """Whether `guarded` is an exported composition of `classifier` and exactly this detector checkpoint."""
    from oodguard.training.run_dir import sha256_file

    try:
        composed = json.loads((guarded / "config.json").read_text())["composed"]
    except (OSError, ValueError, KeyError):
        return False
    return ((guarded / "export" / "model.onnx").is_file()
            and composed["classifier"]["run_dir"] == str(classifier)
            and composed["detector"]["checkpoint_sha256"] == sha256_file(checkpoint))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path.home() / "oodguard-runs" / "robust"), help="Directory for the runs.")
    ap.add_argument("--classifier", default=None, help="Classifier run directory (default: rebuilt from models/default).")
    ap.add_argument("--epochs", type=int, default=8, help="Detector training epochs.")
    ap.add_argument("--detector-kwargs", default=SHIPPED_DETECTOR_KWARGS,
                    help="The detector's model arguments as JSON (default: the shipped detector's, "
                    f"{SHIPPED_DETECTOR_KWARGS}; '{{}}' for the recipe's small_cnn, widths 32/64/128).")
    ap.add_argument("--eval-samples", type=int, default=1000, help="Images per set, clean.")
    ap.add_argument("--paper-samples", type=int, default=500, help="Images per side under the paper attack.")
    ap.add_argument("--strong-samples", type=int, default=300, help="Images per side under the strong attack.")
    ap.add_argument("--certify-samples", type=int, default=500, help="Images per side for the certified rows.")
    ap.add_argument("--auto-samples", type=int, default=200, help="Images per side attacked by --score auto.")
    ap.add_argument("--eval-scores", default="energy,detector",
                    help="Scores the test-set evaluation measures (the served one is chosen on validation data "
                    "whatever this says; 'detector' alone skips the classifier's energy under attack, the slow part).")
    ap.add_argument("--bundle", default="models/robust", help="Where the bundle goes.")
    ap.add_argument("--version", default=time.strftime("%Y%m%d", time.gmtime()), help="Bundle version.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_robust.log"
    timings: dict[str, float] = {}

    classifier = Path(args.classifier).expanduser().resolve() if args.classifier else out / "classifier"
    if not classifier.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "run_from_bundle.py"), str(ROOT / "models" / "default"),
                        "--out", str(classifier)], cwd=ROOT, check=True)

    detector = out / "detector"
    timings["detector"] = _train(detector, ["--recipe", "robust_disc", "--data", "cifar10", "--outliers", "tinyimagenet",
                                            "--epochs", str(args.epochs), "--threads", str(args.threads),
                                            *(["--model-kwargs", args.detector_kwargs] if args.detector_kwargs else [])],
                           log)
    checkpoint, chosen = best_epoch_checkpoint(detector)
    print(f"detector: epoch {chosen['epoch']} ({chosen.get('weights', 'its model')}) chosen on validation "
          f"(AUROC clean {chosen['disc_val']['auroc_clean']:.4f}, PGD-10 {chosen['disc_val']['auroc_pgd']:.4f})")

    guarded = out / "guarded"
    if composed_from(guarded, classifier, checkpoint):  # an earlier invocation composed and exported this pair
        print(f"{guarded}: composed from the same classifier and detector checkpoint, kept (with its score choice)")
    else:
        if guarded.exists():
            shutil.rmtree(guarded)
        run_oodguard(["guard", "--classifier", str(classifier), "--detector", str(detector),
                      "--detector-checkpoint", str(checkpoint), "--out", str(guarded)], log)
        timings["export"] = run_oodguard(["export", str(guarded), "--scores", "energy,detector"], log)
    staging = out / "bundle"
    calibrate = ["calibrate", str(guarded), "--score", "auto", "--auto-attack", "strong", "--auto-samples",
                 str(args.auto_samples), "--max-samples", str(args.eval_samples), "--name", "robust", "--version",
                 args.version, "--out", str(staging), "--no-tarball"]
    timings["select_and_calibrate"] = run_oodguard(calibrate, log)
    ood = [arg for name in OOD_SETS for arg in ("--ood", name)]
    timings["evaluate"] = run_oodguard(
        ["evaluate", str(guarded), *ood, "--attack", "none,paper,strong", "--scores", args.eval_scores,
         "--max-samples", str(args.eval_samples), "--attack-sets", "tinyimagenet",
         "--attack-samples", f"paper={args.paper_samples},strong={args.strong_samples}",
         "--certify", "1/255,2/255", "--certify-samples", str(args.certify_samples), "--shifts", "all",
         "--out", str(guarded / "eval")], log)
    timings["calibrate"] = run_oodguard(calibrate, log)  # reuses the choice; adds the attacked FPRs
    bundle = ROOT / args.bundle
    install_bundle(staging, bundle, log)

    results = {"recipe": vars(args), "timings_s": timings, "detector_checkpoint": checkpoint.name,
               "detector_validation": [json.loads(line) for line in (detector / "log.jsonl").read_text().splitlines()],
               "detector_train_end": json.loads((detector / "summary.json").read_text()),
               "composed": json.loads((guarded / "config.json").read_text())["composed"],
               "eval": json.loads((guarded / "eval" / "eval.json").read_text()),
               "bundle_metrics": json.loads((bundle / "manifest.json").read_text())["metrics"]}
    (ROOT / "docs" / "results-robust.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    hours = results["detector_train_end"].get("train_seconds", 0.0) / 3600
    print(f"detector training {hours:.2f} h; this invocation {sum(timings.values()) / 60:.1f} min -> {bundle}")


if __name__ == "__main__":
    main()
