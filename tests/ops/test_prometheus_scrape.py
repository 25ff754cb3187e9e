"""A real Prometheus server scrapes a real `oodguard serve` on loopback.

Skipped (with the reason) only where the `prometheus` binary is absent: `make test` installs the
Debian package when it can.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import httpx
import pytest

from bench.serve_process import free_port, start_serve

from ..service.bundle_factory import encode_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus binary not installed (Debian package prometheus)"),
]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{out}\n{err}")
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_oodguard(tiny_bundle, tmp_path):
    prom_port = free_port()
    with start_serve(["--bundle", str(tiny_bundle)], tmp_path / "serve.log") as service:
        base = service.base
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: oodguard\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{service.port}']\n"
        )
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            _scrape_checks(base, prom, prom_port)
        finally:
            _stop(prom)
            service.stop()


def _scrape_checks(base: str, prom: subprocess.Popen, prom_port: int) -> None:
    # Prometheus answers 503 "Service Unavailable" (not JSON) until its storage is up.
    _wait(lambda: httpx.get(f"http://127.0.0.1:{prom_port}/-/ready", timeout=2).status_code == 200, 60,
          "prometheus ready", prom)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    with httpx.Client(base_url=base, timeout=10) as c:
        for rgb in ((255, 0, 0), (0, 255, 0), (128, 128, 128)):
            files = {"file": ("x.png", encode_image(rgb, fmt="PNG"), "image/png")}
            assert c.post("/v1/predict", files=files).status_code == 200

    def target_up():
        targets = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
        return targets and targets[0]["health"] == "up" and targets[0]["labels"]["job"] == "oodguard"

    _wait(target_up, 60, "prometheus target up", prom)

    def scraped_requests():
        r = httpx.get(f"{api}/query", params={"query": 'oodguard_requests_total{endpoint="/v1/predict",status="200"}'}, timeout=2)
        result = r.json()["data"]["result"]
        return result and float(result[0]["value"][1]) >= 3

    _wait(scraped_requests, 60, "oodguard_requests_total scraped", prom)
    info = httpx.get(f"{api}/query", params={"query": "oodguard_model_info"}, timeout=2).json()["data"]["result"]
    assert info and info[0]["metric"]["name"] == "tiny" and info[0]["metric"]["version"] == "1"
