"""TorchServe 0.12 as a serving-benchmark peer: install on request, archive the model, write its config.

Only used with `bench/serve.py --torchserve`. Then `torchserve==0.12.*` and `torch-model-archiver`
are pip-installed into the running virtual environment if missing (Java 17 must be on PATH). Every
failure here becomes a "not run: <reason>" row, never a failed benchmark.

Settings (recorded in the report):
  - the handler is bench/peers/torchserve_handler.py: Pillow decode, the run's eager PyTorch model;
  - workers = the cores available (TorchServe's own CPU default), torch threads per worker =
    cores / workers, so workers x threads = cores and nothing is oversubscribed;
  - `torchserve`: batchSize 1, maxBatchDelay 100 ms (TorchServe's defaults);
    `torchserve-batch32`: batchSize 32, maxBatchDelay 5 ms (the oodguard batcher's defaults);
  - job_queue_size 1000 (default 100 would answer 503 at 128 concurrent clients), token
    authorisation off (loopback benchmark), no config snapshots; logs under the work directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANDLER = REPO / "bench" / "peers" / "torchserve_handler.py"
MODEL_NAME = "oodbench"
PACKAGES = ["torchserve==0.12.*", "torch-model-archiver==0.12.*"]
SETTINGS = {"torchserve": {"batch_size": 1, "max_batch_delay_ms": 100},
            "torchserve-batch32": {"batch_size": 32, "max_batch_delay_ms": 5}}


def _bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def version() -> str | None:
    try:
        return metadata.version("torchserve")
    except metadata.PackageNotFoundError:
        return None


def ensure_installed(install: bool = True) -> str | None:
    """None when TorchServe can run here, else the reason it cannot (installs it first when allowed)."""
    if shutil.which("java") is None:
        return "no java on PATH (TorchServe's frontend needs Java 11+)"
    if version() is None or not _bin("torchserve").exists() or not _bin("torch-model-archiver").exists():
        if not install:
            return "torchserve is not installed"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True)
        if done.returncode != 0:
            return f"pip install {' '.join(PACKAGES)} failed: {done.stderr.strip().splitlines()[-1:]}"
    if not version():
        return "torchserve did not install"
    return None


def archive(checkpoint: Path, classes: list[str], workdir: Path, torch_threads: int) -> Path:
    """torch-model-archiver --archive-format no-archive into workdir/store; returns the model store."""
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    config = workdir / "handler_config.json"
    config.write_text(json.dumps({"torch_threads": torch_threads, "classes": classes}))
    cmd = [str(_bin("torch-model-archiver")), "--model-name", MODEL_NAME, "--version", "1.0",
           "--serialized-file", str(checkpoint), "--handler", str(HANDLER), "--extra-files", str(config),
           "--export-path", str(store), "--archive-format", "no-archive", "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {done.stderr.strip()[-500:]}")
    return store


def command(system: str, store: Path, workdir: Path, ports: tuple[int, int, int], workers: int) -> tuple[list[str], dict, dict]:
    """(argv, environment, settings) to start TorchServe in the foreground with one model loaded."""
    s = SETTINGS[system]
    inference, management, metrics_port = ports
    model = {MODEL_NAME: {"1.0": {"defaultVersion": True, "marName": MODEL_NAME, "minWorkers": workers,
                                  "maxWorkers": workers, "batchSize": s["batch_size"],
                                  "maxBatchDelay": s["max_batch_delay_ms"], "responseTimeout": 120}}}
    props = {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics_port}",
        "model_store": str(store),
        "load_models": MODEL_NAME,
        "models": json.dumps(model),
        "default_workers_per_model": str(workers),
        "job_queue_size": "1000",
        "disable_token_authorization": "true",
        "install_py_dep_per_model": "false",
    }
    config = workdir / f"{system}.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    logs = workdir / "logs" / system
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs),
           "PATH": f"{_bin('python').parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TS_CONFIG_FILE", None)
    argv = [str(_bin("torchserve")), "--start", "--foreground", "--ts-config", str(config), "--model-store", str(store),
            "--ncs"]
    settings = {"workers": workers, "batch_size": s["batch_size"], "max_batch_delay_ms": s["max_batch_delay_ms"],
                "job_queue_size": 1000, "version": version()}
    return argv, env, settings
