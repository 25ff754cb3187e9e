"""`oodguard deploy` / `oodguard rollback`: models-dir target, HTTP target, bad input, end to end."""

from __future__ import annotations

import json
import re
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from oodguard.cli import app
from oodguard.service.bundle import manifest_sha256
from oodguard.service.cli_deploy import flat_metrics
from oodguard.service.store import ModelStore

from bench.serve_process import start_serve

from .bundle_factory import make_tiny_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy-src")
    return {
        "1": make_tiny_bundle(root / "b1", "tiny", "1", metrics={"clean": {"auroc": 0.91}}),
        "2": make_tiny_bundle(root / "b2", "tiny", "2", logit_scale=4.0, metrics={"clean": {"auroc": 0.95}}),
        "cc": make_tiny_bundle(root / "bcc", "tiny", "cc", classes=("a", "b", "c")),
    }


def _plain(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping, for substring checks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def _invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_deploy_to_models_dir_activates_and_prints_old_to_new(tmp_path, src):
    models = tmp_path / "models"
    first = _invoke("deploy", str(src["1"]), "--models-dir", str(models))
    assert first.exit_code == 0, first.output
    second = _invoke("deploy", str(src["2"]), "--models-dir", str(models))
    assert second.exit_code == 0, second.output
    assert "tiny/1 -> tiny/2" in second.output
    assert "0.9100" in second.output and "0.9500" in second.output  # both bundles' key metrics
    store = ModelStore(models)
    assert store.pointer()[0] == "tiny/2" and store.read_state().history == ["tiny/1"]
    assert manifest_sha256(models / "tiny" / "2") == manifest_sha256(src["2"])

    back = _invoke("rollback", "--models-dir", str(models))
    assert back.exit_code == 0, back.output
    assert "tiny/2 -> tiny/1" in back.output and store.pointer()[0] == "tiny/1"
    again = _invoke("rollback", "--models-dir", str(models))
    assert again.exit_code == 1 and "no previous version" in again.output


def test_deploy_no_activate_only_registers(tmp_path, src):
    models = tmp_path / "models"
    _invoke("deploy", str(src["1"]), "--models-dir", str(models))
    result = _invoke("deploy", str(src["2"]), "--models-dir", str(models), "--no-activate")
    assert result.exit_code == 0 and "not activated" in result.output
    assert ModelStore(models).pointer()[0] == "tiny/1"
    assert (models / "tiny" / "2" / "manifest.json").is_file()


def test_deploy_tar_gz_archive(tmp_path, src):
    archive = tmp_path / "b2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src["2"], arcname="tiny-2")
    result = _invoke("deploy", str(archive), "--models-dir", str(tmp_path / "models"))
    assert result.exit_code == 0, result.output
    assert ModelStore(tmp_path / "models").pointer()[0] == "tiny/2"


def test_deploy_refuses_contract_change_without_flag(tmp_path, src):
    models = tmp_path / "models"
    _invoke("deploy", str(src["1"]), "--models-dir", str(models))
    refused = _invoke("deploy", str(src["cc"]), "--models-dir", str(models))
    assert refused.exit_code == 1 and "contract" in refused.output and "classes" in refused.output
    assert ModelStore(models).pointer()[0] == "tiny/1"
    ok = _invoke("deploy", str(src["cc"]), "--models-dir", str(models), "--allow-contract-change")
    assert ok.exit_code == 0, ok.output
    assert ModelStore(models).pointer() == ("tiny/cc", True)


def test_deploy_refuses_tampered_bundle(tmp_path, src):
    bad = tmp_path / "bad"
    make_tiny_bundle(bad, "tiny", "9")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["classes"] = ["x", "y", "z"]  # an edited manifest: golden/hashes still pass, but...
    manifest["files"]["model.onnx"] = "f" * 64  # ...its pins no longer match the files
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = _invoke("deploy", str(bad), "--models-dir", str(tmp_path / "models"))
    assert result.exit_code == 1 and "sha256 mismatch for model.onnx" in result.output
    assert not (tmp_path / "models" / "tiny" / "9").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["deploy", "{src}"], "exactly one of --url or --models-dir"),
        (["deploy", "{src}", "--url", "http://x", "--models-dir", "{tmp}"], "exactly one of"),
        (["deploy", "{tmp}/nope", "--models-dir", "{tmp}"], "does not exist"),
        (["deploy", "{tmp}", "--models-dir", "{tmp}/m"], "neither a bundle"),
        (["rollback"], "exactly one of"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, src, args, message):
    args = [a.format(src=src["1"], tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in _plain(result.output)
    assert "Traceback" not in result.output


def test_url_target_needs_token(tmp_path, src, monkeypatch):
    monkeypatch.delenv("OODGUARD_ADMIN_TOKEN", raising=False)
    result = runner.invoke(app, ["deploy", str(src["1"]), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "OODGUARD_ADMIN_TOKEN" in _plain(result.output)


def test_unreachable_url_is_a_clear_error(tmp_path, src):
    result = runner.invoke(
        app, ["deploy", str(src["1"]), "--url", "http://127.0.0.1:9", "--timeout", "2"],
        env={"OODGUARD_ADMIN_TOKEN": "t" * 32},
    )
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_flat_metrics_keeps_the_headline_numbers():
    flat = flat_metrics(
        {"attacked": {"tiny": {"auroc": 0.7, "aupr_in": 0.6, "fpr_at_95_tpr": 0.3}}, "accuracy": 0.9, "note": "x", "ok": True}
    )
    assert flat == {"accuracy": 0.9, "attacked.tiny.auroc": 0.7, "attacked.tiny.fpr_at_95_tpr": 0.3}


# -- against a real `oodguard serve` process ---------------------------------------------------------------

TOKEN = "deploy-test-admin-token-0123456789"


def metric_line(text: str, prefix: str) -> str:
    return next((line for line in text.splitlines() if line.startswith(prefix)), "")


@pytest.fixture
def live_server(src, tmp_path):
    """`oodguard serve` on a loopback port with a models dir, the admin API on and the pointer watched."""
    models = tmp_path / "models"
    args = ["--bundle", str(src["1"]), "--models-dir", str(models), "--watch-interval", "0.2", "--decode-threads", "1"]
    with start_serve(args, tmp_path / "serve.log", env={"OODGUARD_ADMIN_TOKEN": TOKEN}) as served:
        yield served.base, models
        served.stop()


def _active(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=10).json()["active"]["version"]


@pytest.mark.slow
def test_deploy_and_rollback_over_http_to_a_running_server(live_server, src, tmp_path):
    base, models = live_server
    env = {"OODGUARD_ADMIN_TOKEN": TOKEN}
    assert _active(base) == "1"

    result = runner.invoke(app, ["deploy", str(src["2"]), "--url", base], env=env)
    assert result.exit_code == 0, result.output
    assert "tiny/1 -> tiny/2" in result.output and "validate" in result.output
    assert _active(base) == "2"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'version="2"' in metric_line(metrics, "oodguard_model_info{")
    assert metric_line(metrics, 'oodguard_model_swaps_total{result="success"}').endswith(" 1.0")

    wrong = runner.invoke(app, ["deploy", str(src["1"]), "--url", base], env={"OODGUARD_ADMIN_TOKEN": "x" * 20})
    assert wrong.exit_code == 1 and "HTTP 403" in wrong.output
    contract = runner.invoke(app, ["deploy", str(src["cc"]), "--url", base], env=env)
    assert contract.exit_code == 1 and "contract" in contract.output and _active(base) == "2"

    back = runner.invoke(app, ["rollback", "--url", base], env=env)
    assert back.exit_code == 0, back.output
    assert "tiny/2 -> tiny/1" in back.output and _active(base) == "1"


@pytest.mark.slow
def test_file_based_deploy_is_picked_up_by_a_watching_server(live_server, src):
    base, models = live_server
    result = runner.invoke(app, ["deploy", str(src["2"]), "--models-dir", str(models)])
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 15
    while _active(base) != "2" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _active(base) == "2"
    assert 'version="2"' in metric_line(httpx.get(f"{base}/metrics").text, "oodguard_model_info{")
