"""Check the example images against a bundle, and pick new ones where they no longer behave as documented.

examples/README.md promises: each `cifar_<class>.jpg` (original CIFAR-10 test JPEG bytes) is classified as
<class> and accepted at `tpr95`, except `cifar_cat.jpg`, classified as a cat and rejected; every `ood_*`
image is rejected. A new default model can break a promise for a given image; this script asks a real
app (the service's own decode and decision path) about each example, keeps those that still behave, and
replaces the others by the first image of a seeded shuffle of the test set that does. It prints the
p-values README.md quotes.

    python scripts/pick_examples.py [--bundle models/default] [--write]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REJECTED_CIFAR = "cat"  # the one CIFAR-10 example shown rejected (examples/README.md)


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(jpeg bytes, offsets, labels, class names) of a shared dataset file (../shared/datasets/README.md)."""
    d = np.load(path, allow_pickle=False)
    classes = [str(c) for c in d["classes"]] if "classes" in d.files else []
    labels = d["labels"] if "labels" in d.files else np.zeros(len(d["offsets"]) - 1, np.int64)
    return d["jpeg"], d["offsets"], labels, classes


def main() -> None:
    from fastapi.testclient import TestClient

    from oodguard.service.app import create_app
    from oodguard.service.settings import Settings
    from oodguard.training.data import default_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="Replace the examples that no longer behave.")
    args = ap.parse_args()

    for key in [k for k in os.environ if k.startswith("OODGUARD_") and k != "OODGUARD_CACHE_DIR"]:
        os.environ.pop(key)
    with TestClient(create_app(Settings(bundle=args.bundle, decode_threads=1, request_timeout_s=60.0))) as client:
        def ask(data: bytes) -> dict:
            resp = client.post("/v1/predict", files={"file": ("x", data, "application/octet-stream")})
            resp.raise_for_status()
            return resp.json()["predictions"][0]

        jpeg, offsets, labels, classes = _npz(Path(args.data_dir) / "cifar10_test.npz")
        order = np.random.default_rng(args.seed).permutation(len(labels))
        for cls_index, cls in enumerate(classes):
            path = EXAMPLES / f"cifar_{cls}.jpg"
            want = "reject" if cls == REJECTED_CIFAR else "accept"

            def behaves(p: dict) -> bool:
                return p["label"] == cls and p["decision"] == want

            pred = ask(path.read_bytes()) if path.is_file() else None
            if pred is not None and behaves(pred):
                print(f"{path.name}: kept ({pred['decision']}, p-value {pred['p_value']:.4f})")
                continue
            for i in order:
                if int(labels[i]) != cls_index:
                    continue
                data = jpeg[offsets[i]:offsets[i + 1]].tobytes()
                pred = ask(data)
                if behaves(pred):
                    print(f"{path.name}: {'replaced by' if args.write else 'would be'} test image {i} "
                          f"({pred['decision']}, p-value {pred['p_value']:.4f})")
                    if args.write:
                        path.write_bytes(data)
                    break
        ood_jpeg, ood_offsets, _, _ = _npz(Path(args.data_dir) / "tinyimagenet_test.npz")
        candidates = iter(np.random.default_rng(args.seed).permutation(len(ood_offsets) - 1))
        for path in sorted(EXAMPLES.glob("ood_*")):
            pred = ask(path.read_bytes())
            if pred["decision"] == "reject":
                print(f"{path.name}: kept (reject, p-value {pred['p_value']:.4f})")
                continue
            if path.suffix != ".jpg":
                raise SystemExit(f"{path.name} is accepted and is not a Tiny-ImageNet file to re-pick")
            for i in candidates:
                data = ood_jpeg[ood_offsets[i]:ood_offsets[i + 1]].tobytes()
                pred = ask(data)
                if pred["decision"] == "reject":
                    print(f"{path.name}: {'replaced by' if args.write else 'would be'} Tiny-ImageNet test image {i} "
                          f"(reject, p-value {pred['p_value']:.4f})")
                    if args.write:
                        path.write_bytes(data)
                    break


if __name__ == "__main__":
    main()
