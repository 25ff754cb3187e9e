"""`oodguard evaluate | export | calibrate` and `bundle verify` from the command line, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from oodguard.cli import app

from ._eval_helpers import make_run

torch.set_num_threads(1)
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_export_calibrate_verify(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    result = _run("evaluate", run, "--ood", "tinyimagenet", "--ood", "uniform", "--attack", "none,paper",
                  "--scores", "msp,energy", "--max-samples", "32", "--batch-size", "32", "--no-plots")
    assert result.exit_code == 0, result.output
    assert "AUROC / FPR95" in result.output and "uniform" in result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["results"]) == ["msp", "energy"] and list(report["attacks"]) == ["none", "paper"]
    # the shift tables are on by default: every upload form, realised TPR at one threshold and at its group's
    assert list(report["shifts"]["forms"]) == ["stored", "png", "jpeg_q30", "jpeg_q50", "jpeg_q95", "upscale_x2",
                                               "upscale_x3", "upscale_x4", "non_square"]
    wide = runner.invoke(app, ["evaluate", str(run), "--ood", "tinyimagenet", "--attack", "none", "--scores", "energy",
                                "--max-samples", "16", "--no-plots", "--out", str(tmp_path / "wide")],
                         env={"COLUMNS": "400"}).output
    assert "Upload forms — energy" in wide and "TPR, group threshold" in wide
    assert "| jpeg_q24_33  |" in wide.replace("│", "|")  # quality 30 in its band
    result = _run("evaluate", run, "--ood", "uniform", "--attack", "none", "--scores", "msp", "--max-samples", "16",
                  "--shifts", "none", "--no-plots", "--out", tmp_path / "noshift")
    assert result.exit_code == 0, result.output
    assert "shifts" not in json.loads((tmp_path / "noshift" / "eval.json").read_text()) or not \
        json.loads((tmp_path / "noshift" / "eval.json").read_text())["shifts"]

    result = _run("export", run, "--scores", "msp,energy")
    assert result.exit_code == 0, result.output
    assert "parity on 256 real images" in result.output and (run / "export" / "model.onnx").is_file()

    out = tmp_path / "bundles" / "mine"
    result = _run("calibrate", run, "--score", "energy", "--tpr", "0.9,0.95", "--default", "0.9",
                  "--name", "tiny-guard", "--version", "3", "--out", out, "--max-samples", "64")
    assert result.exit_code == 0, result.output
    assert "tpr90 (default)" in result.output and (tmp_path / "bundles" / "mine.tar.gz").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["score"]["name"]) == ("tiny-guard", "3", "energy")
    assert [op["target_tpr"] for op in manifest["operating_points"]] == [0.9, 0.95]

    for target in (out, tmp_path / "bundles" / "mine.tar.gz"):
        result = _run("bundle", "verify", target)
        assert result.exit_code == 0, result.output
        assert "✓ golden" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "{run}", "--attack", "fgsm"], "unknown attack protocol"),
        (["evaluate", "{run}", "--scores", "msp,bogus"], "unknown score 'bogus'"),
        (["evaluate", "{run}", "--ood", "{tmp}/missing.npz"], "missing.npz"),
        (["evaluate", "{tmp}/no-run"], "run directory not found"),
        (["evaluate", "{run}", "--device", "tpu0"], "unknown device 'tpu0'"),
        (["export", "{run}", "--scores", "odin"], "not exportable"),
        (["export", "{run}", "--out", "{tmp}/model.txt"], "must name an .onnx file"),
        (["calibrate", "{run}"], "run `oodguard export"),
        (["calibrate", "{run}", "--tpr", "0.9,abc"], "--tpr takes numbers"),
        (["calibrate", "{run}", "--tpr", "0.9,1.5"], "--tpr values must be in (0, 1)"),
        (["calibrate", "{run}", "--jpeg-bands", "1-50,60-100"], "must cover every JPEG quality 1-100; none covers 51 (nor 8 more)"),
        (["calibrate", "{run}", "--jpeg-bands", "1-50,40-100"], "--jpeg-bands: JPEG quality bands overlap at quality 40"),
        (["calibrate", "{run}", "--jpeg-bands", "1-50,high"], "'high' is not a band LOWEST-HIGHEST"),
        (["calibrate", "{run}", "--jpeg-bands", "0-100"], "must lie in 1-100"),
    ],
)
def test_bad_input_is_a_clear_error_without_traceback(tmp_path, tiny_data_dir, args, message):
    run = make_run(tmp_path / "run", tiny_data_dir)
    result = _run(*[a.format(run=run, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
