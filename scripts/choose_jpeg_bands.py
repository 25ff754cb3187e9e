"""Choose the JPEG quality bands of a bundle's upload-form groups, on validation data (`oodguard calibrate --jpeg-bands`).

A form-conditional bundle holds one threshold per group (service/upload_form.py). A band of JPEG qualities
shares one threshold, calibrated on a uniform mix of its qualities, so it keeps the promised acceptance rate
for every quality in it only if the served score treats those qualities alike. This script measures how it
does: `--n` calibration-split images (never trained on) uploaded as a JPEG of every quality 1-100 and decoded
as the service decodes them, scored by the run's model (`--score`); `--n-out` held-out-class outliers the same
way, for the FPR each band lets through. Then, from quality 1 upward, a band grows while every quality in it
keeps an acceptance within `--tolerance` points of the target at the band's pooled threshold (the band that
holds the stored files' quality, 75, is pooled half with the stored images, as calibrate renders it).

    python scripts/choose_jpeg_bands.py ~/oodguard-runs/q30/full --n 1000 --n-out 500 \\
        --out docs/bench/jpeg_bands.json       # prints the --jpeg-bands argument

Validation data only (the calibration split, the held-out outlier classes): never the test sets.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from form_validation import validation_images  # noqa: E402  (the validation subsets every script measures)

QUALITIES = range(1, 101)


def jpeg_upload(images: np.ndarray, quality: int, spec) -> np.ndarray:
    """Each image uploaded as a JPEG of `quality` (Pillow's default 4:2:0), decoded as the service does."""
    from oodguard.service.preprocess import decode_image

    out = np.empty_like(images)
    for i, pixels in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        out[i] = decode_image(buf.getvalue(), spec)
    return out


def pooled_threshold(parts: list[np.ndarray], weights: list[float], target: float) -> float:
    """The (1 - target) quantile of a weighted mix of score arrays (each part's images share its weight)."""
    scores = np.concatenate(parts)
    w = np.concatenate([np.full(len(p), wt / len(p)) for p, wt in zip(parts, weights)])
    order = np.argsort(scores, kind="stable")
    return float(scores[order][np.searchsorted(np.cumsum(w[order]), 1.0 - target)])


def band_threshold(s_in: dict, lo: int, hi: int, stored_quality: int, target: float) -> float:
    qualities = list(range(lo, hi + 1))
    parts, weights = [s_in[q] for q in qualities], [1.0 / len(qualities)] * len(qualities)
    if lo <= stored_quality <= hi:  # calibrate renders this band half as stored
        parts, weights = parts + [s_in["stored"]], [w / 2 for w in weights] + [0.5]
    return pooled_threshold(parts, weights, target)


def band_members(lo: int, hi: int, stored_quality: int) -> list:
    return list(range(lo, hi + 1)) + (["stored"] if lo <= stored_quality <= hi else [])


def choose_bands(s_in: dict, tolerance: float, stored_quality: int, target: float) -> list[tuple[int, int]]:
    """Greedy from quality 1: grow a band while every member's acceptance stays within `tolerance` of target."""
    def holds(lo: int, hi: int) -> bool:
        thr = band_threshold(s_in, lo, hi, stored_quality, target)
        return all(abs(float(np.mean(s_in[q] >= thr)) - target) <= tolerance / 100
                   for q in band_members(lo, hi, stored_quality))

    bands, lo = [], 1
    while lo <= 100:
        hi = lo
        while hi < 100 and holds(lo, hi + 1):
            hi += 1
        bands.append((lo, hi))
        lo = hi + 1
    return bands


def main() -> None:
    from oodguard.service.manifest import InputSpec
    from oodguard.service.upload_form import DEFAULT_JPEG_BANDS, V1_JPEG_BANDS
    from oodguard.training import scores as score_fns
    from oodguard.training.data import iterate_batches
    from oodguard.service.preprocess import TRAINING_RESIZE
    from oodguard.training.shifts import STORED_QUALITY

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="Run directory (trained with held-out outlier classes).")
    ap.add_argument("--n", type=int, default=1000, help="Calibration-split images (seeded subset).")
    ap.add_argument("--n-out", type=int, default=500, help="Held-out-class outlier images (seeded subset).")
    ap.add_argument("--score", default="energy", choices=["msp", "energy"])
    ap.add_argument("--target", type=float, default=0.95, help="The operating point's target TPR.")
    ap.add_argument("--tolerance", type=float, default=1.5, help="Points of acceptance a quality may differ by.")
    ap.add_argument("--out", type=Path, default=None, help="Also write every number to this JSON file.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    score_fn = getattr(score_fns, args.score)
    model, cal, out = validation_images(args.run, max(args.n, args.n_out), "choose_jpeg_bands.py")
    cal, out = cal[:args.n], out[:args.n_out]
    spec = InputSpec(height=cal.shape[1], width=cal.shape[2], resize=TRAINING_RESIZE)

    def scores(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([score_fn(model(x)).numpy() for _, x in iterate_batches(images, 250)])

    s_in, s_out = {"stored": scores(cal)}, {"stored": scores(out)}
    for q in QUALITIES:
        s_in[q], s_out[q] = scores(jpeg_upload(cal, q, spec)), scores(jpeg_upload(out, q, spec))
        print(f"quality {q:3d}: in-distribution 5% quantile {np.quantile(s_in[q], 0.05):7.3f}", flush=True)

    bands = choose_bands(s_in, args.tolerance, STORED_QUALITY, args.target)

    def rows(scheme) -> list[dict]:
        table = []
        for lo, hi in scheme:
            thr = band_threshold(s_in, lo, hi, STORED_QUALITY, args.target)
            for q in band_members(lo, hi, STORED_QUALITY):
                table.append({"quality": q, "band": [lo, hi], "accept": float(np.mean(s_in[q] >= thr)),
                              "fpr": float(np.mean(s_out[q] >= thr))})
        return table

    chosen = ",".join(f"{lo}-{hi}" for lo, hi in bands)
    result = {"run": str(args.run), "score": args.score, "n_in": len(cal), "n_out": len(out), "target": args.target,
              "tolerance_points": args.tolerance, "stored_quality": STORED_QUALITY, "bands": bands,
              "per_quality": {"chosen": rows(bands), "default": rows(DEFAULT_JPEG_BANDS),
                              # v1: qualities above 65 were `native`, half stored, half re-encoded at 66-100
                              "v1": rows(V1_JPEG_BANDS) + rows([(66, 100)])}}
    for name in ("chosen", "default", "v1"):
        table = result["per_quality"][name]
        acc = [r["accept"] for r in table]
        print(f"{name:>8}: acceptance per quality {100 * min(acc):5.1f}-{100 * max(acc):5.1f}%, "
              f"worst FPR {100 * max(r['fpr'] for r in table):5.1f}%")
    print(f"--jpeg-bands {chosen}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
