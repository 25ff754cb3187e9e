"""The admin pipeline fails safely (issue 18): hostile archives, manifests, names and leftovers are
refused with a 4xx that says what happened, nothing is left behind, the old version keeps serving,
and the service still starts afterwards."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from oodguard.service.store import ModelStore, TarLimits, check_tree, remove_tree

from .bundle_factory import make_endless_bundle, make_tiny_bundle
from .test_admin import AUTH, TOKEN, served_version, tar_gz, upload

DEEP = 1200  # nested directories: more than Python's recursion limit (1000)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("failsafe-src")
    return {"1": make_tiny_bundle(root / "b1", "tiny", "1"), "2": make_tiny_bundle(root / "b2", "tiny", "2", logit_scale=6.0)}


@pytest.fixture
def admin_client(make_client, src, tmp_path):
    def _make(**overrides):
        values = {"bundle": src["1"], "models_dir": tmp_path / "models", "admin_token": TOKEN, "batching": False}
        values.update(overrides)
        return make_client(**values)

    return _make


def _deep_dirs(root: Path, depth: int = DEEP) -> Path:
    path = str(root)
    os.makedirs(path, exist_ok=True)
    for _ in range(depth):  # a loop: Path.mkdir(parents=True) and os.makedirs recurse per level
        path += "/d"
        os.mkdir(path)
    Path(path, "leaf.txt").write_text("x")
    return Path(path)


def _nested_tar(depth: int = DEEP) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for level in range(1, depth + 1):
            info = tarfile.TarInfo("/".join(["d"] * level))
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    return buf.getvalue()


# -- #2: nested directories, cleanup, the start-up sweep -------------------------------------------


def test_a_deeply_nested_archive_is_refused_and_leaves_nothing(admin_client, tmp_path):
    client = admin_client()
    data = _nested_tar()
    assert len(data) < 64 * 1024  # tens of KB on the wire
    resp = upload(client, data)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["check"] == "archive" and "levels deep" in resp.json()["error"]["message"]
    assert not any((tmp_path / "models" / ".incoming").iterdir())
    assert served_version(client) == "1"


def test_long_member_paths_are_refused(admin_client):
    long = tar_gz(extra=lambda tar: tar.addfile(tarfile.TarInfo("bundle/" + "x" * 300)))
    resp = upload(admin_client(), long)
    assert resp.status_code == 422 and resp.json()["error"]["check"] == "archive", resp.text


def test_remove_tree_deletes_a_tree_deeper_than_the_recursion_limit(tmp_path):
    _deep_dirs(tmp_path / "top")
    (tmp_path / "outside").write_text("keep")
    os.symlink(tmp_path / "outside", tmp_path / "top" / "link")  # removed, never followed
    assert remove_tree(tmp_path / "top") is True
    assert not (tmp_path / "top").exists() and (tmp_path / "outside").read_text() == "keep"
    assert remove_tree(tmp_path / "never-existed") is True


def test_remove_tree_never_raises(tmp_path, monkeypatch):
    _deep_dirs(tmp_path / "top", 3)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)  # e.g. a directory the service may not write
    assert remove_tree(tmp_path / "top") is False  # reported and logged, not raised
    monkeypatch.undo()
    assert remove_tree(tmp_path / "top") is True


def test_a_stale_deep_staging_leftover_does_not_stop_the_service_starting(make_client, src, tmp_path):
    # The leftover of the old 500 crashed `oodguard serve` at start-up once it was an hour old.
    models = tmp_path / "models"
    leftover = models / ".incoming" / "stage-old"
    _deep_dirs(leftover)
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    client = make_client(bundle=src["1"], models_dir=models, batching=False)
    assert client.get("/readyz").status_code == 200
    assert not leftover.exists()


def test_check_tree_refuses_deep_trees_without_recursing(tmp_path):
    _deep_dirs(tmp_path / "t")
    with pytest.raises(ValueError, match="levels deep"):
        check_tree(tmp_path / "t", TarLimits())
    assert remove_tree(tmp_path / "t")  # pytest's own clean-up of old tmp dirs recurses


def test_registering_a_deep_directory_is_400_or_422_not_500(admin_client, tmp_path, src):
    client = admin_client()
    bundle = make_tiny_bundle(tmp_path / "models" / "incoming" / "deep", "tiny", "5")
    _deep_dirs(bundle / "report")
    resp = client.post("/admin/models", json={"path": "incoming/deep"}, headers=AUTH)
    assert resp.status_code == 422 and resp.json()["error"]["check"] == "files", resp.text
    assert not any((tmp_path / "models" / ".incoming").iterdir())
    assert remove_tree(bundle)


# -- #9: non-finite numbers in a manifest ----------------------------------------------------------


def _with_manifest(tmp: Path, version: str, edit) -> Path:
    bundle = make_tiny_bundle(tmp / f"nan-{version}", "tiny", version)
    text = (bundle / "manifest.json").read_text()
    raw = json.loads(text)
    edit(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw))  # json writes NaN / Infinity literals
    return bundle


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["operating_points"][0].update(threshold=float("nan")),
        lambda m: m.update(metrics={"clean": {"auroc": float("nan")}}),
        lambda m: m.update(metrics={"clean": {"fpr": [0.1, float("inf")]}}),
        lambda m: m["operating_points"][0].update(class_thresholds=None, fpr={"svhn": float("-inf")}),
    ],
    ids=["nan-threshold", "nan-metric", "inf-in-list", "neg-inf-fpr"],
)
def test_non_finite_manifest_numbers_are_refused(admin_client, tmp_path, edit):
    client = admin_client()
    resp = upload(client, tar_gz(_with_manifest(tmp_path, "7", edit)))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["check"] == "schema" and "non-finite" in resp.json()["error"]["message"]
    assert served_version(client) == "1"


def test_a_planted_non_finite_version_cannot_be_activated_and_the_listing_still_answers(admin_client, tmp_path):
    client = admin_client()
    planted = tmp_path / "models" / "tiny" / "8"
    bundle = _with_manifest(tmp_path, "8", lambda m: m["operating_points"][0].update(threshold=float("nan")))
    bundle.rename(planted)  # written straight into the models directory (file deploy)
    resp = client.post("/admin/models/tiny/8/activate", headers=AUTH)
    assert resp.status_code == 422 and resp.json()["error"]["check"] == "schema", resp.text
    assert served_version(client) == "1"
    listing = client.get("/admin/models", headers=AUTH)
    assert listing.status_code == 200 and listing.json()["active"]["version"] == "1"
    assert client.get("/v1/models").status_code == 200


# -- #10: names and paths too long for the filesystem -----------------------------------------------


@pytest.mark.parametrize("path", ["a" * 300, "incoming/" + "b" * 300, "/".join(["c" * 200] * 30)])
def test_overlong_register_paths_are_400(admin_client, path):
    resp = admin_client().post("/admin/models", json={"path": path}, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] in ("not_a_bundle", "outside_models_dir")


@pytest.mark.parametrize("name, version", [("n" * 300, "1"), ("tiny", "v" * 300), ("t" * 65, "1")])
def test_overlong_names_on_activate_are_422(admin_client, name, version):
    client = admin_client()
    resp = client.post(f"/admin/models/{name}/{version}/activate", headers=AUTH)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "bad_name", resp.text
    assert served_version(client) == "1"


# -- #3: a graph that never ends --------------------------------------------------------------------


def test_a_bundle_whose_graph_never_ends_is_refused_within_the_time_limit(admin_client, tmp_path):
    client = admin_client(validate_timeout_s=3.0)
    t0 = time.monotonic()
    resp = upload(client, tar_gz(make_endless_bundle(tmp_path / "endless")))
    elapsed = time.monotonic() - t0
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["check"] == "timeout" and "3 s" in resp.json()["error"]["message"]
    assert elapsed < 30, elapsed
    assert served_version(client) == "1"
    assert not any((tmp_path / "models" / ".incoming").iterdir())


def test_a_planted_endless_version_cannot_be_activated(admin_client, tmp_path):
    client = admin_client(validate_timeout_s=2.0)
    make_endless_bundle(tmp_path / "models" / "tiny" / "9")
    resp = client.post("/admin/models/tiny/9/activate", headers=AUTH)
    assert resp.status_code == 422 and resp.json()["error"]["check"] == "timeout", resp.text
    assert served_version(client) == "1"


# -- #14: listing parses each stored manifest once per change ---------------------------------------


def test_listing_parses_each_manifest_once_per_change(admin_client, tmp_path, monkeypatch):
    from oodguard.service import store as store_mod
    from oodguard.service.bundle import write_manifest
    from oodguard.service.manifest import load_manifest

    big = make_tiny_bundle(tmp_path / "big", "tiny", "2", description="x" * (8 << 20))  # an 8 MB description
    client = admin_client()
    assert upload(client, tar_gz(big)).status_code == 201
    parsed = []
    real = store_mod.load_manifest
    monkeypatch.setattr(store_mod, "load_manifest", lambda d: parsed.append(Path(d).name) or real(d))
    client.app.state.registry.store.forget_manifests()  # registration already read them
    for _ in range(5):
        for path in ("/v1/models", "/admin/models"):
            resp = client.get(path, headers=AUTH)
            assert resp.status_code == 200 and len(resp.json()["versions"]) == 2
    assert sorted(parsed) == ["1", "2"]  # once per version, not once per call
    stored = tmp_path / "models" / "tiny" / "2"
    write_manifest(stored, load_manifest(stored).model_copy(update={"description": "short"}))  # a changed file
    versions = client.get("/v1/models").json()["versions"]
    assert sorted(parsed) == ["1", "2", "2"] and len(versions) == 2


def test_an_input_that_makes_the_served_graph_loop_is_terminated(make_client, tmp_path):
    # The validation child proves the golden and warm-up inputs end; an input-triggered loop in a
    # served model is stopped by the run watchdog (RunOptions.terminate) after request_timeout_s.
    from .bundle_factory import encode_image

    bundle = make_endless_bundle(tmp_path / "trigger", on_white_only=True)
    client = make_client(bundle=bundle, request_timeout_s=1.0)
    png = {"content-type": "image/png"}
    t0 = time.monotonic()
    white = client.post("/v1/predict", content=encode_image((255, 255, 255)), headers=png)
    assert white.status_code == 503 and white.json()["error"]["code"] == "timeout", white.text
    red = client.post("/v1/predict", content=encode_image((255, 0, 0)), headers=png)
    assert red.status_code == 200, red.text  # the inference thread is free again
    assert time.monotonic() - t0 < 60  # stopped, not left to run its 2^62 iterations (generous: a loaded machine)


def test_a_failed_prune_still_answers_the_registration_that_happened(admin_client, src, monkeypatch):
    # Operator-facing answers match what happened: the bundle is registered, so 201, not a 500.
    from oodguard.service import store as store_mod

    def broken(self, name, protect=()):
        raise OSError(28, "No space left on device")

    client = admin_client(keep_versions=1)
    monkeypatch.setattr(store_mod.ModelStore, "prune", broken)
    resp = upload(client, tar_gz(src["2"]))
    assert resp.status_code == 201 and resp.json()["version"] == "2", resp.text
    assert [v["version"] for v in client.get("/admin/models", headers=AUTH).json()["versions"]] == ["1", "2"]
