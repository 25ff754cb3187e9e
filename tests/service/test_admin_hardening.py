"""Admin API hardening, checked on a real `oodguard serve` with DEBUG logging and the access log on.

- The admin token never appears in the server's output (every admin operation, successes and
  refusals, at DEBUG with the uvicorn access log), nor in any response, nor in the settings' repr.
- Registration by path stays inside the models directory: outside paths, the models directory
  itself, its hidden staging area, and a symlink pointing out are all refused with 4xx; a symlink
  planted in the models dir is neither listed nor activatable; the served version never changes.
- The service binds to loopback unless told otherwise.
"""

from __future__ import annotations

import io
import os
import tarfile

import httpx
import pytest

from oodguard.service.settings import Settings

from bench.serve_process import start_serve

from .bundle_factory import encode_image, make_tiny_bundle

pytestmark = pytest.mark.slow

TOKEN = "hardening-secret-TOKEN-9f8e7d6c5b4a3210"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _tar_gz(bundle) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return buf.getvalue()


def test_token_never_logged_and_registration_confined(tmp_path):
    src1 = make_tiny_bundle(tmp_path / "src1", "tiny", "1")
    src2 = make_tiny_bundle(tmp_path / "src2", "tiny", "2")
    models = tmp_path / "models"
    outside = make_tiny_bundle(tmp_path / "outside", "tiny", "7")
    args = ["--bundle", str(src1), "--models-dir", str(models), "--log-level", "DEBUG", "--access-log"]
    with start_serve(args, tmp_path / "serve.log", env={"OODGUARD_ADMIN_TOKEN": TOKEN}) as server:
        (models / "incoming").mkdir()
        make_tiny_bundle(models / "incoming" / "b3", "tiny", "3")
        os.symlink(outside, models / "incoming" / "link-out")
        (models / ".incoming").mkdir(exist_ok=True)
        make_tiny_bundle(models / ".incoming" / "staged", "tiny", "8")

        bodies = []
        with httpx.Client(base_url=server.base, timeout=30) as c:

            def call(method, path, expect, **kw):
                r = c.request(method, path, **kw)
                bodies.append(r.text + "".join(f"{k}: {v}" for k, v in r.headers.items()))
                assert r.status_code == expect, (method, path, r.status_code, r.text)
                return r

            call("GET", "/admin/models", 200, headers=AUTH)
            call("POST", "/admin/models", 201, headers=AUTH, files={"file": ("b.tar.gz", _tar_gz(src2), "application/gzip")})
            call("POST", "/admin/models", 201, headers=AUTH, json={"path": "incoming/b3"})
            call("POST", "/admin/models/tiny/2/activate", 200, headers=AUTH)
            call("POST", "/admin/rollback", 200, headers=AUTH)
            call("POST", "/admin/models/tiny/99/activate", 404, headers=AUTH)
            call("POST", "/admin/models", 422, headers=AUTH, files={"file": ("b.tar.gz", b"not a tar", "application/gzip")})
            # Confinement: nothing outside the models dir, not the dir itself, not its staging area.
            for path, code in [
                (str(outside), "outside_models_dir"),
                ("../outside", "outside_models_dir"),
                ("incoming/../../outside", "outside_models_dir"),
                ("incoming/link-out", "outside_models_dir"),
                ("", "not_a_bundle"),
                (".", "not_a_bundle"),
                ("tiny", "not_a_bundle"),
                (".incoming/staged", "not_a_bundle"),
            ]:
                r = call("POST", "/admin/models", 400, headers=AUTH, json={"path": path})
                assert r.json()["error"]["code"] == code, (path, r.text)
            # A symlink in the models dir pointing out of it is neither listed nor activatable.
            r = call("POST", "/admin/models/incoming/link-out/activate", 400, headers=AUTH)
            assert r.json()["error"]["code"] == "outside_models_dir"
            # Refusals with a wrong or malformed credential that contains the token.
            call("GET", "/admin/models", 403, headers={"Authorization": f"Bearer {TOKEN}x"})
            call("GET", "/admin/models", 401, headers={"Authorization": f"Token {TOKEN}"})
            call("GET", "/admin/models", 401, headers={"Authorization": TOKEN})
            served = c.post("/v1/predict", content=encode_image((255, 0, 0)), headers={"content-type": "image/png"})
            assert served.json()["model"]["version"] == "1"  # after the rollback, and no refused path changed it
            versions = {v["version"] for v in c.get("/v1/models").json()["versions"]}
            assert versions == {"1", "2", "3"}  # nothing from outside or from staging was registered
        assert server.stop() == 0
    log = server.log()
    assert '"POST /admin/models/tiny/2/activate HTTP/1.1" 200' in log  # the access log was on
    assert "DEBUG" in log and "refused: wrong token" in log
    assert TOKEN not in log
    assert not any(TOKEN in b for b in bodies)
    assert not (models / "tiny" / "7").exists() and not (models / "tiny" / "8").exists()


def test_settings_never_show_the_token(monkeypatch):
    for key in [k for k in os.environ if k.startswith("OODGUARD_")]:
        monkeypatch.delenv(key)
    settings = Settings(admin_token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    assert TOKEN not in settings.model_dump_json()
    assert settings.host == "127.0.0.1"  # loopback unless told otherwise
