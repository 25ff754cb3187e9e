"""Accept rate per upload form, measured through a real `oodguard serve`.

The bundle promises that its `tpr95` operating point accepts ~95% of in-distribution images. Users do
not upload the dataset's 32x32 JPEGs: they send PNGs, JPEGs of other qualities, bigger and non-square
images. This sends the same CIFAR-10 test images (and Tiny-ImageNet test images, OOD) in every form of
`training.shifts.FORMS` to `POST /v1/predict` and counts the decisions: the realised TPR per form (the
target band is 93-97%) and the FPR on the OOD images in the same form. "stored" sends the files' own
JPEG bytes unchanged.

    python bench/upload_forms.py --bundle models/default --n 1000 --out docs/bench/upload_forms.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve_process import start_oodguard, stop  # noqa: E402

from oodguard.training.shifts import FORMS, encode_form  # noqa: E402  (PIL + the service decoder; no torch)

BATCH = 16  # images per request (repeated `files` fields)


def _npz_images(path: Path, n: int, seed: int) -> list[bytes]:
    """The stored JPEG bytes of a seeded subset of `n` images of a shared npz file."""
    with np.load(path, allow_pickle=False) as d:
        jpeg, offsets = d["jpeg"], d["offsets"]
        count = len(offsets) - 1
        idx = np.sort(np.random.default_rng(seed).permutation(count)[:n])
        return [jpeg[offsets[i]:offsets[i + 1]].tobytes() for i in idx]


def _upload(stored: bytes, form: str) -> tuple[bytes, str]:
    if form == "stored":
        return stored, "image/jpeg"
    pixels = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
    data = encode_form(pixels, form)
    return data, "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"


def _accept_rate(client: httpx.Client, url: str, blobs: list[bytes], form: str) -> tuple[float, int, dict[str, int]]:
    """(accepted fraction, images, {upload-form group the service read: images}; empty without form groups)."""
    accepted = total = 0
    groups: dict[str, int] = {}
    for start in range(0, len(blobs), BATCH):
        files = [("files", (f"{i}", *_upload(b, form))) for i, b in enumerate(blobs[start:start + BATCH])]
        r = client.post(f"{url}/v1/predict", files=files)
        r.raise_for_status()
        predictions = r.json()["predictions"]
        accepted += sum(p["decision"] == "accept" for p in predictions)
        total += len(predictions)
        for p in predictions:
            if "upload_form" in p:
                groups[p["upload_form"]] = groups.get(p["upload_form"], 0) + 1
    return accepted / total, total, groups


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--n", type=int, default=1000, help="Images per form and side.")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results file.")
    args = ap.parse_args()

    data = Path(args.data_dir)
    in_blobs = _npz_images(data / "cifar10_test.npz", args.n, args.seed)
    ood_blobs = _npz_images(data / "tinyimagenet_test.npz", args.n, args.seed + 1)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    log_path = Path("/tmp") / f"upload_forms_{int(time.time())}.log"
    proc, url = start_oodguard(["--bundle", args.bundle], in_blobs[0], log_path)
    rows = {}
    try:
        with httpx.Client(timeout=60) as client:
            for form in forms:
                tpr, n_in, groups = _accept_rate(client, url, in_blobs, form)
                fpr, n_out, _ = _accept_rate(client, url, ood_blobs, form)
                rows[form] = {"realised_tpr": tpr, "tpr_ci95": _wilson(tpr, n_in), "fpr_tinyimagenet": fpr,
                              "n_in": n_in, "n_out": n_out, "upload_form_groups": groups}
                print(f"{form:12s} TPR {100 * tpr:5.1f}% (95% CI {100 * rows[form]['tpr_ci95'][0]:.1f}-"
                      f"{100 * rows[form]['tpr_ci95'][1]:.1f})   FPR tinyimagenet {100 * fpr:5.1f}%   n={n_in}+{n_out}"
                      + (f"   group {', '.join(groups)}" if groups else ""), flush=True)
    finally:
        stop(proc)
    result = {"bundle": f"{manifest['name']}:{manifest['version']}", "score": manifest["score"]["name"],
              "operating_point": manifest["default_operating_point"], "through": "POST /v1/predict on oodguard serve",
              "in_distribution": "cifar10_test.npz", "ood": "tinyimagenet_test.npz", "forms": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
