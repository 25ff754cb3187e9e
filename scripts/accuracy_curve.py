"""Accuracy vs training hours of the default model: pre-training, then fine-tuning, epoch by epoch.

Reads each run's log.jsonl (training seconds at the end of every epoch) and its per-epoch checkpoints
(`--keep-epoch-checkpoints`: checkpoints/epoch_XXX.pt), measures CIFAR-10 test accuracy of every epoch's
weights on a seeded subset (and of last.pt on the whole test split), and writes a JSON file and a PNG.
The fine-tuning run's hours continue from the end of the pre-training run it started from.

    python scripts/accuracy_curve.py ~/oodguard-runs/default/pretrain ~/oodguard-runs/default/aloe \
        --out docs/bench/accuracy_curve.json --png docs/bench/accuracy_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _epochs(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "event" not in r and isinstance(r.get("epoch"), int)]


def main() -> None:
    from oodguard.training.architectures import create_model
    from oodguard.training.data import load_in_distribution
    from oodguard.training.loop_parts import accuracy
    from oodguard.training.run_dir import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="Run directories in training order (pre-training first).")
    ap.add_argument("--replot", action="store_true", help="Only redraw --png from an existing --out JSON.")
    ap.add_argument("--n", type=int, default=2000, help="Test images per epoch checkpoint (seeded subset).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.replot:
        if not args.png or not args.out.is_file():
            ap.error("--replot needs an existing --out JSON and --png")
        data = json.loads(args.out.read_text())
        plot(data["points"], data["subset"], args.png, data.get("model", "model"))
        print(f"wrote {args.png}")
        return
    if not args.runs:
        ap.error("give the run directories (or --replot)")
    torch.set_num_threads(args.threads)

    test = load_in_distribution("cifar10", "test")
    idx = np.sort(np.random.default_rng(0).permutation(len(test))[: args.n])
    points, offset_h, model_name = [], 0.0, None
    for run in args.runs:
        run = run.expanduser()
        for rec in _epochs(run):
            ckpt = run / "checkpoints" / f"epoch_{rec['epoch']:03d}.pt"
            if not ckpt.is_file():
                continue
            state = load_checkpoint(ckpt, map_location="cpu")
            model = create_model(**state["model_config"])
            model_name = model_name or state["model_config"]["name"]
            model.load_state_dict(state["model"])
            acc = accuracy(model, test.images[idx], test.labels[idx], torch.device("cpu"))
            points.append({"run": run.name, "epoch": rec["epoch"], "hours": offset_h + rec["time"] / 3600,
                           "test_accuracy_subset": acc, "train_accuracy": rec["train_acc"]})
            print(f"{run.name} epoch {rec['epoch']:3d}  {points[-1]['hours']:.2f} h  test {100 * acc:.2f}% "
                  f"(n={len(idx)})  train {100 * rec['train_acc']:.2f}%", flush=True)
        summary = json.loads((run / "summary.json").read_text())
        offset_h += _epochs(run)[-1]["time"] / 3600  # cumulative over resumed invocations (summary's is the last one's)
        final = summary.get("test_accuracy")
        if final is not None:
            points.append({"run": run.name, "epoch": "final", "hours": offset_h, "test_accuracy_full": final})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model_name, "subset": int(len(idx)), "points": points}, indent=1) + "\n")
    if args.png:
        plot(points, len(idx), args.png, model_name or "model")
        print(f"wrote {args.out} and {args.png}")


def plot(points: list[dict], n: int, png: Path, model_name: str) -> None:
    """Test accuracy per kept epoch (subset) and at the end of each run (full test split) vs hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(p["run"] for p in points):
        xs = [p["hours"] for p in points if p["run"] == name and "test_accuracy_subset" in p]
        ys = [100 * p["test_accuracy_subset"] for p in points if p["run"] == name and "test_accuracy_subset" in p]
        ax.plot(xs, ys, marker="o", label=f"{name} (test subset, n={n})")
    finals = [p for p in points if "test_accuracy_full" in p]
    ax.scatter([p["hours"] for p in finals], [100 * p["test_accuracy_full"] for p in finals], marker="*", s=120,
               color="black", zorder=3, label="end of run (full test split)")
    ax.axhline(92, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="training hours on 2 CPU cores", ylabel="CIFAR-10 test accuracy (%)",
           title=f"{model_name}: accuracy vs training hours\n(runs in training order; dotted: the 92% target)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
