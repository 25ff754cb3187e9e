"""The on-disk model store: atomic state, history, install, pruning and safe tar extraction."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from oodguard.service.bundle import BundleError, manifest_sha256
from oodguard.service.errors import OodguardError
from oodguard.service.store import STATE_FILE, ModelStore, TarLimits, safe_extract_tar

from .bundle_factory import make_tiny_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {v: make_tiny_bundle(root / f"tiny-{v}", "tiny", v, logit_scale=10.0 + int(v)) for v in ("1", "2", "3", "4")}


def _install(store: ModelStore, bundle: Path) -> tuple[str, str, Path, bool]:
    from oodguard.service.store import copy_bundle

    with store.staging_dir() as stage:
        return store.install(copy_bundle(bundle, stage / "b"))


def _tar_bytes(add, mode: str = "w:gz") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        add(tar)
    buf.seek(0)
    return buf


def _file_member(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# -- state ---------------------------------------------------------------------------------------------


def test_empty_store_has_no_pointer(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.pointer() is None
    assert store.read_state().history == []


def test_activate_persists_pointer_and_history(tmp_path, bundles):
    store = ModelStore(tmp_path)
    for v in ("1", "2", "3"):
        _install(store, bundles[v])
    store.set_active("tiny", "1")
    store.set_active("tiny", "2")
    store.set_active("tiny", "3", allow_contract_change=True)
    fresh = ModelStore(tmp_path)  # a new process reads the same state
    assert fresh.pointer() == ("tiny/3", True)
    assert fresh.read_state().history == ["tiny/1", "tiny/2"]
    assert [e["action"] for e in fresh.read_state().events][-3:] == ["activate", "activate", "activate"]


def test_rollback_walks_back_through_history(tmp_path, bundles):
    store = ModelStore(tmp_path)
    for v in ("1", "2", "3"):
        _install(store, bundles[v])
        store.set_active("tiny", v)
    assert store.rollback_target() == "tiny/2"
    store.commit_rollback("tiny/2")
    assert store.pointer()[0] == "tiny/2"
    assert store.rollback_target() == "tiny/1"
    store.commit_rollback("tiny/1")
    assert store.rollback_target() is None


def test_rollback_skips_versions_missing_on_disk(tmp_path, bundles):
    store = ModelStore(tmp_path)
    for v in ("1", "2", "3"):
        _install(store, bundles[v])
        store.set_active("tiny", v)
    os.rename(tmp_path / "tiny" / "2", tmp_path / "gone")
    assert store.rollback_target() == "tiny/1"


def test_set_active_unknown_version_is_404(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(OodguardError) as err:
        store.set_active("tiny", "9")
    assert err.value.http_status == 404


def test_hand_written_pointer_is_accepted(tmp_path):
    store = ModelStore(tmp_path)
    (tmp_path / STATE_FILE).write_text("tiny/7\n")
    assert store.pointer() == ("tiny/7", False)


@pytest.mark.parametrize("content", ['{"active": ', "not a pointer", '{"active": "no-slash"}'])
def test_unreadable_state_is_an_error_not_a_guess(tmp_path, content):
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(OodguardError):
        ModelStore(tmp_path).read_state()


def test_failed_state_write_leaves_old_state_and_no_temp_files(tmp_path, bundles, monkeypatch):
    store = ModelStore(tmp_path)
    for v in ("1", "2"):
        _install(store, bundles[v])
    store.set_active("tiny", "1")
    before = (tmp_path / STATE_FILE).read_bytes()

    def _crash(src, dst):  # the process dies between writing the temp file and the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError):
        store.set_active("tiny", "2")
    monkeypatch.undo()
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert store.pointer()[0] == "tiny/1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- install and prune ---------------------------------------------------------------------------------


def test_install_is_idempotent_and_refuses_different_content(tmp_path, bundles):
    store = ModelStore(tmp_path)
    name, version, dest, created = _install(store, bundles["1"])
    assert (name, version, created) == ("tiny", "1", True)
    assert manifest_sha256(dest) == manifest_sha256(bundles["1"])
    assert _install(store, bundles["1"])[3] is False
    other = make_tiny_bundle(tmp_path.parent / "other-1", "tiny", "1", logit_scale=3.0)
    with pytest.raises(OodguardError) as err:
        _install(store, other)
    assert err.value.code == "version_exists"
    assert manifest_sha256(dest) == manifest_sha256(bundles["1"])
    assert not list((tmp_path / ".incoming").iterdir())  # staging cleaned up


def test_prune_keeps_last_n_and_never_the_active(tmp_path, bundles):
    store = ModelStore(tmp_path, keep_versions=2)
    _install(store, bundles["1"])
    store.set_active("tiny", "1")
    for v in ("2", "3", "4"):
        _install(store, bundles[v])
    removed = store.prune("tiny")
    left = [v for _, v, _ in store.list_versions()]
    assert removed == ["tiny/2", "tiny/3"]
    assert left == ["1", "4"]  # 1 survives because it is active


@pytest.mark.parametrize("bad", ["../x", "a/../b", ".hidden", "a/b"])
def test_version_dir_refuses_unsafe_names(tmp_path, bad):
    with pytest.raises(OodguardError):
        ModelStore(tmp_path).version_dir("tiny", bad)


def test_is_inside(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.is_inside(tmp_path / "models" / "a" / "b")
    assert not store.is_inside(tmp_path / "models" / ".." / "elsewhere")
    os.symlink(tmp_path, tmp_path / "models" / "escape")
    assert not store.is_inside(tmp_path / "models" / "escape" / "x")


# -- safe tar extraction --------------------------------------------------------------------------------


def test_extracts_bundle_under_one_top_level_folder(tmp_path, bundles):
    buf = _tar_bytes(lambda t: t.add(bundles["1"], arcname="tiny-1"))
    root = safe_extract_tar(buf, tmp_path / "out")
    assert root == tmp_path / "out" / "tiny-1"
    assert manifest_sha256(root) == manifest_sha256(bundles["1"])


def test_extracts_flat_bundle(tmp_path, bundles):
    def add(t):
        for p in sorted(bundles["1"].iterdir()):
            t.add(p, arcname=p.name)

    assert safe_extract_tar(_tar_bytes(add), tmp_path / "out") == tmp_path / "out"


def _symlink(t):
    info = tarfile.TarInfo("b/evil")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    t.addfile(info)


def _hardlink(t):
    _file_member(t, "b/a")
    info = tarfile.TarInfo("b/evil")
    info.type = tarfile.LNKTYPE
    info.linkname = "b/a"
    t.addfile(info)


def _device(t):
    info = tarfile.TarInfo("b/dev")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    t.addfile(info)


def _fifo(t):
    info = tarfile.TarInfo("b/fifo")
    info.type = tarfile.FIFOTYPE
    t.addfile(info)


@pytest.mark.parametrize(
    "add, message",
    [
        (lambda t: _file_member(t, "../evil"), "escapes"),
        (lambda t: _file_member(t, "b/../../evil"), "escapes"),
        (lambda t: _file_member(t, "/abs/evil"), "absolute"),
        (_symlink, "link"),
        (_hardlink, "link"),
        (_device, "regular file"),
        (_fifo, "regular file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_refuses_unsafe_members_and_writes_nothing(tmp_path, add, message):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BundleError) as err:
        safe_extract_tar(_tar_bytes(add), out)
    assert err.value.check == "archive" and message in err.value.message
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_refuses_too_many_members(tmp_path):
    buf = _tar_bytes(lambda t: [_file_member(t, f"b/f{i}") for i in range(11)])
    with pytest.raises(BundleError, match="more than 10 entries"):
        safe_extract_tar(buf, tmp_path / "out", TarLimits(max_members=10))


def test_refuses_oversized_content_before_writing_it(tmp_path):
    # Highly compressible: tiny on the wire, large unpacked (a small "zip bomb").
    buf = _tar_bytes(lambda t: _file_member(t, "b/big", b"\0" * 200_000))
    assert len(buf.getvalue()) < 2_000
    with pytest.raises(BundleError, match="exceeds 100000 bytes"):
        safe_extract_tar(buf, tmp_path / "out", TarLimits(max_total_bytes=100_000))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize("payload", [b"", b"not a tar at all", b"\x1f\x8b\x08\x00garbage"])
def test_refuses_non_archives(tmp_path, payload):
    with pytest.raises(BundleError) as err:
        safe_extract_tar(io.BytesIO(payload), tmp_path / "out")
    assert err.value.check == "archive"


def test_refuses_archive_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        safe_extract_tar(_tar_bytes(lambda t: _file_member(t, "b/model.onnx")), tmp_path / "out")


def test_state_file_is_plain_json(tmp_path, bundles):
    store = ModelStore(tmp_path)
    _install(store, bundles["1"])
    store.set_active("tiny", "1")
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    assert raw["active"] == "tiny/1" and "tiny/1" in raw["registered"]


def test_concurrent_installs_of_one_version_create_it_once(tmp_path, bundles, monkeypatch):
    import threading
    import time

    from oodguard.service.store import copy_bundle

    real_rename = os.rename

    def slow_rename(src, dst):  # widen the window between "does it exist?" and the rename
        time.sleep(0.05)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", slow_rename)
    store = ModelStore(tmp_path)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def install():
        try:
            with store.staging_dir() as stage:
                staged = copy_bundle(bundles["1"], stage / "b")
                barrier.wait()
                results.append(store.install(staged)[3])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [False, False, False, True]
    assert manifest_sha256(tmp_path / "tiny" / "1") == manifest_sha256(bundles["1"])


def test_stale_staging_dirs_from_killed_processes_are_swept(tmp_path):
    store = ModelStore(tmp_path)
    with store.staging_dir() as fresh:
        stale = tmp_path / ".incoming" / "stage-old"
        stale.mkdir()
        (stale / "half-written").write_bytes(b"x")
        old = time.time() - 2 * 3600
        os.utime(stale, (old, old))
        ModelStore(tmp_path)  # a restart
        assert not stale.exists() and fresh.exists()


def test_only_bundles_stored_under_their_own_name_and_version_are_listed(tmp_path, bundles):
    store = ModelStore(tmp_path)
    _install(store, bundles["1"])
    from oodguard.service.store import copy_bundle

    copy_bundle(bundles["2"], tmp_path / "incoming-drop" / "b3")  # a drop folder: tiny/2 stored as incoming-drop/b3
    copy_bundle(bundles["3"], tmp_path / "tiny" / "not-3")  # right name, wrong version folder
    assert [(n, v) for n, v, _ in store.list_versions()] == [("tiny", "1")]
