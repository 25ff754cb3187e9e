"""The robustness comparison behind docs/results.md: msp / oe / adv / aoe / aloe, same recipe and budget.

Reuses `scripts/train_default.py`'s fine-tuning recipe (same pretrained fast_cnn, same seed, data order, epochs
and lr; only the fine-tuning loss differs) and adds what the shipped bundle does not need:

1. fine-tune every method in --methods from RUN_DIR/pretrain (a run that completed is kept and one that was
   interrupted resumes, so `make train-default` followed by this script trains each model once, and the
   script can be re-run after it was stopped);
2. `oodguard evaluate` each run clean + `paper` attack (ε = 1/255) on --eval-samples images per set
   (skipped where RUN/eval/eval.json exists), and clean + `strong` attack (ε = 8/255, 100 steps, random
   start) on --strong-samples images per set into RUN/eval_strong (100 PGD steps per image and score
   cost 10x the paper protocol, hence the smaller subset);
3. write docs/results-robustness.json (every eval.json + training summary + timings) and copy the
   score histograms (clean vs attacked) into docs/results/.

Then: python scripts/render_results.py docs/results-robustness.json

Usage: python scripts/robustness_report.py [--out runs/default] [--methods msp,oe,adv,aoe,aloe]

Training and evaluation use CUDA when it is available (`--device auto`); docs/results.md's report ran on one
GPU with --out pointing at the GPU pre-training run, --finetune-epochs 3 --finetune-lr 0.03 --eval-samples 1000.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from train_default import ROOT, evaluate_run, finetune_run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/default", help="Run directory of `make train-default` (has pretrain/).")
    ap.add_argument("--methods", default="msp,oe,adv,aoe,aloe")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--eval-samples", type=int, default=2000, help="Images per set, clean + paper attack.")
    ap.add_argument("--strong-samples", type=int, default=500, help="Images per set, clean + strong attack.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default="docs/results-robustness.json")
    args = ap.parse_args()

    out = ROOT / args.out
    pre = out / "pretrain"
    if not (pre / "checkpoints" / "last.pt").exists():
        raise SystemExit(f"{pre} has no checkpoint: run `make train-default` first (it pretrains the shared weights)")
    log = out / "robustness.log"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    timings: dict[str, float] = {}
    for method in methods:
        run = out / method
        # finetune_run keeps a completed run and resumes an interrupted one (a checkpoint alone is not a finished run)
        seconds = finetune_run(method, pre, run, args, log)
        if seconds:
            timings[f"finetune_{method}"] = seconds
        if not (run / "eval" / "eval.json").exists():
            # no upload-form shifts here (the shipped model's evaluation has them): the comparison is of attacks
            timings[f"evaluate_{method}"] = evaluate_run(run, run / "eval", "none,paper", args.eval_samples, log,
                                                         extra=["--shifts", "none"])
        if not (run / "eval_strong" / "eval.json").exists():
            timings[f"evaluate_strong_{method}"] = evaluate_run(run, run / "eval_strong", "none,strong",
                                                             args.strong_samples, log, extra=["--shifts", "none"])

    results: dict = {"recipe": vars(args), "timings_s": timings, "runs": {}}
    plots = ROOT / "docs" / "results"
    plots.mkdir(parents=True, exist_ok=True)
    for method in methods:
        run = out / method
        results["runs"][method] = {
            "config": json.loads((run / "config.json").read_text()),
            "train_end": json.loads((run / "log.jsonl").read_text().strip().splitlines()[-1]),
            "eval": json.loads((run / "eval" / "eval.json").read_text()),
            "eval_strong": json.loads((run / "eval_strong" / "eval.json").read_text()),
        }
        for sub, tag in (("eval", "paper"), ("eval_strong", "strong")):
            for score in ("msp", "energy"):
                src = run / sub / f"hist_{score}.png"
                if src.exists():
                    shutil.copyfile(src, plots / f"hist_{method}_{score}_{tag}.png")
    results["runs"]["pretrain"] = {"train_end": json.loads((pre / "log.jsonl").read_text().strip().splitlines()[-1])}
    target = ROOT / args.results
    target.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {target.relative_to(ROOT)} and {plots.relative_to(ROOT)}/hist_*.png at {time.strftime('%H:%M')}")


if __name__ == "__main__":
    main()
