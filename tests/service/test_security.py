"""Admin authentication: off without a token, 401 without credentials, 403 with wrong ones, token never logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from oodguard.service.app import create_app
from oodguard.service.security import token_matches
from oodguard.service.settings import Settings

from .bundle_factory import encode_image, make_tiny_bundle

TOKEN = "s3cret-admin-token-for-tests-0123456789"
ADMIN_ROUTES = [
    ("GET", "/admin/models"),
    ("POST", "/admin/models"),
    ("POST", "/admin/models/tiny/1/activate"),
    ("POST", "/admin/rollback"),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("sec") / "b", "tiny", "1")


@pytest.fixture(autouse=True)
def _no_oodguard_env(monkeypatch):
    # The developer's OODGUARD_* environment (a real admin token!) must not leak into these tests.
    for key in [k for k in os.environ if k.startswith("OODGUARD_") and k != "OODGUARD_CACHE_DIR"]:
        monkeypatch.delenv(key)


def _client(tmp_path: Path, bundle: Path, token: str | None) -> TestClient:
    settings = Settings(bundle=bundle, models_dir=tmp_path / "models", admin_token=token, batching=False)
    return TestClient(create_app(settings))


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_admin_api_is_absent_without_a_token(tmp_path, bundle, method, path):
    with _client(tmp_path, bundle, None) as client:
        resp = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        unknown = client.request(method, "/admin/no-such-route")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
    # Indistinguishable from a path that does not exist at all (modulo the path itself).
    assert resp.json()["error"]["message"].replace(path, "X") == unknown.json()["error"]["message"].replace(
        "/admin/no-such-route", "X"
    )


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/models", "/admin/models/", "/admin/rollback/", "/admin/x/y/z"])
def test_admin_off_is_absent_on_every_path_and_method(tmp_path, bundle, method, path):
    # issue 18 #12: with admin off, PUT /admin/models answered 405 and /admin/models/ a 307 whose
    # Location reflected the Host header.
    with _client(tmp_path, bundle, None) as client:
        resp = client.request(method, path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "not_found"
    assert "location" not in resp.headers


def test_admin_off_is_not_in_openapi(tmp_path, bundle):
    with _client(tmp_path, bundle, None) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/admin")]
    with _client(tmp_path, bundle, TOKEN) as client:
        assert "/admin/models" in client.get("/openapi.json").json()["paths"]


def test_empty_token_env_means_off(tmp_path, bundle, monkeypatch):
    monkeypatch.setenv("OODGUARD_ADMIN_TOKEN", "")
    settings = Settings(bundle=bundle, models_dir=tmp_path / "models", batching=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/admin/models").status_code == 404


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
    ids=["none", "empty", "bearer-no-token", "basic-scheme", "no-scheme"],
)
def test_missing_credentials_are_401_with_challenge(tmp_path, bundle, method, path, headers):
    with _client(tmp_path, bundle, TOKEN) as client:
        resp = client.request(method, path, headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
@pytest.mark.parametrize("presented", ["wrong-token-wrong-token", TOKEN[:-1], TOKEN + "x", TOKEN.upper()])
def test_wrong_token_is_403(tmp_path, bundle, method, path, presented):
    with _client(tmp_path, bundle, TOKEN) as client:
        resp = client.request(method, path, headers={"Authorization": f"Bearer {presented}"})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden"


def test_right_token_is_let_in_and_never_logged(tmp_path, bundle, caplog):
    caplog.set_level(logging.DEBUG)
    with _client(tmp_path, bundle, TOKEN) as client:
        ok = client.get("/admin/models", headers={"Authorization": f"Bearer {TOKEN}"})
        bad = client.get("/admin/models", headers={"Authorization": "Bearer wrong-guess-123456"})
    assert ok.status_code == 200 and bad.status_code == 403
    assert ok.json()["active"]["version"] == "1"
    assert TOKEN not in caplog.text and "wrong-guess-123456" not in caplog.text
    assert "wrong token" in caplog.text  # the refusal itself is logged


def test_predict_and_health_need_no_token(tmp_path, bundle):
    red = encode_image((255, 0, 0))
    with _client(tmp_path, bundle, TOKEN) as client:  # admin on: only /admin asks for the token
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/models").status_code == 200
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token-0123456789"}):
            resp = client.post("/v1/predict", files={"file": ("red.png", red, "image/png")}, headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.json()["predictions"][0]["label"] == "red"


def test_token_compare():
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN, TOKEN + " ")
    assert not token_matches("", TOKEN)


def test_weak_token_is_refused_at_startup():
    with pytest.raises(ValueError):
        Settings(admin_token="short")
