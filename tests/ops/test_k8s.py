"""Kubernetes manifests (deploy/k8s/): static checks only, no cluster here.

Every core resource validates against the Kubernetes JSON schemas packaged by `kubernetes-validate`
(strict: unknown fields fail), for the oldest and the newest Kubernetes release we claim; the custom
resources (ServiceMonitor, PrometheusRule, KServe InferenceService) against the small schemas vendored
in tests/ops/k8s_schemas/, with the InferenceService's predictor also checked as a core PodSpec. Then
what the manifests promise: replicas sharing one ReadWriteMany models volume in watch mode, probes
on /readyz and /healthz, an HPA on that Deployment, a ServiceMonitor that selects the Service, /admin
kept off the Ingress and behind a NetworkPolicy, a torchrun training Job on the CUDA image that
deploys into the same volume, and settings names the service really has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from oodguard.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "k8s_schemas"
VERSIONS = ("1.30", "1.37")  # oldest still-supported release we claim, newest the package knows
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
}


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path, doc", [d for d in DOCS if (d[1]["apiVersion"], d[1]["kind"]) not in CUSTOM],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_core_resources_match_the_kubernetes_schemas(path, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path, doc", [d for d in DOCS if (d[1]["apiVersion"], d[1]["kind"]) in CUSTOM],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_custom_resources_match_their_schemas(path, doc):
    schema = json.loads((SCHEMAS / CUSTOM[(doc["apiVersion"], doc["kind"])]).read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)


def test_the_validators_refuse_a_broken_manifest():
    """The checks above can fail: a misspelt field and a wrong type are both refused."""
    deployment = json.loads(json.dumps(_one("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    monitor = json.loads(json.dumps(_one("ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = 15
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads((SCHEMAS / "servicemonitor.json").read_text()))


def test_kserve_predictor_is_a_valid_pod_spec():
    predictor = _one("InferenceService")["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {"containers": predictor["containers"], "volumes": predictor.get("volumes", [])}}
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    (container,) = predictor["containers"]
    port = container["ports"][0]["containerPort"]
    assert _env(container)["OODGUARD_PORT"] == str(port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert _one("InferenceService")["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_kustomizations_list_existing_files():
    for kfile in K8S.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kfile.read_text())["resources"]:
            assert (kfile.parent / res).is_file(), f"{kfile}: {res}"


def test_replicas_share_one_models_volume_in_watch_mode():
    deployment = _one("Deployment", "oodguard")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert float(env["OODGUARD_WATCH_INTERVAL_S"]) > 0
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    models_volume = next(n for n, p in mounts.items() if p == env["OODGUARD_MODELS_DIR"])
    pvc = _one("PersistentVolumeClaim", claims[models_volume])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica and the Job mount it
    # The training Job writes into that same claim, at the path its deploy command names.
    job_pod = _one("Job")["spec"]["template"]["spec"]
    job_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job_pod["volumes"] if "persistentVolumeClaim" in v}
    (trainer,) = job_pod["containers"]
    job_mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    target = re.search(r"oodguard deploy \S+ --models-dir (\S+)", trainer["args"][0]).group(1)
    assert job_claims[next(n for n, p in job_mounts.items() if p == target)] == pvc["metadata"]["name"]


def test_probes_and_ports():
    (container,) = _one("Deployment", "oodguard")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"] == [{"name": "http", "containerPort": int(_env(container)["OODGUARD_PORT"])}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_hpa_scales_the_deployment_and_servicemonitor_selects_the_service():
    deployment, service = _one("Deployment", "oodguard"), _one("Service", "oodguard")
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "oodguard"}
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = _one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_prometheus_rule_equals_the_compose_alert_rules():
    compose_rules = yaml.safe_load((ROOT / "docker" / "alerts.yml").read_text())
    assert _one("PrometheusRule")["spec"] == compose_rules


def test_admin_api_stays_internal():
    ingress = _one("Ingress")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1/predict"], paths  # SECURITY.md: /v2, /v1/models, /metrics, /admin are internal
    admin = _one("Service", "oodguard-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    policy = _one("NetworkPolicy")
    pod_labels = _one("Deployment", "oodguard")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = policy["spec"]["ingress"][0]["from"]
    # No allow-all peer: each names a labelled namespace or labelled pods.
    assert all(s.get("namespaceSelector", {}).get("matchLabels") or s.get("podSelector", {}).get("matchLabels") for s in sources)
    assert {"podSelector": {"matchLabels": {"oodguard.io/admin-client": "true"}}} in sources
    # The token comes from a Secret, never from the manifests.
    (container,) = _one("Deployment", "oodguard")["spec"]["template"]["spec"]["containers"]
    token = next(e for e in container["env"] if e["name"] == "OODGUARD_ADMIN_TOKEN")
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["optional"] is True


def test_training_job_runs_torchrun_on_the_cuda_image():
    job = _one("Job")
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    assert trainer["image"].startswith("oodguard-trainer")
    assert "cuda" in (ROOT / "docker" / "trainer.Dockerfile").read_text().split("ARG BASE=")[1].split()[0]
    script = trainer["args"][0]
    assert re.search(r"torchrun --standalone --nproc-per-node \S+ -m oodguard\.cli train ", script)
    assert int(trainer["resources"]["limits"]["nvidia.com/gpu"]) == int(_env(trainer)["GPUS"])
    assert script.index("train") < script.index("oodguard evaluate") < script.index("oodguard deploy")


def test_environment_names_are_real_settings():
    fields = {f"OODGUARD_{name.upper()}" for name in Settings.model_fields} | {"OODGUARD_DATA_DIR"}
    for _, doc in DOCS:
        pod = doc.get("spec", {}).get("template", {}).get("spec") or doc.get("spec", {}).get("predictor")
        for container in (pod or {}).get("containers", []):
            names = {e["name"] for e in container.get("env", []) if e["name"].startswith("OODGUARD_")}
            assert names <= fields, names - fields
