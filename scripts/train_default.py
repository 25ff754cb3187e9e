"""Train, evaluate, export and calibrate the default bundle (`make train-default`).

The CPU recipe (2 cores; every stage resumable — run the script again and it continues where it stopped):

1. `pretrain`: airbench94's network and recipe (`--recipe airbench`) with plain cross-entropy: batches of
   1,000, SGD nesterov (momentum 0.85) at lr 1.27 after a warm-up over the first fifth, cosine to 0, BatchNorm
   shifts at 64x the lr, label smoothing 0.2, flip + 2-px translations, and half of the images re-rendered as
   uploads (JPEG 20-95 / lossless, resize round trips through 24-128 px), on CIFAR-10's training split minus
   the 5,000-image calibration split. PRETRAIN_EPOCHS epochs (~3.4 min each on 2 quiet cores).
1b. `pretrain_restart` (only when RESTART_EPOCHS > 0): a warm restart (SGDR) of the same recipe from the
   pre-trained weights: RESTART_EPOCHS more epochs, lr RESTART_LR with a short warm-up and cosine decay.
   Measured (docs/results.md): 12 epochs 89.3% test accuracy, 20 more 89.6% (training accuracy 99.3%: the
   network overfits, so more epochs barely pay).
2. Fine-tune the last pretrained weights with ALOE for FINETUNE_EPOCHS epochs: the same recipe at batches
   of 128 inliers + 128 outliers (the outlier set minus the 10% of its classes held out for validation), both
   attacked with L∞ PGD at ε = 1/255 (2 steps of 1/255), every image of both sides re-rendered as an upload,
   λ = 0.5, lr FINETUNE_LR after 50 warm-up steps, cosine to 0. ALOE costs ~6 plain steps per inlier (two
   attacks plus the joint step), which is why it fine-tunes. With --flip-average (the default) every stage's model
   averages each image's and its mirror image's features in eval mode: evaluation, attacks, the exported graph
   and the service all see that model; training is unchanged (one view, flips in the augmentation).
3. `oodguard export` (msp, energy, mahalanobis in the graph), `oodguard calibrate --score auto` (the
   served score chosen on validation data: calibration split vs held-out outlier classes, clean and under
   the paper attack; thresholds on the calibration split uploaded in a mix of forms).
4. `oodguard evaluate` the served score on the test sets: clean, `paper` and `strong` worst-case attacks
   (on Tiny-ImageNet), every upload form; then calibrate again (the score choice is reused) so the
   manifest carries the attacked FPRs, verify, and copy the bundle to models/default.
5. Write docs/results-default.json (every number, timings).

Runs live in --out (default ~/oodguard-runs/default: outside the work tree, so a fresh checkout resumes).
The shipped bundle's training ran on one GPU instead (`make train-default-gpu`: scripts/train_gpu.sh trains
`pretrain` and `aloe` with wall-clock budgets and a one-epoch `restart` of the ALOE stage, then this script,
given `--finetuned` that restart run, does steps 3-5).

`--finetuned RUN` skips training and does steps 3-5 on RUN (how `default:20261201.2` was made: the GPU-trained
`default:20261201.1` rebuilt with flip averaging by `scripts/run_from_bundle.py --flip-average`; and how
`make train-default-gpu` ships its third stage, the ALOE warm restart). docs/results-default.json then records RUN
and the runs it was started from (`--init-from`, followed back while they are on disk).

Usage: python scripts/train_default.py [--out DIR] [--pretrain-epochs 12] [--restart-epochs 20] [--finetune-epochs 2]
(the defaults are the CPU recipe of docs/results.md: ~2.3 h of training on 2 quiet cores, 89.1% test accuracy;
--restart-epochs 0 saves ~70 min for ~0.3 points of pre-training accuracy; airbench95's widths, measured for issue 12:
--widths 128,384,384 --pretrain-lr 1.1 --pretrain-epochs 15 --restart-epochs 0, 1.84 h of pre-training to 91.3% test
accuracy flip-averaged, then ~66 min of ALOE fine-tuning)
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
MODEL = "airbench"
RECIPE = "airbench"


# last.pt every 25 steps too (~2 min of pre-training or ALOE at ~4.4 s a step on the 2 cores, a 16 MB write):
# a process killed outright at the end of a working session loses at most that, not the epoch (~26 min of ALOE)
SAVE_EVERY_STEPS = 25
# Operational flags (not part of a run's recipe): `--resume` does not carry them over, so a resumed stage is
# given them again from this one list (--keep-epoch-checkpoints: for the accuracy curve)
OPERATIONAL_FLAGS = ["--no-progress", "--keep-epoch-checkpoints", "--save-every-steps", str(SAVE_EVERY_STEPS)]


def model_kwargs_args(args: argparse.Namespace) -> list[str]:
    """`--model-kwargs` for a stage: the network's widths (every stage the same, or --init-from refuses the
    weights) and flip averaging (the served model averages mirror views). Flip averaging changes only eval
    mode, so every stage gets it: training is the same, and each stage's logged test accuracy is the served
    view's."""
    kwargs = {"widths": args.widths} if args.widths else {}
    if getattr(args, "flip_average", False):
        kwargs["flip_average"] = True
    return ["--model-kwargs", json.dumps(kwargs)] if kwargs else []


def common_train_args(threads: int) -> list[str]:
    """The recipe's shared `oodguard train` flags; every method is fine-tuned with these."""
    return ["--model", MODEL, "--data", "cifar10", "--outliers", "tinyimagenet", "--seed", "1",
            "--threads", str(threads), *OPERATIONAL_FLAGS]


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


def _train(run: Path, args: list[str], log: Path) -> float:
    """Train into `run`, or resume it when it stopped early; skip it when it completed."""
    summary = run / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("stopped") == "completed":
        print(f"{run}: completed, kept")
        return 0.0
    if (run / "checkpoints" / "last.pt").is_file():
        return run_oodguard(["train", "--out", str(run), "--resume", *OPERATIONAL_FLAGS], log)
    return run_oodguard(["train", *args, "--out", str(run), "--overwrite"], log)


def pretrain_run(run: Path, args: argparse.Namespace, log: Path) -> float:
    return _train(run, ["--recipe", RECIPE, "--method", "msp", *common_train_args(args.threads),
                        "--epochs", str(args.pretrain_epochs), *model_kwargs_args(args),
                        *(["--lr", str(args.pretrain_lr)] if args.pretrain_lr is not None else [])], log)


def restart_run(pretrained: Path, run: Path, args: argparse.Namespace, log: Path) -> float:
    """Warm restart (SGDR) of the pre-training recipe from `pretrained`: a fresh warm-up and cosine."""
    return _train(run, ["--recipe", RECIPE, "--method", "msp", *common_train_args(args.threads),
                        "--init-from", str(pretrained), "--epochs", str(args.restart_epochs),
                        "--lr", str(args.restart_lr), "--warmup-steps", "50", "--warmup-frac", "0",
                        *model_kwargs_args(args)], log)


def finetune_run(method: str, pretrained: Path, run: Path, args: argparse.Namespace, log: Path) -> float:
    """Fine-tune the pretrained weights with `method` (the recipe's flags, args' epochs / lr / threads); wall seconds."""
    return _train(run, ["--recipe", RECIPE, "--method", method, *common_train_args(args.threads),
                        "--init-from", str(pretrained), "--epochs", str(args.finetune_epochs),
                        "--lr", str(args.finetune_lr), "--warmup-steps", "50", "--warmup-frac", "0",
                        "--batch-size", "128", "--outlier-batch-size", "128", "--upload-augment-p", "1",
                        *model_kwargs_args(args)], log)


def init_from_chain(run: Path) -> list[Path]:
    """The runs `run` was started from (`--init-from`, followed back), oldest first, as far as they are still on
    disk with their config and summary: e.g. the GPU recipe's pretrain and aloe stages for its restart."""
    chain: list[Path] = []
    seen = {run.resolve()}
    while True:
        source = json.loads((run / "config.json").read_text())["train"].get("init_from")
        if not source:
            return chain
        run = Path(source).expanduser().resolve()
        if run in seen or not ((run / "config.json").is_file() and (run / "summary.json").is_file()):
            return chain
        seen.add(run)
        chain.insert(0, run)


def evaluate_run(run: Path, out: Path, attacks: str, samples: int, log: Path, scores: str = "msp,energy",
                 extra: list[str] | None = None) -> float:
    """`oodguard evaluate` a run on the recipe's OOD sets into `out`; wall seconds."""
    ood = [arg for name in OOD_SETS for arg in ("--ood", name)]
    return run_oodguard(["evaluate", str(run), *ood, "--attack", attacks, "--scores", scores,
                         "--max-samples", str(samples), "--out", str(out), *(extra or [])], log)


def calibrate(run: Path, staging: Path, args: argparse.Namespace, log: Path) -> float:
    return run_oodguard(["calibrate", str(run), "--score", "auto", "--auto-samples", str(args.auto_samples),
                         "--max-samples", str(args.eval_samples), "--name", "default", "--version", args.version,
                         "--out", str(staging), "--no-tarball"], log)


def install_bundle(staging: Path, bundle: Path, log: Path) -> None:
    """Verify the staged bundle, replace `bundle` with it, verify the copy."""
    run_oodguard(["bundle", "verify", str(staging)], log)
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(staging, bundle)
    run_oodguard(["bundle", "verify", str(bundle)], log)


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths takes three comma-separated integers, got {text!r}") from None
    if len(widths) != 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--widths takes three positive integers (block 1, 2, 3), got {text!r}")
    return widths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path.home() / "oodguard-runs" / "default"), help="Directory for the runs.")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--pretrain-lr", type=float, default=None,
                    help="Pre-training learning rate (default: the airbench recipe's 1.27; airbench95's widths: 1.1).")
    ap.add_argument("--widths", type=_widths, default=None,
                    help="The airbench network's three block widths, e.g. 128,384,384 (airbench95's; default "
                         "64,256,256), used by every stage.")
    ap.add_argument("--restart-epochs", type=int, default=20,
                    help="Warm-restart epochs after pre-training (0: none).")
    ap.add_argument("--restart-lr", type=float, default=0.6)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=0.05)
    ap.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=True,
                    help="Serve the model with test-time flip averaging (in its graph; every stage's model evaluates "
                         "that way, training unchanged).")
    ap.add_argument("--methods", default="aloe", help="Fine-tuning methods; the first is shipped.")
    ap.add_argument("--eval-samples", type=int, default=2000, help="Images per set, clean and shifted.")
    ap.add_argument("--paper-samples", type=int, default=1000, help="Images per side under the paper attack.")
    ap.add_argument("--strong-samples", type=int, default=200, help="Images per side under the strong attack (0: not run).")
    ap.add_argument("--auto-samples", type=int, default=300, help="Images per side attacked by --score auto.")
    ap.add_argument("--bundle", default="models/default", help="Where the shipped bundle goes.")
    ap.add_argument("--version", default=time.strftime("%Y%m%d", time.gmtime()), help="Bundle version.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetuned", default=None,
                    help="Ship this already fine-tuned run (e.g. rebuilt from a bundle by scripts/run_from_bundle.py, "
                         "or scripts/train_gpu.sh's restart stage) instead of training: steps 3-5 only, on it; the "
                         "results record it and the runs it was started from (--init-from, while on disk).")
    args = ap.parse_args()

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_default.log"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    timings: dict[str, float] = {}
    runs: dict[str, Path] = {}  # every run whose config and summary go into results-default.json, in stage order

    if args.finetuned:
        shipped = Path(args.finetuned).expanduser().resolve()
        if not (shipped / "checkpoints" / "last.pt").is_file():
            sys.exit(f"--finetuned {shipped}: not a run directory (no checkpoints/last.pt)")
        # the stages it was trained from first (their configs and training hours belong to the shipped model's
        # record too), then the shipped fine-tune under its method's name, as when trained here
        for ancestor in init_from_chain(shipped):
            key = ancestor.name if ancestor.name not in (*runs, methods[0]) else f"{ancestor.parent.name}/{ancestor.name}"
            runs[key] = ancestor
        runs[methods[0]] = shipped
    else:
        pre = runs["pretrain"] = out / "pretrain"
        timings["pretrain"] = pretrain_run(pre, args, log)
        if args.restart_epochs > 0:
            restarted = runs["pretrain_restart"] = out / "pretrain_restart"
            timings["pretrain_restart"] = restart_run(pre, restarted, args, log)
            pre = restarted
        for method in methods:
            runs[method] = out / method
            timings[f"finetune_{method}"] = finetune_run(method, pre, runs[method], args, log)
        shipped = runs[methods[0]]

    staging = out / "bundle"
    timings["export"] = run_oodguard(["export", str(shipped), "--scores", "msp,energy,mahalanobis"], log)
    timings["select_and_calibrate"] = calibrate(shipped, staging, args, log)
    served = json.loads((staging / "manifest.json").read_text())["score"]["name"]
    attacks = "none,paper" + (",strong" if args.strong_samples > 0 else "")
    samples = f"paper={args.paper_samples}" + (f",strong={args.strong_samples}" if args.strong_samples > 0 else "")
    timings["evaluate"] = evaluate_run(shipped, shipped / "eval", attacks, args.eval_samples, log, scores=served,
                                       extra=["--attack-samples", samples, "--attack-sets", "tinyimagenet",
                                              "--shifts", "all"])
    timings["calibrate"] = calibrate(shipped, staging, args, log)  # reuses the score choice; adds attacked FPRs
    bundle = ROOT / args.bundle
    install_bundle(staging, bundle, log)

    results = {"recipe": vars(args), "timings_s": timings, "runs": {}}
    for name, run in runs.items():
        # each stage's own config (epochs or time budget, device): a stage trained by scripts/train_gpu.sh
        # says so here, whatever this invocation's flags were
        results["runs"][name] = {"train_end": json.loads((run / "summary.json").read_text()),
                                 "config": json.loads((run / "config.json").read_text())}
        if (run / "eval" / "eval.json").is_file():
            results["runs"][name]["eval"] = json.loads((run / "eval" / "eval.json").read_text())
    results["bundle_metrics"] = json.loads((bundle / "manifest.json").read_text())["metrics"]
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "results-default.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    train_s = sum(r["train_end"].get("train_seconds", 0.0) for r in results["runs"].values())
    print(f"training {train_s / 3600:.2f} h (pretrain + fine-tune, as logged); this invocation "
          f"{sum(timings.values()) / 60:.1f} min -> {bundle}")


if __name__ == "__main__":
    main()
