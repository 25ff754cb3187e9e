"""Alert rules (docker/alerts.yml): promtool's own unit tests pass, Prometheus loads them, and every
metric they use is one the service exports; the dashboard shows the drift test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docker" / "alerts.yml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass():
    out = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=RULES.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_checks_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_and_compose_load_the_rules():
    assert "alerts.yml" in yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["rule_files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./docker/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_rules_use_only_exported_metrics(client):
    exported = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"OodguardDrift"}
    used = {m for r in rules for m in re.findall(r"\b(oodguard_[a-z_]+)", r["expr"])}
    assert "oodguard_drift_alarm" in used and used <= exported, used - exported


def test_dashboard_has_a_drift_panel():
    dash = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "oodguard.json").read_text())
    drift = [p for p in dash["panels"] if "drift" in p["title"].lower()]
    assert drift
    exprs = " ".join(t["expr"] for t in drift[0]["targets"])
    assert "oodguard_drift_log_martingale" in exprs and "oodguard_drift_alarm" in exprs
