"""Admin API end to end in-process: upload, register, activate, rollback, list, refusals, restart, watch."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from oodguard.service.store import ModelStore

from .bundle_factory import encode_image, make_tiny_bundle

TOKEN = "admin-token-for-the-admin-tests-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RED = encode_image((255, 0, 0))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("admin-src")
    return {
        "1": make_tiny_bundle(root / "b1", "tiny", "1"),
        "2": make_tiny_bundle(root / "b2", "tiny", "2", logit_scale=6.0, metrics={"clean": {"auroc": 0.97}}),
        "3": make_tiny_bundle(root / "b3", "tiny", "3", logit_scale=7.0),
        "cc": make_tiny_bundle(root / "bcc", "tiny", "cc", classes=("c", "m", "y")),
    }


@pytest.fixture
def admin_client(make_client, src, tmp_path):
    def _make(**overrides):
        values = {"bundle": src["1"], "models_dir": tmp_path / "models", "admin_token": TOKEN, "batching": False}
        values.update(overrides)
        return make_client(**values)

    return _make


def tar_gz(bundle: Path | None = None, extra=None, arcname: str = "bundle") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if bundle is not None:
            tar.add(bundle, arcname=arcname)
        if extra is not None:
            extra(tar)
    return buf.getvalue()


def upload(client, data: bytes, multipart: bool = True):
    if multipart:
        return client.post("/admin/models", files={"file": ("b.tar.gz", data, "application/gzip")}, headers=AUTH)
    return client.post("/admin/models", content=data, headers={**AUTH, "Content-Type": "application/gzip"})


def served_version(client) -> str:
    resp = client.post("/v1/predict", files={"file": ("x.png", RED, "image/png")})
    assert resp.status_code == 200, resp.text
    return resp.json()["model"]["version"]


def metric(client, name: str, labels: dict | None = None) -> float | None:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return None


def info_version(client) -> str | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "oodguard_model_info":
                return sample.labels["version"]
    return None


# -- the happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "raw-gzip"])
def test_upload_activate_rollback(admin_client, src, multipart):
    client = admin_client()
    assert served_version(client) == "1" and info_version(client) == "1"

    first = upload(client, tar_gz(src["2"]), multipart)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["name"] == "tiny" and body["version"] == "2" and body["created"] is True
    assert body["checks"] == ["schema", "hashes", "calibration", "onnx", "golden"] and body["contract_compatible"]
    again = upload(client, tar_gz(src["2"]), multipart)
    assert again.status_code == 200 and again.json()["created"] is False
    assert served_version(client) == "1"  # registering does not activate

    swap = client.post("/admin/models/tiny/2/activate", headers=AUTH)
    assert swap.status_code == 200, swap.text
    assert swap.json()["previous"]["version"] == "1" and swap.json()["current"]["version"] == "2"
    assert set(swap.json()["timings_s"]) == {"validate", "warm"}
    assert served_version(client) == "2" and info_version(client) == "2"
    assert client.get("/v1/models").json()["active"]["version"] == "2"
    assert metric(client, "oodguard_model_swaps_total", {"result": "success"}) == 1.0

    listing = client.get("/admin/models", headers=AUTH).json()
    versions = {v["version"]: v for v in listing["versions"]}
    assert versions["2"]["active"] and not versions["1"]["active"]
    assert versions["2"]["metrics"] == {"clean": {"auroc": 0.97}}
    assert listing["history"] == ["tiny/1"]

    back = client.post("/admin/rollback", headers=AUTH)
    assert back.status_code == 200 and back.json()["current"]["version"] == "1"
    assert served_version(client) == "1" and info_version(client) == "1"
    assert metric(client, "oodguard_model_swaps_total", {"result": "rollback"}) == 1.0
    nothing = client.post("/admin/rollback", headers=AUTH)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_history"


def test_register_a_path_inside_the_models_dir(admin_client, tmp_path):
    client = admin_client()
    make_tiny_bundle(tmp_path / "models" / "incoming" / "new", "tiny", "5")
    resp = client.post("/admin/models", json={"path": "incoming/new"}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    assert resp.json()["version"] == "5" and (tmp_path / "models" / "tiny" / "5").is_dir()
    assert client.post("/admin/models/tiny/5/activate", headers=AUTH).status_code == 200
    assert served_version(client) == "5"


@pytest.mark.parametrize("path", ["/etc", "../outside", "incoming/../../outside"])
def test_register_path_outside_models_dir_is_400(admin_client, tmp_path, src, path):
    client = admin_client()
    (tmp_path / "outside").mkdir()
    resp = client.post("/admin/models", json={"path": path}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "outside_models_dir"


def test_restart_after_activation_serves_the_activated_version(admin_client, src):
    client = admin_client()
    upload(client, tar_gz(src["2"]))
    assert client.post("/admin/models/tiny/2/activate", headers=AUTH).status_code == 200
    restarted = admin_client()  # same models dir, same --bundle (v1): the persisted activation wins
    assert served_version(restarted) == "2"
    assert restarted.get("/readyz").status_code == 200


def test_contract_change_needs_explicit_consent(admin_client, src):
    client = admin_client()
    reg = upload(client, tar_gz(src["cc"])).json()
    assert reg["contract_compatible"] is False and "classes" in reg["contract_changes"]
    refused = client.post("/admin/models/tiny/cc/activate", headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["error"]["check"] == "contract" and "classes" in refused.json()["error"]["message"]
    assert served_version(client) == "1"
    ok = client.post("/admin/models/tiny/cc/activate", params={"allow_contract_change": "true"}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    resp = client.post("/v1/predict", files={"file": ("x.png", RED, "image/png")}).json()
    assert resp["model"]["version"] == "cc" and resp["predictions"][0]["label"] == "c"


def test_unknown_version_is_404(admin_client):
    resp = admin_client().post("/admin/models/tiny/99/activate", headers=AUTH)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


# -- refusals: nothing changes, the old version keeps serving --------------------------------------


def _tampered_model(src, tmp):
    bad = tmp / "bad-model"
    make_tiny_bundle(bad, "tiny", "7")
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-10] ^= 0x01
    (bad / "model.onnx").write_bytes(bytes(data))
    return tar_gz(bad)


def _edited_manifest(src, tmp):
    bad = tmp / "bad-manifest"
    make_tiny_bundle(bad, "tiny", "7")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["operating_points"][0]["threshold"] = -1.0  # accept everything: a silent, dangerous edit
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return tar_gz(bad)


def _member(name: str, **attrs):
    def add(tar):
        info = tarfile.TarInfo(name)
        for k, v in attrs.items():
            setattr(info, k, v)
        tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)

    return add


def _dotdot(src, tmp):
    return tar_gz(src["3"], extra=_member("../evil", size=1))


def _symlink(src, tmp):
    return tar_gz(src["3"], extra=_member("bundle/report/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"))


def _absolute(src, tmp):
    return tar_gz(src["3"], extra=_member("/tmp/evil", size=1))


def _not_a_tar(src, tmp):
    return b"this is not an archive"


def _bomb(src, tmp):  # 40 KB on the wire, > max_bundle_bytes unpacked
    return tar_gz(src["3"], extra=lambda tar: _member("bundle/zeros.bin", size=3 * 1024 * 1024)(tar))


@pytest.mark.parametrize(
    "make, status, check",
    [
        (_tampered_model, 422, "hash"),
        (_edited_manifest, 422, "hash"),
        (_dotdot, 422, "archive"),
        (_symlink, 422, "archive"),
        (_absolute, 422, "archive"),
        (_not_a_tar, 422, "archive"),
        (_bomb, 422, "archive"),
    ],
    ids=["model-byte", "edited-manifest", "dotdot", "symlink", "absolute", "not-a-tar", "unpacked-too-large"],
)
def test_bad_uploads_are_refused_and_the_old_version_keeps_serving(admin_client, src, tmp_path, make, status, check):
    client = admin_client(max_bundle_bytes=2 * 1024 * 1024)
    resp = upload(client, make(src, tmp_path))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == "bundle_invalid" and resp.json()["error"]["check"] == check
    assert served_version(client) == "1"
    assert [v["version"] for v in client.get("/admin/models", headers=AUTH).json()["versions"]] == ["1"]
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert not any((tmp_path / "models" / ".incoming").iterdir())  # staging cleaned up
    assert metric(client, "oodguard_model_swaps_total", {"result": "rejected"}) == 1.0


def test_oversized_upload_is_413(admin_client, src):
    client = admin_client(max_upload_bytes=64 * 1024, max_body_bytes=16 * 1024)
    big = tar_gz(src["2"], extra=lambda tar: tar.addfile(_info("bundle/noise.bin", 200_000), io.BytesIO(_noise(200_000))))
    assert len(big) > 64 * 1024
    for multipart in (True, False):
        resp = upload(client, big, multipart)
        assert resp.status_code == 413 and resp.json()["error"]["code"] in {"body_too_large", "upload_too_large"}
    assert served_version(client) == "1"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _noise(n: int) -> bytes:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": {"other": ("a", b"x", "application/gzip")}}, 400, "bad_request"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
    ],
    ids=["wrong-type", "multipart-without-file", "bad-json"],
)
def test_malformed_upload_requests(admin_client, kwargs, status, code):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    resp = admin_client().post("/admin/models", headers=headers, **kwargs)
    assert resp.status_code == status and resp.json()["error"]["code"] == code


def test_single_bundle_mode_refuses_registry_operations_with_409(make_client, src):
    client = make_client(bundle=src["1"], admin_token=TOKEN, batching=False)
    for method, path in [("POST", "/admin/models/tiny/1/activate"), ("POST", "/admin/rollback")]:
        resp = client.request(method, path, headers=AUTH)
        assert resp.status_code == 409 and "models-dir" in resp.json()["error"]["message"]
    resp = upload(client, tar_gz(src["2"]))
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_models_dir"
    listing = client.get("/admin/models", headers=AUTH).json()
    assert listing["models_dir"] is None and [v["version"] for v in listing["versions"]] == ["1"]


# -- watch mode ------------------------------------------------------------------------------------------


def test_watch_mode_follows_the_active_pointer(admin_client, src, tmp_path):
    client = admin_client(watch_interval_s=0.05)
    upload(client, tar_gz(src["2"]))
    ModelStore(tmp_path / "models").set_active("tiny", "2")  # a file-based deploy from another process
    deadline = time.monotonic() + 10
    while client.get("/v1/models").json()["active"]["version"] != "2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served_version(client) == "2" and info_version(client) == "2"
    assert metric(client, "oodguard_model_swaps_total", {"result": "success"}) == 1.0


def test_openapi_documents_the_admin_api(admin_client):
    spec = admin_client().get("/openapi.json").json()
    upload_doc = spec["paths"]["/admin/models"]["post"]
    assert {"200", "201", "401", "403", "413", "422"} <= set(upload_doc["responses"])
    assert {"multipart/form-data", "application/gzip", "application/json"} <= set(upload_doc["requestBody"]["content"])
    for path in ("/admin/models/{name}/{version}/activate", "/admin/rollback"):
        assert {"200", "401", "403", "404", "409", "422"} <= set(spec["paths"][path]["post"]["responses"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
