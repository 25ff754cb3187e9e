"""Assemble a model bundle directory (and its .tar.gz) from its parts, then verify it.

The bundle contract is `oodguard.service.manifest.BundleManifest`; hashing and the final manifest
write are `oodguard.service.bundle.write_manifest`, and the result must pass `verify_bundle` — the
same gate the service applies before serving — before it replaces anything at the destination.

Layout (service/manifest.py): model.onnx, manifest.json, calibration.npy (sorted float32 scores),
golden.npz (`image` + one array per ONNX output, computed with onnxruntime), report/ (copied files).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodguard.service.atomic import atomic_write, umask
from oodguard.service.bundle import VerifyReport, make_session, verify_bundle, write_manifest
from oodguard.service.manifest import CALIBRATION_FILE, GOLDEN_FILE, INPUT_NAME, MODEL_FILE, BundleManifest

log = logging.getLogger(__name__)

REPORT_DIR = "report"


@dataclass
class BuiltBundle:
    bundle_dir: Path
    tarball: Path | None
    manifest: BundleManifest
    verify: VerifyReport


def golden_outputs(onnx_path: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """`image` plus every output of the ONNX graph on it, as golden.npz stores them."""
    session = make_session(onnx_path, intra_op_threads=1, providers=["CPUExecutionProvider"])
    images = np.ascontiguousarray(images, dtype=np.float32)
    names = [o.name for o in session.get_outputs()]
    return {INPUT_NAME: images, **dict(zip(names, session.run(names, {INPUT_NAME: images})))}


def _stage(staging: Path, onnx_path: Path, manifest: BundleManifest, calibration_scores: np.ndarray,
           golden_images: np.ndarray, report_files: dict[str, Path],
           form_calibration_scores: dict[str, np.ndarray] | None = None) -> BundleManifest:
    shutil.copyfile(onnx_path, staging / MODEL_FILE)
    calibration = np.sort(np.asarray(calibration_scores, dtype=np.float32).ravel())
    if calibration.size != manifest.calibration.size:
        raise ValueError(f"manifest says {manifest.calibration.size} calibration scores, got {calibration.size}")
    np.save(staging / CALIBRATION_FILE, calibration, allow_pickle=False)
    forms = manifest.calibration.forms or {}
    if set(forms) != set(form_calibration_scores or {}):
        raise ValueError(f"manifest's form groups {sorted(forms)} != the form calibration scores given "
                         f"{sorted(form_calibration_scores or {})}")
    for group, info in forms.items():
        scores = np.sort(np.asarray(form_calibration_scores[group], dtype=np.float32).ravel())
        if scores.size != info.size:
            raise ValueError(f"manifest says {info.size} calibration scores for form group {group}, got {scores.size}")
        np.save(staging / info.file, scores, allow_pickle=False)
    np.savez(staging / GOLDEN_FILE, **golden_outputs(staging / MODEL_FILE, golden_images))
    for rel, src in report_files.items():
        dest = staging / REPORT_DIR / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"report file name {rel!r} must be a relative path inside report/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return write_manifest(staging, manifest)


def _normalise_permissions(root: Path) -> None:
    """Temp files and dirs are created 0600 / 0700; a bundle is read by whoever serves it (umask applies)."""
    mask = umask()
    root.chmod(0o755 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~mask)


def build_bundle(bundle_dir: str | Path, *, onnx_path: str | Path, manifest: BundleManifest,
                 calibration_scores: np.ndarray, golden_images: np.ndarray,
                 report_files: dict[str, Path] | None = None, tarball: bool = True,
                 form_calibration_scores: dict[str, np.ndarray] | None = None) -> BuiltBundle:
    """Write the bundle into a staging dir, verify it, then move it to `bundle_dir` (replacing an old one).

    `manifest.files` is filled in here. With `tarball`, also writes `<bundle_dir>.tar.gz` (flat: the
    bundle's files at the archive's top level, regular files only).
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=bundle_dir.parent, prefix=f".{bundle_dir.name}.staging-"))
    try:
        final = _stage(staging, Path(onnx_path), manifest, calibration_scores, golden_images, report_files or {},
                       form_calibration_scores)
        _normalise_permissions(staging)
        verify_bundle(staging)  # never move a bundle into place that the service would refuse
        old = None
        if bundle_dir.exists():
            old = bundle_dir.parent / f".{bundle_dir.name}.old-{os.getpid()}"
            os.replace(bundle_dir, old)
        os.replace(staging, bundle_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = verify_bundle(bundle_dir)
    tar_path = write_tarball(bundle_dir) if tarball else None
    log.info("bundle %s:%s written to %s (checks: %s)", final.name, final.version, bundle_dir, ", ".join(report.checks))
    return BuiltBundle(bundle_dir, tar_path, final, report)


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # no local user names / ids / odd permissions in an artefact meant to be shipped
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def write_tarball(bundle_dir: str | Path, tar_path: str | Path | None = None) -> Path:
    """`<bundle_dir>.tar.gz` with the bundle's files at the top level; written atomically."""
    bundle_dir = Path(bundle_dir)
    tar_path = Path(tar_path) if tar_path is not None else bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    with atomic_write(tar_path) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for path in sorted(bundle_dir.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"{path}: bundles hold regular files only")
            tar.add(path, arcname=path.relative_to(bundle_dir).as_posix(), recursive=False, filter=_tar_filter)
    return tar_path
