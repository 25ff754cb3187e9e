"""`oodguard bundle verify|info`: each tampering refused with its own message; archives; no torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from oodguard.cli import app

from .bundle_factory import make_tiny_bundle

runner = CliRunner()


def _verify(path):
    return runner.invoke(app, ["bundle", "verify", str(path)])


@pytest.fixture
def bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "b", "tiny", "7")


def _edit_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        target = manifest
        *parents, last = dotted.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
    path.write_text(json.dumps(manifest, indent=2))


def test_verify_passes_and_lists_every_check(bundle):
    result = _verify(bundle)
    assert result.exit_code == 0, result.output
    for check in ("schema", "hashes", "calibration", "onnx", "golden"):
        assert f"✓ {check}" in result.output
    assert "bundle tiny:7 OK" in result.output


def test_modified_model_is_refused(bundle):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    result = _verify(bundle)
    assert result.exit_code == 1
    assert "✓ schema" in result.output and "✗ hashes" in result.output
    assert "sha256 mismatch for model.onnx" in result.output


def test_modified_manifest_field_is_refused(bundle):
    op = json.loads((bundle / "manifest.json").read_text())["operating_points"][1]
    assert op["name"] == "tpr95"
    _edit_manifest(bundle, **{"operating_points": [
        *json.loads((bundle / "manifest.json").read_text())["operating_points"][:1],
        {**op, "threshold": 0.0},  # an attacker lowering the bar: every hash of the files still matches
        *json.loads((bundle / "manifest.json").read_text())["operating_points"][2:],
    ]})
    result = _verify(bundle)
    assert result.exit_code == 1
    assert "manifest.json was edited after it was written" in result.output


def test_modified_manifest_hash_is_refused(bundle):
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    _edit_manifest(bundle, files={**files, "golden.npz": "0" * 64})
    result = _verify(bundle)
    assert result.exit_code == 1 and "sha256 mismatch for golden.npz: manifest 000000000000" in result.output


def test_missing_file_is_refused(bundle):
    (bundle / "golden.npz").unlink()
    result = _verify(bundle)
    assert result.exit_code == 1
    assert "missing file(s) listed in the manifest: golden.npz" in result.output


def test_wrong_schema_version_is_refused(bundle):
    _edit_manifest(bundle, schema_version=2)
    result = _verify(bundle)
    assert result.exit_code == 1
    assert "✗ schema" in result.output and "unsupported schema_version 2" in result.output


def test_golden_mismatch_is_refused(bundle):
    with np.load(bundle / "golden.npz") as g:
        arrays = {k: g[k] for k in g.files}
    arrays["msp"] = arrays["msp"] + 1e-3
    np.savez(bundle / "golden.npz", **arrays)
    # re-pin the hash so the golden check itself is what fails
    from oodguard.service.bundle import write_manifest
    from oodguard.service.manifest import load_manifest

    write_manifest(bundle, load_manifest(bundle))
    result = _verify(bundle)
    assert result.exit_code == 1 and "✓ onnx" in result.output
    assert "output 'msp' differs from golden" in result.output


def _tar(bundle, dest, top="tiny-7"):
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(bundle, arcname=top)
    return dest


def test_verify_accepts_an_archive(bundle, tmp_path):
    result = _verify(_tar(bundle, tmp_path / "b.tar.gz"))
    assert result.exit_code == 0, result.output
    assert "✓ archive" in result.output and "✓ golden" in result.output


def test_archive_escaping_its_directory_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    result = _verify(evil)
    assert result.exit_code == 1 and "escapes the bundle" in result.output
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_verify_bad_path(tmp_path):
    result = _verify(tmp_path / "nope")
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "file.txt").write_text("x")
    result = _verify(tmp_path / "file.txt")
    assert result.exit_code == 1 and "neither a bundle directory" in result.output


def test_info_summary_and_json(bundle):
    result = runner.invoke(app, ["bundle", "info", str(bundle)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tiny:7" in out and "red, green, blue" in out and "tpr95 (default)" in out and "bilinear" in out
    result = runner.invoke(app, ["bundle", "info", str(bundle), "--json"])
    summary = json.loads(result.output)
    assert summary["name"] == "tiny" and summary["calibration_size"] == 200
    assert summary["default_operating_point"] == "tpr95"
    result = runner.invoke(app, ["bundle", "info", str(bundle / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bundle_cli_never_imports_torch():
    code = "import sys, oodguard.service.cli_bundle; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
