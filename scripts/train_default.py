"""Train, evaluate, export and calibrate the default bundle (`make train-default`), plus MSP/OE comparisons.

The CPU recipe (2 cores, about an hour for the shipped ALOE bundle):

1. `pretrain`: small_cnn, plain cross-entropy (`msp`) for PRETRAIN_EPOCHS epochs on CIFAR-10's training
   split minus the 5,000-image calibration split (~20 minutes on 2 idle cores). Plain steps are cheap, so
   this gets most of the epochs. Fixed epochs, not a time budget, so the recipe does not depend on how
   busy the machine is.
2. Fine-tune the pretrained weights for FINETUNE_EPOCHS epochs with the same schedule, one run per method:
   `aloe` (shipped), `oe` and `msp` (comparisons, not shipped). Same data, seed, lr, epochs: only the
   loss differs. ALOE's step costs ~10x a plain one, which is why it fine-tunes rather than trains from
   scratch on these cores (the OE paper fine-tunes the same way).
3. `oodguard evaluate` each fine-tuned run (clean + `paper` attack) on Tiny-ImageNet, Gaussian and uniform
   noise; `oodguard export` + `oodguard calibrate` the ALOE run into `models/default`, then
   `oodguard bundle verify`.
4. Write `docs/results-default.json` (every number) for docs/results.md.

The GPU recipe is one flag away: `oodguard train --recipe paper --method aloe --out runs/paper`.

Usage: python scripts/train_default.py [--out runs/default] [--pretrain-epochs 10] [--finetune-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OODGUARD = [sys.executable, "-m", "oodguard.cli"]
OOD_SETS = ("tinyimagenet", "gaussian", "uniform")


def common_train_args(threads: int) -> list[str]:
    """The recipe's shared `oodguard train` flags (model, data, seed); every method is trained with these."""
    # pool=maxavg: the small_cnn variant the shipped bundle was trained with (global max+mean pooling).
    return ["--model", "small_cnn", "--model-kwargs", '{"pool": "maxavg"}', "--data", "cifar10",
            "--outliers", "tinyimagenet", "--seed", "1", "--threads", str(threads), "--no-progress"]


def run_oodguard(args: list[str], log: Path) -> float:
    """Run one oodguard command, tee its output to `log`, fail loudly; returns wall seconds."""
    start = time.monotonic()
    print(f"$ oodguard {' '.join(args)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ oodguard {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([*OODGUARD, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): oodguard {' '.join(args)} — see {log}")
    seconds = time.monotonic() - start
    print(f"  done in {seconds / 60:.1f} min", flush=True)
    return seconds


def finetune_run(method: str, pretrained: Path, run: Path, args: argparse.Namespace, log: Path) -> float:
    """Fine-tune the pretrained weights with `method` (the recipe's flags, args' epochs / lr / threads); wall seconds."""
    return run_oodguard(["train", "--method", method, *common_train_args(args.threads), "--init-from", str(pretrained),
                         "--epochs", str(args.finetune_epochs), "--lr", str(args.finetune_lr), "--out", str(run),
                         "--overwrite"], log)


def evaluate_run(run: Path, out: Path, attacks: str, samples: int, log: Path) -> float:
    """`oodguard evaluate` a run on the recipe's OOD sets (MSP and energy scores) into `out`; wall seconds."""
    ood = [arg for name in OOD_SETS for arg in ("--ood", name)]
    return run_oodguard(["evaluate", str(run), *ood, "--attack", attacks, "--scores", "msp,energy",
                         "--max-samples", str(samples), "--out", str(out)], log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/default", help="Directory for the runs (git-ignored).")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--methods", default="aloe,oe,msp", help="Fine-tuning methods; the first is shipped.")
    ap.add_argument("--eval-samples", type=int, default=2000, help="Images per set in the evaluations.")
    ap.add_argument("--bundle", default="models/default", help="Where the shipped bundle goes.")
    ap.add_argument("--version", default=time.strftime("%Y%m%d", time.gmtime()), help="Bundle version.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_default.log"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    timings: dict[str, float] = {}

    pre = out / "pretrain"
    if not (pre / "checkpoints" / "last.pt").exists():
        timings["pretrain"] = run_oodguard(["train", "--method", "msp", *common_train_args(args.threads),
                                            "--epochs", str(args.pretrain_epochs), "--out", str(pre), "--overwrite"], log)
    for method in methods:
        run = out / method
        timings[f"finetune_{method}"] = finetune_run(method, pre, run, args, log)
        timings[f"evaluate_{method}"] = evaluate_run(run, run / "eval", "none,paper", args.eval_samples, log)

    shipped = out / methods[0]
    timings["export"] = run_oodguard(["export", str(shipped), "--scores", "msp,energy"], log)
    bundle = ROOT / args.bundle
    staging = out / "bundle"
    timings["calibrate"] = run_oodguard(["calibrate", str(shipped), "--score", "msp", "--name", "default",
                                 "--version", args.version, "--out", str(staging), "--no-tarball"], log)
    run_oodguard(["bundle", "verify", str(staging)], log)
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(staging, bundle)
    run_oodguard(["bundle", "verify", str(bundle)], log)

    results = {"recipe": vars(args), "timings_s": timings, "runs": {}}
    for method in methods:
        run = out / method
        summary = json.loads((run / "log.jsonl").read_text().strip().splitlines()[-1])
        results["runs"][method] = {
            "eval": json.loads((run / "eval" / "eval.json").read_text()),
            "train_end": summary,
        }
    results["runs"]["pretrain"] = {"train_end": json.loads((pre / "log.jsonl").read_text().strip().splitlines()[-1])}
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "results-default.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    total = sum(v for k, v in timings.items())
    aloe_path = sum(v for k, v in timings.items() if k in ("pretrain", f"finetune_{methods[0]}",
                                                             f"evaluate_{methods[0]}", "export", "calibrate"))
    print(f"total {total / 60:.1f} min; shipped bundle's own path {aloe_path / 60:.1f} min -> {bundle}")


if __name__ == "__main__":
    main()
