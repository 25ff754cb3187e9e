"""Container and monitoring files: what can be checked without a Docker daemon.

The compose file parses and every file it references exists; the Dockerfiles keep their promises
(slim service image without torch, non-root, health check; CUDA trainer); promtool accepts the
Prometheus config; every PromQL expression in the Grafana dashboard names a metric the service
really exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from oodguard.service.settings import Settings

from ..service.bundle_factory import encode_image

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "oodguard.json"
_OUTPUT_DIRS = {"./runs"}  # bind mounts the containers write into (training runs), not inputs


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_and_references_existing_files():
    compose = _compose()
    services = compose["services"]
    assert {"oodguard", "prometheus", "grafana", "trainer"} <= set(services)
    assert services["trainer"]["profiles"] == ["train"]
    for name in ("oodguard", "trainer"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
    # Bind mounts of repository files (./...) must exist; named volumes must be declared.
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src in _OUTPUT_DIRS:  # written by the container; Docker creates a missing bind-mount source
                assert src.removeprefix("./") + "/" in (ROOT / ".gitignore").read_text().split()
            elif src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} does not exist"
            elif not src.startswith(("/", "$", "..")):
                assert src in compose.get("volumes", {}), f"{name}: volume {src} not declared"
    # The trainer and the service share the models volume: that is how a trainer deploy hot-swaps.
    assert "models:/models" in services["oodguard"]["volumes"]
    assert "models:/models" in services["trainer"]["volumes"]
    # Admin token comes from an env file that is not committed.
    assert (ROOT / "docker" / ".env.example").is_file()
    assert "docker/.env" in (ROOT / ".gitignore").read_text().split()


def test_compose_environment_names_real_settings():
    fields = {f"OODGUARD_{name.upper()}" for name in Settings.model_fields}
    compose = _compose()
    dockerfile = (ROOT / "docker" / "service.Dockerfile").read_text()
    names = set(re.findall(r"\b(OODGUARD_[A-Z_]+)=", dockerfile))
    for svc in ("oodguard",):
        names |= set(compose["services"][svc].get("environment", {}))
    names |= set(re.findall(r"^(OODGUARD_[A-Z_]+)=", (ROOT / "docker" / ".env.example").read_text(), re.M))
    assert names, "no OODGUARD_ settings found"
    assert names <= fields, f"unknown settings: {sorted(names - fields)}"


def test_service_dockerfile_is_slim_nonroot_and_healthchecked():
    text = (ROOT / "docker" / "service.Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert '".[serve]"' in text and "train" not in re.findall(r"pip install[^\n]*", text)[0]
    assert "torch" not in text.lower().replace("no torch", "")
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert re.search(r"HEALTHCHECK[\s\S]*?/healthz", text)
    assert "COPY models/default" in text and 'VOLUME ["/models"]' in text
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"service.Dockerfile copies missing {src}"


def test_trainer_dockerfile_uses_cuda_base_and_oodguard_entrypoint():
    text = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)
    assert base and "cuda" in base.group(1)
    assert '".[train' in text
    assert 'ENTRYPOINT ["oodguard"]' in text
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"trainer.Dockerfile copies missing {src}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_prometheus_config():
    out = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "docker" / "prometheus.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["oodguard:8000"]  # the compose service name


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    return exprs


def test_grafana_provisioning_points_at_dashboard_and_prometheus():
    prov = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/oodguard.yml").read_text())
    compose = _compose()
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[prov["providers"][0]["options"]["path"]] == "./docker/grafana/dashboards"
    ds = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("requests", "latency", "batch", "reject", "score", "model"):
        assert needed in titles, needed


def test_dashboard_queries_name_only_exported_metrics(client):
    # Drive every code path that creates labelled series: an accepted and a rejected image, a bad one.
    ok = client.post("/v1/predict", files={"file": ("r.png", encode_image((255, 0, 0), fmt="PNG"), "image/png")})
    assert ok.status_code == 200
    client.post("/v1/predict", files={"file": ("g.png", encode_image((128, 128, 128), fmt="PNG"), "image/png")})
    assert client.post("/v1/predict", content=b"junk", headers={"content-type": "image/png"}).status_code >= 400
    exported = {
        sample.name
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    exported |= {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    used = {m for e in _dashboard_exprs() for m in re.findall(r"\b(oodguard_[a-z_]+)", e)}
    # Counters are created lazily per label set; their families are declared up front.
    missing = {m for m in used if m not in exported and m.removesuffix("_total") not in exported}
    assert not missing, f"dashboard uses metrics the service does not export: {sorted(missing)}"
    assert {"oodguard_requests_total", "oodguard_request_duration_seconds_bucket", "oodguard_model_info"} <= used
