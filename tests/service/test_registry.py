"""The model registry: loading, validation before swap, pinning, rollback, restart, watch mode, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from oodguard.service.bundle import BundleError, manifest_sha256
from oodguard.service.errors import OodguardError
from oodguard.service.metrics import ServiceMetrics
from oodguard.service.registry import ModelRegistry, Registration
from oodguard.service.settings import Settings
from oodguard.service.store import STATE_FILE, ModelStore

from .bundle_factory import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]


class _Metrics(ServiceMetrics):
    """The service's metrics in a private prometheus registry, read back by name."""

    def __init__(self):
        super().__init__(registry=CollectorRegistry())

    def swaps(self, result: str) -> float:
        return self.registry.get_sample_value("oodguard_model_swaps_total", {"result": result}) or 0.0

    def info(self) -> dict:
        for metric in self.registry.collect():
            if metric.name == "oodguard_model":
                return dict(metric.samples[0].labels)
        return {}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {v: make_tiny_bundle(root / f"tiny-{v}", "tiny", v, logit_scale=5.0 * int(v)) for v in ("1", "2", "3")}
    out["other-classes"] = make_tiny_bundle(root / "cc", "tiny", "cc", classes=("cyan", "magenta", "yellow"))
    return out


def _settings(tmp_path: Path, bundle: Path | None, models: bool = True, **kw) -> Settings:
    return Settings(bundle=bundle, models_dir=(tmp_path / "models") if models else None, max_batch=4, **kw)


def _registry(tmp_path, src, metrics=None, bundle="1", **kw) -> ModelRegistry:
    reg = ModelRegistry(_settings(tmp_path, src[bundle] if bundle else None, **kw), metrics=metrics)
    reg.load_initial()
    return reg


def _add(reg: ModelRegistry, bundle: Path) -> Registration:
    # Bundles built outside the models dir are registered the trusted way (as `serve --bundle` does).
    return reg.register_path(bundle, trusted=True)


def _tamper_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- single-bundle mode ---------------------------------------------------------------------------


def test_bundle_mode_serves_and_refuses_registry_operations(tmp_path, src):
    reg = _registry(tmp_path, src, models=False)
    assert reg.active.version == "1" and reg.active is not None
    out = reg.active.run(np.zeros((2, 3, 8, 8), np.float32))
    assert set(out) == {"logits", "probs", "msp", "energy"} and out["probs"].shape == (2, 3)
    assert [v.version for v in reg.versions()] == ["1"] and reg.versions()[0].active
    for call in (lambda: reg.activate("tiny", "2"), reg.rollback, lambda: reg.register_path(src["2"])):
        with pytest.raises(OodguardError) as err:
            call()
        assert err.value.code == "no_models_dir" and err.value.http_status == 409


def test_bundle_mode_refuses_an_invalid_bundle(tmp_path, src):
    bad = tmp_path / "bad"
    make_tiny_bundle(bad, "tiny", "1")
    _tamper_byte(bad / "model.onnx")
    with pytest.raises(BundleError) as err:
        ModelRegistry(_settings(tmp_path, bad, models=False)).load_initial()
    assert err.value.check == "hash"


def test_p_values_use_the_bundle_calibration(tmp_path, src):
    model = _registry(tmp_path, src, models=False).active
    p = model.p_values(np.array([model.calibration[0] - 1, model.calibration[-1] + 1]))
    n = model.calibration.size
    assert p[0] == pytest.approx(1 / (n + 1)) and p[1] == pytest.approx(1.0)


# -- models dir: seed, activate, rollback, restart ------------------------------------------------


def test_empty_models_dir_is_seeded_from_bundle_and_active_wins_on_restart(tmp_path, src):
    reg = _registry(tmp_path, src)
    assert reg.active.version == "1"
    assert (tmp_path / "models" / "tiny" / "1" / "manifest.json").is_file()
    _add(reg, src["2"])
    reg.activate("tiny", "2")
    # Restart with the original --bundle: the persisted activation wins.
    restarted = _registry(tmp_path, src, bundle="1")
    assert restarted.active.version == "2"
    assert restarted.active.sha256 == manifest_sha256(src["2"])


def test_models_dir_without_active_and_without_bundle_is_a_clear_error(tmp_path, src):
    with pytest.raises(OodguardError, match="no ACTIVE version"):
        _registry(tmp_path, src, bundle=None)


def test_activate_and_rollback_count_metrics_and_update_model_info(tmp_path, src):
    metrics = _Metrics()
    reg = _registry(tmp_path, src, metrics=metrics)
    assert metrics.info()["version"] == "1"
    result = _add(reg, src["2"])
    assert result.created and result.contract_compatible and "golden" in result.checks
    swap = reg.activate("tiny", "2")
    assert swap.result == "success" and swap.previous["version"] == "1" and swap.current["version"] == "2"
    assert set(swap.timings_s) == {"validate", "warm"} and swap.timings_s["validate"] > 0
    assert metrics.info()["version"] == "2" and metrics.swaps("success") == 1
    assert reg.activate("tiny", "2").result == "unchanged"
    back = reg.rollback()
    assert back.current["version"] == "1" and reg.active.version == "1"
    assert metrics.swaps("rollback") == 1 and metrics.info()["version"] == "1"
    with pytest.raises(OodguardError, match="no previous version"):
        reg.rollback()
    versions = {v.version: v.to_dict() for v in reg.versions()}
    assert versions["1"]["active"] and not versions["2"]["active"]
    assert versions["2"]["metrics"] == {"clean": {"auroc": 0.99}, "attacked": {"auroc": 0.9}}
    assert versions["2"]["threshold"] is not None and versions["2"]["registered_at"]


def test_unknown_version_is_404(tmp_path, src):
    with pytest.raises(OodguardError) as err:
        _registry(tmp_path, src).activate("tiny", "42")
    assert err.value.http_status == 404


@pytest.mark.parametrize("tamper", ["model_byte", "manifest_digest", "manifest_version", "golden", "missing_file"])
def test_tampered_version_is_refused_and_changes_nothing(tmp_path, src, tamper):
    metrics = _Metrics()
    reg = _registry(tmp_path, src, metrics=metrics)
    vdir = Path(_add(reg, src["2"]).path)
    manifest_path = vdir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if tamper == "model_byte":
        _tamper_byte(vdir / "model.onnx")
    elif tamper == "manifest_digest":
        manifest["files"]["calibration.npy"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif tamper == "manifest_version":  # a manifest that no longer describes the directory it sits in
        manifest["version"] = "3"
        manifest_path.write_text(json.dumps(manifest))
    elif tamper == "golden":
        np.savez(vdir / "golden.npz", image=np.ones((1, 3, 8, 8), np.float32))
    else:
        (vdir / "calibration.npy").unlink()
    state_before = (tmp_path / "models" / STATE_FILE).read_bytes()
    with pytest.raises(BundleError) as err:
        reg.activate("tiny", "2")
    assert err.value.check in {"hash", "files", "location", "golden"}
    assert reg.active.version == "1" and not reg.active.released
    assert reg.active.run(np.zeros((1, 3, 8, 8), np.float32))["probs"].shape == (1, 3)
    state_after = json.loads((tmp_path / "models" / STATE_FILE).read_text())
    assert state_after["active"] == "tiny/1"
    assert json.loads(state_before)["history"] == state_after["history"]
    assert metrics.swaps("failure") == 1 and metrics.info()["version"] == "1"


def test_contract_change_needs_consent(tmp_path, src):
    reg = _registry(tmp_path, src)
    result = _add(reg, src["other-classes"])
    assert not result.contract_compatible and "classes" in result.contract_changes
    with pytest.raises(BundleError) as err:
        reg.activate("tiny", "cc")
    assert err.value.check == "contract" and "classes" in err.value.message
    assert reg.active.version == "1"
    assert reg.activate("tiny", "cc", allow_contract_change=True).result == "success"
    assert reg.active.manifest.classes == ["cyan", "magenta", "yellow"]


def test_register_path_must_be_inside_models_dir(tmp_path, src):
    reg = _registry(tmp_path, src)
    with pytest.raises(OodguardError) as err:
        reg.register_path(src["2"])
    assert err.value.code == "outside_models_dir" and err.value.http_status == 400
    inside = tmp_path / "models" / "incoming"
    inside.mkdir()
    os.symlink(src["2"], inside / "link")
    with pytest.raises(OodguardError):
        reg.register_path(inside / "link")
    make_tiny_bundle(inside / "fresh", "tiny", "5")
    result = reg.register_path(inside / "fresh")
    assert result.version == "5" and Path(result.path) == tmp_path / "models" / "tiny" / "5"


def test_registering_prunes_old_versions_but_never_the_active(tmp_path, src):
    reg = _registry(tmp_path, src, keep_versions=2)
    for v in ("2", "3"):
        _add(reg, src[v])
    assert [v.version for v in reg.versions()] == ["1", "3"]


# -- pinning ----------------------------------------------------------------------------------------


def test_in_flight_requests_keep_the_old_session_until_they_drain(tmp_path, src):
    reg = _registry(tmp_path, src)
    _add(reg, src["2"])
    with reg.acquire() as old:
        with reg.acquire() as old_again:
            assert old is old_again and old.inflight == 2
            reg.activate("tiny", "2")
            assert reg.active.version == "2"
            assert not old.released  # still pinned twice
            assert old.run(np.zeros((1, 3, 8, 8), np.float32))["probs"].shape == (1, 3)
        assert not old.released  # pinned once
    assert old.released and old.inflight == 0
    with reg.acquire() as new:
        assert new.version == "2" and not new.released


def test_acquire_before_load_is_503(tmp_path, src):
    reg = ModelRegistry(_settings(tmp_path, src["1"]))
    with pytest.raises(OodguardError) as err:
        with reg.acquire():
            pass
    assert err.value.http_status == 503


def test_concurrent_swaps_are_serialised(tmp_path, src):
    reg = _registry(tmp_path, src)
    for v in ("2", "3"):
        _add(reg, src[v])
    errors = []

    def swap(version):
        try:
            for _ in range(5):
                reg.activate("tiny", version)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=swap, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pointer = ModelStore(tmp_path / "models").pointer()[0]
    assert pointer == reg.active.ref  # memory and disk agree after the race


# -- watch mode ---------------------------------------------------------------------------------------


def test_watch_picks_up_a_new_pointer(tmp_path, src):
    reg = _registry(tmp_path, src)
    _add(reg, src["2"])
    store = ModelStore(tmp_path / "models")
    reg.watcher.start(0.05)
    try:
        store.set_active("tiny", "2")  # what `oodguard deploy --models-dir` does from another process
        deadline = time.monotonic() + 10
        while reg.active.version != "2" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reg.active.version == "2"
        (tmp_path / "models" / STATE_FILE).write_text("tiny/1\n")  # a hand-written pointer works too
        deadline = time.monotonic() + 10
        while reg.active.version != "1" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reg.active.version == "1"
    finally:
        reg.watcher.stop()


def test_watch_does_not_switch_to_a_broken_pointer_nor_retry_it(tmp_path, src, monkeypatch):
    metrics = _Metrics()
    reg = _registry(tmp_path, src, metrics=metrics)
    vdir = Path(_add(reg, src["2"]).path)
    _tamper_byte(vdir / "model.onnx")
    ModelStore(tmp_path / "models").set_active("tiny", "2")
    assert reg.watcher.check() is None and reg.active.version == "1"
    assert reg.watcher.check() is None
    assert metrics.swaps("failure") == 1  # not retried while the pointer is unchanged


def test_restart_with_broken_active_falls_back_to_history(tmp_path, src, caplog):
    reg = _registry(tmp_path, src)
    vdir = Path(_add(reg, src["2"]).path)
    reg.activate("tiny", "2")
    _tamper_byte(vdir / "model.onnx")
    restarted = _registry(tmp_path, src)
    assert restarted.active.version == "1"
    assert "failed validation" in caplog.text


# -- crashes during a swap ------------------------------------------------------------------------------


def test_crash_before_persisting_leaves_the_previous_version(tmp_path, src, monkeypatch):
    reg = _registry(tmp_path, src)
    _add(reg, src["2"])

    def _die(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(reg.store, "set_active", _die)
    with pytest.raises(OSError):
        reg.activate("tiny", "2")
    assert reg.active.version == "1"
    monkeypatch.undo()
    assert _registry(tmp_path, src).active.version == "1"


def test_crash_after_persisting_restarts_on_the_new_validated_version(tmp_path, src, monkeypatch):
    reg = _registry(tmp_path, src)
    _add(reg, src["2"])

    persist = reg.store.set_active

    def _die(*a, **k):
        persist(*a, **k)
        raise KeyboardInterrupt("process killed between persist and switch")

    monkeypatch.setattr(reg.store, "set_active", _die)
    with pytest.raises(KeyboardInterrupt):
        reg.activate("tiny", "2")
    assert _registry(tmp_path, src).active.version == "2"


_CHILD = textwrap.dedent(
    """
    import sys, time
    from oodguard.service import registry as registry_mod
    from oodguard.service.registry import ModelRegistry
    from oodguard.service.settings import Settings

    mode, models = sys.argv[1], sys.argv[2]
    reg = ModelRegistry(Settings(models_dir=models, max_batch=2))
    reg.load_initial()
    if mode == "hang-in-validation":
        real = registry_mod.verify_bundle
        def slow_verify(*a, **k):
            print("validating", flush=True)
            time.sleep(60)
            return real(*a, **k)
        registry_mod.verify_bundle = slow_verify
        reg.activate("tiny", "2")
    else:  # flip between versions as fast as possible until killed
        print("flipping", flush=True)
        while True:
            reg.activate("tiny", "2")
            reg.activate("tiny", "1")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hang-in-validation", "flip"])
def test_killed_process_leaves_a_consistent_state(tmp_path, src, mode):
    reg = _registry(tmp_path, src)
    _add(reg, src["2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OODGUARD_BUNDLE", None)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, str(tmp_path / "models")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() in {"validating", "flipping"}, child.stderr.read()
        if mode == "flip":
            time.sleep(0.7)  # dozens of activations: the kill lands at an arbitrary point
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    state = json.loads((tmp_path / "models" / STATE_FILE).read_text())  # parseable, never half-written
    restarted = _registry(tmp_path, src, bundle=None)
    if mode == "hang-in-validation":
        assert state["active"] == "tiny/1" and restarted.active.version == "1"
    else:
        assert state["active"] in {"tiny/1", "tiny/2"} and restarted.active.ref == state["active"]
        assert len(state["events"]) > 4


def test_watch_retries_a_failed_pointer_once_the_file_is_rewritten(tmp_path, src):
    reg = _registry(tmp_path, src)
    vdir = Path(_add(reg, src["2"]).path)
    good = (vdir / "model.onnx").read_bytes()
    _tamper_byte(vdir / "model.onnx")
    store = ModelStore(tmp_path / "models")
    store.set_active("tiny", "2")
    assert reg.watcher.check() is None and reg.active.version == "1"
    (vdir / "model.onnx").write_bytes(good)  # the operator fixes the bundle...
    assert reg.watcher.check() is None  # ...nothing happens until the pointer is written again
    time.sleep(0.01)
    store.set_active("tiny", "2")
    assert reg.watcher.check().result == "success" and reg.active.version == "2"
