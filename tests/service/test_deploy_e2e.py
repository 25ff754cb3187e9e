"""End to end: train a tiny model (seconds), `oodguard deploy` the run directory to a running `oodguard serve`.

Everything runs as the user would run it: `oodguard train`, `oodguard deploy RUN --url ...` (which
exports and calibrates in subprocesses) and `oodguard serve` are separate processes; the version
change is observed through `/v1/models`, `/metrics` and a prediction.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from .bundle_factory import encode_image
from .test_deploy import TOKEN, metric_line, live_server, src  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def _oodguard(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oodguard.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_train_then_deploy_run_dir_to_a_running_server(live_server, tiny_data_dir, tmp_path):
    base, _models = live_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}
    env.update(OODGUARD_CACHE_DIR=os.environ.get("OODGUARD_CACHE_DIR", str(tmp_path / "cache")), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    trained = _oodguard(
        "train", "--method", "msp", "--data-dir", str(tiny_data_dir), "--max-steps", "5", "--batch-size", "32",
        "--calibration-size", "100", "--threads", "1", "--no-progress", "--no-eval-test", "--out", str(run_dir),
        env=env,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert httpx.get(f"{base}/v1/models").json()["active"]["name"] == "tiny"

    # The trained model has other classes and input size than the served tiny bundle: a contract
    # change, so the deploy needs explicit consent.
    deployed = _oodguard(
        "deploy", str(run_dir), "--url", base, "--data-dir", str(tiny_data_dir), "--name", "e2e", "--version", "2",
        "--allow-contract-change", env={**env, "OODGUARD_ADMIN_TOKEN": TOKEN},
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "tiny/1 -> e2e/2" in deployed.stdout

    active = httpx.get(f"{base}/v1/models").json()["active"]
    assert (active["name"], active["version"]) == ("e2e", "2") and len(active["classes"]) == 10
    metrics = httpx.get(f"{base}/metrics").text
    info = metric_line(metrics, "oodguard_model_info{")
    assert 'name="e2e"' in info and 'version="2"' in info
    assert metric_line(metrics, 'oodguard_model_swaps_total{result="success"}').endswith(" 1.0")
    image = encode_image((200, 30, 30), size=(32, 32))
    resp = httpx.post(f"{base}/v1/predict", files={"file": ("x.png", image, "image/png")}, timeout=30)
    assert resp.status_code == 200 and resp.json()["model"]["version"] == "2"
