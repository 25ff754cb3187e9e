"""What the serving benchmark serves: bundles (with their training runs) and the uploaded image.

Bundle specs (`bench/serve.py --bundles ...`, comma-separated):
  default          models/default; its run directory from the manifest's lineage (runs/default/aloe)
  resnet18         a CIFAR ResNet-18 bundle built once into runs/bench/resnet18 (see build_resnet18)
  PATH[:RUN_DIR]   any bundle; the run directory (for the torch peers) from the manifest unless given

The torch peers (hand-written FastAPI + torch, TorchServe) need the run's checkpoint. When the run
directory is missing they are reported "not run"; when its checkpoint is not the one the bundle was
exported from (sha256 in the manifest's lineage) they run anyway and the result says so — the
architecture, not the weights, sets the speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESNET18_RUN = "resnet18"
RESNET18_NOTE = ("ResNet-18 bundle: CIFAR ResNet-18 (11.2 M parameters) trained for ONE step on 256 images (msp), "
                 "exported with msp+energy and calibrated on 500 held-out images: its accuracy is chance, its "
                 "speed is a trained ResNet-18's (same graph, same operators, same shapes)")


@dataclass
class BenchBundle:
    name: str  # the key in the report
    path: Path  # bundle directory
    run_dir: Path | None  # training run (checkpoint) for the torch peers, None when unknown or missing
    description: str
    checkpoint_matches: bool | None = None  # run's last.pt sha256 == the manifest's lineage checkpoint_sha256

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _describe(path: Path, run_dir: Path | None, extra: str = "") -> tuple[str, bool | None]:
    m = json.loads((path / "manifest.json").read_text())
    training = m.get("training") or {}
    model_kb = (path / "model.onnx").stat().st_size // 1024
    text = (f"Bundle `{_rel(path)}`: {m['name']} {m['version']} ({training.get('model', '?')}, "
            f"{training.get('method', '?')}; model.onnx {model_kb:,} KiB, outputs {', '.join(m.get('outputs', []))}).")
    matches = None
    ckpt = None if run_dir is None else run_dir / "checkpoints" / "last.pt"
    if ckpt is not None and ckpt.is_file():
        expected = (m.get("lineage") or {}).get("checkpoint_sha256")
        matches = None if not expected else _sha256(ckpt) == expected
        text += f" Torch peers load `{_rel(ckpt)}`" + (
            "." if matches is not False else " — NOT the checkpoint this bundle was exported from (same architecture).")
    if extra:
        text += " " + extra
    return text, matches


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _run_dir_from_manifest(bundle: Path) -> Path | None:
    lineage = json.loads((bundle / "manifest.json").read_text()).get("lineage") or {}
    run = lineage.get("run_dir")
    if not run:
        return None
    p = Path(run)
    return p if p.is_absolute() else REPO / p


def resolve_bundle(spec: str, cache_dir: Path, threads: int | None = None) -> BenchBundle:
    """A --bundles entry -> BenchBundle (building the ResNet-18 bundle when asked and missing)."""
    if spec == "default":
        name, path, run = "default", REPO / "models" / "default", None
    elif spec == RESNET18_RUN:
        path = build_resnet18(cache_dir / RESNET18_RUN, threads=threads)
        name, run = "resnet18", cache_dir / RESNET18_RUN
    else:
        raw_path, _, raw_run = spec.partition(":")
        path = Path(raw_path)
        name, run = path.name if path.name != "bundle" else path.parent.name, Path(raw_run) if raw_run else None
    if not (path / "manifest.json").is_file() or not (path / "model.onnx").is_file():
        hint = " (build it with `make train-default`, or pass --bundles BUNDLE_DIR[:RUN_DIR])" if spec == "default" else ""
        raise SystemExit(f"error: {path} is not a bundle (no manifest.json / model.onnx){hint}")
    run = run or _run_dir_from_manifest(path)
    if run is not None and not (run / "checkpoints" / "last.pt").is_file():
        log.warning("%s: run directory %s has no checkpoints/last.pt; torch peers will not run", name, run)
        run = None
    text, matches = _describe(path, run, RESNET18_NOTE + "." if spec == RESNET18_RUN else "")
    return BenchBundle(name=name, path=path, run_dir=run, description=text, checkpoint_matches=matches)


def build_resnet18(run_dir: Path, threads: int | None = None) -> Path:
    """The cheapest honest ResNet-18 bundle, with the real CLI: train 1 step, export, calibrate (~1 min once).

    Weights do not change serving speed, so one SGD step on 256 images stands in for a trained
    network: the exported graph (convolutions, BN folded, scores) is the same as a trained one's.
    The result is cached: a second call returns at once.
    """
    bundle = run_dir / "bundle"
    if (bundle / "manifest.json").is_file() and (bundle / "model.onnx").is_file():
        return bundle
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    oodguard = [sys.executable, "-m", "oodguard.cli"]
    steps = [
        [*oodguard, "train", "--method", "msp", "--model", "resnet18", "--max-steps", "1", "--subset", "256",
         "--calibration-size", "500", "--no-eval-test", "--no-progress", "--overwrite", "--out", str(run_dir),
         *(["--threads", str(threads)] if threads else [])],
        [*oodguard, "export", str(run_dir), "--scores", "msp,energy"],
        [*oodguard, "calibrate", str(run_dir), "--ood", "gaussian", "--max-samples", "256", "--no-tarball",
         "--name", "resnet18-bench", "--version", "1", "--out", str(bundle)],
    ]
    t0 = time.perf_counter()
    for cmd in steps:
        log.info("building the ResNet-18 bundle: %s", " ".join(cmd[2:6]))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: building the ResNet-18 bundle failed at `{' '.join(cmd[3:5])}`:\n"
                             f"{done.stderr[-3000:]}")
    log.info("ResNet-18 bundle built in %.0f s: %s", time.perf_counter() - t0, bundle)
    return bundle


def data_dir() -> Path:
    return Path(os.environ.get("OODGUARD_DATA_DIR") or REPO.parent / "shared" / "datasets")


def load_image(path: str | None = None) -> tuple[bytes, str]:
    """The one CIFAR-size JPEG every request uploads, and where it came from.

    The original JPEG bytes of a CIFAR-10 test image, read straight from the dataset npz (format in
    ../shared/datasets/README.md: `jpeg` bytes + `offsets`), so the upload is a real 32x32 JPEG, not a
    re-encoded array. Falls back to examples/*.jpg, then to a synthetic JPEG.
    """
    if path:
        return Path(path).read_bytes(), path
    npz = data_dir() / "cifar10_test.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as d:
            offsets = d["offsets"]
            return d["jpeg"][offsets[0]:offsets[1]].tobytes(), f"{npz.name} image 0 (original JPEG bytes)"
    examples = sorted((REPO / "examples").glob("*.jp*g"))
    if examples:
        return examples[0].read_bytes(), _rel(examples[0])
    import io

    from PIL import Image

    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "synthetic 32x32 JPEG (no dataset found)"
