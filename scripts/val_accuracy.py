"""Validation accuracy of trained runs: the calibration split (never trained on), with and without flips.

Recipe choices (augmentation strength, epochs, flip averaging) are made on these numbers, not on the test
set; `--test` adds the CIFAR-10 test accuracy for reporting. Each run's final weights (checkpoints/last.pt)
are measured on the images of its own calibration split (split.json), one view and flip-averaged;
`--translate` adds airbench94's test-time augmentation level 2 (the flip-averaged prediction weighted 1/2,
the two one-pixel diagonal translations, reflect-padded and flip-averaged, 1/4 each: six views, three times
the flip-averaged cost), measured outside the model (the served graph has no such option).

    python scripts/val_accuracy.py ~/oodguard-runs/exp/ab_p0 ~/oodguard-runs/default/pretrain --test \
        --out docs/bench/val_accuracy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from oodguard.training.loop_parts import accuracy
    from oodguard.training.run_dir import RunData, RunDirError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="Run directories.")
    ap.add_argument("--test", action="store_true", help="Also measure CIFAR-10 test accuracy (reporting only).")
    ap.add_argument("--translate", action="store_true", help="Also airbench's flip + translate test-time views.")
    ap.add_argument("--out", type=Path, default=None, help="Write the numbers to this JSON file too.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    rows = []
    for run_dir in args.runs:
        try:  # the run's own data (its recorded spec, checked against split.json's sha256) and calibration split
            run = RunData.open(run_dir.expanduser())
            model, config = run.load_model()
            cal = run.calibration_set()
            test = run.test_set() if args.test else None
        except RunDirError as e:
            raise SystemExit(f"val_accuracy: {e}") from None
        train_cfg = config.get("train", {})
        row = {"run": str(run_dir), "method": train_cfg.get("method"), "model": train_cfg.get("model"),
               "epochs": train_cfg.get("epochs"), "upload_augment_p": train_cfg.get("upload_augment_p"),
               "validation_images": int(len(cal))}
        for flip in (False, True):
            model.flip_average = flip
            tag = "flip" if flip else "one_view"
            row[f"validation_accuracy_{tag}"] = accuracy(model, cal.images, cal.labels, device)
            if test is not None:
                row[f"test_accuracy_{tag}"] = accuracy(model, test.images, test.labels, device)
        if args.translate:
            model.flip_average = False
            row["validation_accuracy_flip_translate"] = _flip_translate_accuracy(model, cal.images, cal.labels)
        rows.append(row)
        print(f"{run_dir}: validation {100 * row['validation_accuracy_one_view']:.2f}% "
              f"(flip-averaged {100 * row['validation_accuracy_flip']:.2f}%, n={len(cal)})"
              + ("" if test is None else f"  test {100 * row['test_accuracy_one_view']:.2f}% "
                 f"(flip-averaged {100 * row['test_accuracy_flip']:.2f}%, n={len(test.labels)})")
              + ("" if not args.translate else
                 f"  validation flip + translate (6 views) {100 * row['validation_accuracy_flip_translate']:.2f}%"),
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


def _flip_translate_accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    import torch.nn.functional as F

    from oodguard.training.data import iterate_batches

    def both(x):  # the mean softmax of an image and its mirror image
        return (F.softmax(model(x), 1) + F.softmax(model(x.flip(3)), 1)) / 2

    correct = 0
    with torch.no_grad():
        for start, x in iterate_batches(images, 500):
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            h, w = x.shape[-2:]
            p = both(x) / 2 + both(padded[..., :h, :w]) / 4 + both(padded[..., 2:, 2:]) / 4
            correct += int((p.argmax(1).numpy() == labels[start:start + len(x)]).sum())
    return correct / len(images)


if __name__ == "__main__":
    main()
