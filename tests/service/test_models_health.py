"""GET /v1/models, /healthz, /readyz."""

from __future__ import annotations

from oodguard.service.manifest import load_manifest
from oodguard.service.schemas import ModelsResponse


def test_models_lists_the_active_bundle_and_versions(client, tiny_bundle):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = ModelsResponse.model_validate(r.json())
    manifest = load_manifest(tiny_bundle)
    active = body.active
    assert (active.name, active.version) == ("tiny", "1")
    assert active.sha256 == client.app.state.registry.active.sha256
    assert active.classes == ["red", "green", "blue"]
    assert active.input["height"] == 8 and active.input["resize"] == "bilinear"
    assert [op["name"] for op in active.operating_points] == [op.name for op in manifest.operating_points]
    assert active.default_operating_point == "tpr95"
    assert active.metrics == manifest.metrics and active.calibration_size == 200
    assert [(v["name"], v["version"], v["active"]) for v in body.versions] == [("tiny", "1", True)]


def test_models_with_a_models_dir_lists_every_version(make_client, tmp_path):
    from .bundle_factory import make_tiny_bundle

    models = tmp_path / "models"
    make_tiny_bundle(models / "tiny" / "1", version="1")
    make_tiny_bundle(models / "tiny" / "2", version="2")
    c = make_client(bundle=models / "tiny" / "1", models_dir=models)
    body = c.get("/v1/models").json()
    assert body["active"]["version"] == "1"
    listed = {v["version"]: v["active"] for v in body["versions"]}
    assert listed.get("1") is True


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready" and r.json()["model"]["name"] == "tiny"


def test_readiness_turns_off_at_shutdown(make_settings):
    from fastapi.testclient import TestClient

    from oodguard.service.app import create_app

    app = create_app(make_settings())
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
    assert app.state.inference.ready is False
    assert app.state.inference.batcher is not None and app.state.inference.batcher.queued_images == 0
