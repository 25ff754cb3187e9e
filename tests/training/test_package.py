"""Bundle assembly: staging + verify before replacing, golden outputs, the .tar.gz layout."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import onnx
import pytest

from oodguard.service.bundle import BundleError, make_session, verify_bundle
from oodguard.service.manifest import BundleManifest, CalibrationInfo, InputSpec, OperatingPoint, ScoreSpec
from oodguard.training.package import build_bundle, write_tarball

from ..service.bundle_factory import build_tiny_onnx


@pytest.fixture
def parts(tmp_path):
    onnx_path = tmp_path / "src" / "model.onnx"
    onnx_path.parent.mkdir()
    onnx.save(build_tiny_onnx(), str(onnx_path))
    (tmp_path / "src" / "eval.md").write_text("# report\n")
    manifest = BundleManifest(
        name="tiny", version="1", classes=["red", "green", "blue"], input=InputSpec(height=8, width=8),
        outputs=["logits", "probs", "msp", "energy"], score=ScoreSpec(name="msp", output="msp"),
        operating_points=[OperatingPoint(name="tpr95", target_tpr=0.95, threshold=0.5)],
        default_operating_point="tpr95", calibration=CalibrationInfo(size=50),
    )
    rng = np.random.default_rng(0)
    return {
        "onnx_path": onnx_path,
        "manifest": manifest,
        "calibration_scores": rng.uniform(0.3, 1.0, 50),
        "golden_images": rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32),
        "report_files": {"eval.md": tmp_path / "src" / "eval.md"},
    }


def test_build_writes_a_verified_bundle_with_golden_outputs(tmp_path, parts):
    built = build_bundle(tmp_path / "bundle", **parts)
    root = built.bundle_dir
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "calibration.npy", "golden.npz", "manifest.json", "model.onnx", "report/eval.md"]
    assert built.verify.checks[-1] == "golden"
    cal = np.load(root / "calibration.npy")
    assert cal.dtype == np.float32 and np.all(np.diff(cal) >= 0)
    with np.load(root / "golden.npz") as golden:
        expected = make_session(root / "model.onnx").run(None, {"image": parts["golden_images"]})
        for name, value in zip(["logits", "probs", "msp", "energy"], expected):
            np.testing.assert_array_equal(golden[name], value)
    assert not list(tmp_path.glob(".bundle.*"))  # no staging leftovers
    # readable by a service running as another user (temp files start out 0600 / 0700), umask permitting
    old_mask = os.umask(0o022)
    os.umask(old_mask)
    if old_mask & 0o044 == 0:
        assert all(p.stat().st_mode & 0o044 == 0o044 for p in [root, *root.rglob("*")])


def test_tarball_is_flat_with_regular_files_and_no_owner(tmp_path, parts):
    built = build_bundle(tmp_path / "bundle", **parts)
    with tarfile.open(built.tarball) as tar:
        members = tar.getmembers()
    names = {m.name for m in members}
    assert {"manifest.json", "model.onnx", "calibration.npy", "golden.npz", "report/eval.md"} <= names
    assert all(m.isfile() or m.isdir() for m in members)
    assert all(m.uid == 0 and m.uname == "" and not m.name.startswith(("/", "..")) for m in members)


def test_rebuild_replaces_the_old_bundle(tmp_path, parts):
    build_bundle(tmp_path / "bundle", **parts)
    parts["manifest"] = parts["manifest"].model_copy(update={"version": "2"})
    built = build_bundle(tmp_path / "bundle", **parts)
    assert verify_bundle(tmp_path / "bundle").manifest.version == "2" == built.manifest.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.tar.gz", "src"]


def test_a_failing_build_keeps_the_old_bundle(tmp_path, parts):
    first = build_bundle(tmp_path / "bundle", **parts)
    bad = dict(parts, calibration_scores=np.ones(7))  # manifest says 50
    with pytest.raises(ValueError, match="50 calibration scores"):
        build_bundle(tmp_path / "bundle", **bad)
    bad = dict(parts, manifest=parts["manifest"].model_copy(update={"outputs": ["logits", "probs", "msp", "other"]}))
    with pytest.raises(BundleError, match="graph outputs"):  # verification runs before anything moves
        build_bundle(tmp_path / "bundle", **bad)
    assert verify_bundle(tmp_path / "bundle").sha256 == first.verify.sha256
    assert not list(tmp_path.glob(".bundle.*"))


def test_report_names_cannot_escape(tmp_path, parts):
    parts["report_files"] = {"../evil.md": parts["report_files"]["eval.md"]}
    with pytest.raises(ValueError, match="inside report/"):
        build_bundle(tmp_path / "bundle", **parts)
    assert not (tmp_path / "evil.md").exists() and not (tmp_path / "bundle").exists()


def test_write_tarball_refuses_links(tmp_path, parts):
    built = build_bundle(tmp_path / "bundle", tarball=False, **parts)
    assert built.tarball is None
    (built.bundle_dir / "link").symlink_to(built.bundle_dir / "model.onnx")
    with pytest.raises(ValueError, match="regular files only"):
        write_tarball(built.bundle_dir)
    assert not (tmp_path / "bundle.tar.gz").exists()
