"""The model registry: which validated, warmed bundle is served, and swapping it without dropping a request.

A swap is: validate (`verify_bundle`: schema, every sha256, onnxruntime loads it, golden outputs,
plus the client contract unless the caller consents to a change; first in a child process with a
wall-clock limit, `isolate.py`, so a graph that never ends cannot wedge it), warm with a dummy batch, persist
the new pointer, then switch one reference. Requests pin the model they started with through
`acquire()`; a retired model's onnxruntime session is released once its last pinned request ends.
Swaps are serialised by a lock and are blocking work: async callers run them in a thread.

Two modes: a models directory (versioned bundles + persisted ACTIVE pointer, see store.py), or a
single `--bundle` directory served as is (no upload, activation or rollback).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from .bundle import BundleError, verify_bundle
from .isolate import kill_children, verify_in_child
from .loaded_model import LoadedModel, contract_diff, key_metrics
from .manifest import MANIFEST_FILE, BundleManifest
from .store import ModelStore, StoreError, TarLimits, check_tree, copy_bundle, ref, safe_extract_tar, split_ref

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelRegistry", "RegistryError", "SwapResult"]


class RegistryError(Exception):
    """A registry operation was refused (not a bundle failing validation: that is BundleError)."""

    def __init__(self, code: str, message: str, status: int = 409):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class SwapResult:
    """What an activation / rollback / registration did, for logs and the admin API."""

    action: str
    result: str  # "success" | "unchanged" | "failure"
    previous: dict[str, Any] | None = None
    current: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ModelRegistry:
    """Loads, validates, serves and swaps bundles. One instance per service process."""

    def __init__(self, settings, metrics=None):
        self.settings = settings
        self.metrics = metrics
        self._pin_lock = threading.Lock()  # tiny critical sections: safe to take on the event loop
        self._swap_lock = threading.Lock()  # one swap at a time; held through validation (seconds)
        self._active: LoadedModel | None = None
        models_dir = getattr(settings, "models_dir", None)
        self.store: ModelStore | None = (
            ModelStore(models_dir, keep_versions=getattr(settings, "keep_versions", 5)) if models_dir else None
        )
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        # The state-file signature whose pointer failed: not retried until the file is rewritten.
        self._watch_failed: tuple[int, int, int] | None = None
        self.last_swap: SwapResult | None = None

    # -- serving ------------------------------------------------------------------------------------
    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @property
    def ready(self) -> bool:
        return self._active is not None

    @contextlib.contextmanager
    def acquire(self) -> Iterator[LoadedModel]:
        """Pin the active model for one request / batch; a swap during it does not release its session."""
        with self._pin_lock:
            model = self._active
            if model is None:
                raise RegistryError("not_ready", "no model is loaded yet", status=503)
            model._inflight += 1
        try:
            yield model
        finally:
            with self._pin_lock:
                model._inflight -= 1
                release = model._retired and model._inflight == 0
            if release:
                model._release()

    def _switch(self, new: LoadedModel) -> LoadedModel | None:
        with self._pin_lock:
            old, self._active = self._active, new
            release = False
            if old is not None and old is not new:
                old._retired = True
                release = old._inflight == 0
        if release:
            old._release()
        self._set_model_info(new)
        return old

    # -- loading ------------------------------------------------------------------------------------
    def _warm_batches(self) -> tuple[int, ...]:
        return tuple(sorted({1, max(1, int(getattr(self.settings, "max_batch", 1) or 1))}))

    def _verify_isolated(self, bundle_dir: Path) -> None:
        """The whole check + warm-up in a child process killed after validate_timeout_s (see isolate.py)."""
        verify_in_child(
            bundle_dir,
            intra_op_threads=int(getattr(self.settings, "intra_op_threads", 1)),
            warm_batches=self._warm_batches(),
            timeout_s=float(getattr(self.settings, "validate_timeout_s", 120.0)),
        )

    def _load(
        self, bundle_dir: Path, expect: str | None = None, isolated: bool = True
    ) -> tuple[LoadedModel, dict[str, float], list[str]]:
        """Validate + warm a bundle. Raises BundleError naming the failed check; touches no shared state.

        `expect` ("name/version"): the store path it was found under, which its manifest must match.
        `isolated`: first pass every check in a child process with a time limit (bundles from the
        models directory or the admin API; the operator's own `--bundle` alone is trusted to end).
        """
        threads = int(getattr(self.settings, "intra_op_threads", 1))  # 0 = onnxruntime default
        t0 = time.perf_counter()
        if isolated:
            self._verify_isolated(bundle_dir)
        # verify_bundle hashes every file before onnxruntime ever parses the graph; we then serve the
        # very session it verified.
        report = verify_bundle(bundle_dir, intra_op_threads=threads)
        if expect is not None and ref(report.manifest.name, report.manifest.version) != expect:
            raise BundleError(
                "location",
                f"the manifest says {ref(report.manifest.name, report.manifest.version)} "
                f"but the bundle is stored as {expect}",
            )
        t1 = time.perf_counter()
        model = LoadedModel(bundle_dir, report.manifest, report.sha256, report.session, report.calibration)
        self._warm(model)
        t2 = time.perf_counter()
        return model, {"validate": round(t1 - t0, 4), "warm": round(t2 - t1, 4)}, list(report.checks) + ["warm"]

    def _warm(self, model: LoadedModel) -> None:
        spec = model.manifest.input
        for batch in self._warm_batches():
            dummy = np.zeros((batch, spec.channels, spec.height, spec.width), dtype=np.float32)
            try:
                model.run(dummy)
            except Exception as exc:
                raise BundleError("warm", f"warm-up batch of {batch} failed: {exc}") from None

    def load_initial(self) -> LoadedModel:
        """Serve `--bundle`, or the models dir's ACTIVE version (seeding it from `--bundle` when empty)."""
        bundle = getattr(self.settings, "bundle", None)
        if self.store is None:
            if not bundle:
                raise RegistryError("no_model", "set a bundle (OODGUARD_BUNDLE / --bundle) or a models dir", 500)
            model, timings, _ = self._load(Path(bundle).resolve(), isolated=False)
            self._switch(model)
            log.info("serving %s from %s (validate %.3fs, warm %.3fs)", model.ref, bundle, timings["validate"], timings["warm"])
            return model

        pointer = self.store.pointer()
        if pointer is None:
            if not bundle:
                raise RegistryError("no_model", f"{self.store.root} has no ACTIVE version and no --bundle was given", 500)
            result = self.register_path(Path(bundle), _trusted=True)
            name, version = result["name"], result["version"]
            self.store.set_active(name, version, action="seed")
            log.info("models dir %s was empty: seeded it with %s from %s", self.store.root, ref(name, version), bundle)
            pointer = self.store.pointer()
        elif bundle:
            log.info("models dir %s has an ACTIVE version (%s); it wins over --bundle %s", self.store.root, pointer[0], bundle)

        candidates = [pointer[0]] + list(reversed(self.store.read_state().history))
        errors = []
        for candidate in dict.fromkeys(candidates):
            try:
                model, timings, _ = self._load(self.store.version_dir(*split_ref(candidate)), expect=candidate)
            except (BundleError, StoreError) as exc:
                errors.append(f"{candidate}: {exc}")
                log.error("cannot serve %s: %s", candidate, exc)
                self._count_swap("failure")
                continue
            if candidate != pointer[0]:
                # Do not rewrite ACTIVE: the operator should see (and fix) what they pointed at.
                log.error("ACTIVE points at %s which failed validation; serving %s from history instead", pointer[0], candidate)
                self._watch_failed = self.store.state_signature()
            self._switch(model)
            log.info("serving %s (validate %.3fs, warm %.3fs)", model.ref, timings["validate"], timings["warm"])
            return model
        raise RegistryError("no_model", "no servable version: " + "; ".join(errors), 500)

    # -- listing ------------------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        """Every version known (the active one marked), oldest registration first."""
        active = self._active
        if self.store is None:
            return [self._describe(active.manifest, active.sha256, active=True)] if active else []
        out = []
        state = self.store.read_state()
        for name, version, vdir in self.store.list_versions():
            is_active = active is not None and active.name == name and active.version == version
            stored = self.store.read_manifest(vdir)  # parsed once per change of the file
            if stored.manifest is not None:
                entry = self._describe(stored.manifest, stored.sha256, active=is_active)
            else:
                entry = {"name": name, "version": version, "active": is_active, "error": stored.error}
            entry["registered_at"] = state.registered.get(ref(name, version))
            entry["pointer"] = state.active == ref(name, version)
            out.append(entry)
        return out

    @staticmethod
    def _describe(manifest: BundleManifest, sha256: str, active: bool) -> dict[str, Any]:
        return {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": sha256,
            "active": active,
            "created_at": manifest.created_at.isoformat(),
            **key_metrics(manifest),
        }

    # -- registering --------------------------------------------------------------------------------
    def require_store(self) -> ModelStore:
        if self.store is None:
            raise RegistryError(
                "no_models_dir",
                "the service runs a single --bundle without a models directory; "
                "start it with --models-dir / OODGUARD_MODELS_DIR to upload, activate or roll back",
                status=409,
            )
        return self.store

    def _tar_limits(self) -> TarLimits:
        return TarLimits(
            max_total_bytes=int(getattr(self.settings, "max_bundle_bytes", TarLimits.max_total_bytes)),
            max_members=int(getattr(self.settings, "max_bundle_files", TarLimits.max_members)),
        )

    def register_tar(self, fileobj: BinaryIO | str | Path) -> dict[str, Any]:
        """Safely extract an uploaded bundle archive, validate it and install it. Does not activate."""
        store = self.require_store()
        with self._counting_rejections(), store.staging_dir() as stage:
            if isinstance(fileobj, (str, Path)):
                with open(fileobj, "rb") as fh:
                    root = safe_extract_tar(fh, stage / "x", self._tar_limits())
            else:
                root = safe_extract_tar(fileobj, stage / "x", self._tar_limits())
            return self._validate_and_install(store, root)

    def register_path(self, path: str | Path, _trusted: bool = False) -> dict[str, Any]:
        """Validate and install a bundle directory that lies inside the models dir (or, `_trusted`, anywhere)."""
        store = self.require_store()
        src = Path(path)
        shown = str(path)[:200]
        try:
            if not _trusted and not store.is_inside(src):
                raise RegistryError("outside_models_dir", f"{shown} is not inside the models directory {store.root}", 400)
            if src.is_symlink() or not src.is_dir() or not (src / MANIFEST_FILE).is_file():
                # Checked before copying: the models dir itself (path "") would be copied into its own staging dir.
                raise RegistryError("not_a_bundle", f"{shown} is not a bundle directory (no {MANIFEST_FILE})", 400)
            if not _trusted and any(part.startswith(".") for part in src.resolve().relative_to(store.root).parts):
                raise RegistryError("not_a_bundle", f"{shown} is in a hidden (staging) directory of the models dir", 400)
        except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES, ...: not a path that can hold a bundle
            raise RegistryError("not_a_bundle", f"{shown} cannot be read as a bundle directory ({exc.strerror})", 400) from None
        with self._counting_rejections(), store.staging_dir() as stage:
            check_tree(src.resolve(), self._tar_limits())  # copytree and hashing recurse per level
            copy = copy_bundle(src.resolve(), stage / "bundle")
            return self._validate_and_install(store, copy)

    @contextlib.contextmanager
    def _counting_rejections(self) -> Iterator[None]:
        try:
            yield
        except BundleError as exc:
            self._count_swap("rejected")
            log.warning("bundle refused at registration: %s", exc)
            raise

    def _validate_and_install(self, store: ModelStore, root: Path) -> dict[str, Any]:
        threads = int(getattr(self.settings, "intra_op_threads", 1))  # 0 = onnxruntime default
        t0 = time.perf_counter()
        self._verify_isolated(root)
        report = verify_bundle(root, intra_op_threads=threads)
        name, version, dest, created = store.install(root)
        active = self._active
        contract_changes = contract_diff(active.manifest, report.manifest) if active else {}
        log.info("registered %s (%s, checks %s)", ref(name, version), "new" if created else "already present", report.checks)
        if created:
            with self._swap_lock:  # never prune a version while a swap may be loading it
                active = self._active
                try:
                    store.prune(name, protect=(active.ref,) if active else ())
                except (OSError, StoreError) as exc:
                    # The bundle is registered: say so (201), not 500. Pruning is retried at the next registration.
                    log.error("registered %s, but pruning old versions failed: %s", ref(name, version), exc)
        return {
            "name": name,
            "version": version,
            "sha256": report.sha256,
            "created": created,
            "checks": report.checks,
            "golden_max_abs_diff": report.golden_max_abs_diff,
            "contract_compatible": not contract_changes,
            "contract_changes": contract_changes,
            "validate_s": round(time.perf_counter() - t0, 4),
            "path": str(dest),
        }

    # -- swapping -----------------------------------------------------------------------------------
    def activate(self, name: str, version: str, allow_contract_change: bool = False, action: str = "activate") -> SwapResult:
        """Validate + warm `name/version`, persist it as active, switch. A failure changes nothing."""
        store = self.require_store()
        with self._swap_lock:
            old = self._active
            if old is not None and old.name == name and old.version == version:
                pointer = store.pointer()
                if pointer is None or pointer[0] != old.ref:
                    store.set_active(name, version, allow_contract_change, action=action)
                return SwapResult(action, "unchanged", old.summary(), old.summary(), message=f"{old.ref} is already active")
            vdir = store.version_dir(name, version)
            if not vdir.is_dir():
                raise RegistryError("not_found", f"version {ref(name, version)} is not in the models directory", 404)
            if not store.is_inside(vdir):  # a symlink placed in the models dir, pointing out of it
                raise RegistryError("outside_models_dir", f"{ref(name, version)} resolves outside the models directory", 400)
            return self._swap_to(
                vdir, ref(name, version), allow_contract_change, action,
                persist=lambda: store.set_active(name, version, allow_contract_change, action=action),
            )

    def rollback(self) -> SwapResult:
        """Go back to the previously active version (repeatable: walks back through the history)."""
        store = self.require_store()
        with self._swap_lock:
            target = store.rollback_target()
            if target is None:
                raise RegistryError("no_history", "there is no previous version to roll back to", 409)
            name, version = split_ref(target)
            return self._swap_to(
                store.version_dir(name, version), target, True, "rollback", persist=lambda: store.commit_rollback(target)
            )

    def _swap_to(self, vdir: Path, target: str, allow_contract_change: bool, action: str, persist) -> SwapResult:
        old = self._active
        try:
            new, timings, checks = self._load(vdir, expect=target)
            if old is not None and not allow_contract_change:
                changes = contract_diff(old.manifest, new.manifest)
                if changes:
                    raise BundleError(
                        "contract",
                        f"{new.ref} changes the client contract ({', '.join(sorted(changes))}); "
                        "pass allow_contract_change to accept it",
                    )
            checks.append("contract")
            persist()  # crash before here: restart serves the old version; after: the new, validated one
        except (BundleError, StoreError) as exc:
            self._count_swap("failure")
            log.error("%s to %s refused: %s (still serving %s)", action, vdir, exc, old.ref if old else "nothing")
            if self.store is not None:
                with contextlib.suppress(Exception):
                    self.store.record_event(f"{action}_failed", to=str(vdir.relative_to(self.store.root)), reason=str(exc))
            raise
        self._switch(new)
        result_label = "rollback" if action == "rollback" else "success"
        self._count_swap(result_label)
        result = SwapResult(action, "success", old.summary() if old else None, new.summary(), timings, checks)
        self.last_swap = result
        log.info(
            "%s: %s -> %s (validate %.3fs, warm %.3fs)",
            action, old.ref if old else None, new.ref, timings["validate"], timings["warm"],
        )
        return result

    # -- watch mode -----------------------------------------------------------------------------------
    def check_pointer(self) -> SwapResult | None:
        """One poll of the ACTIVE pointer: swap if it names another version than the one served."""
        if self.store is None:
            return None
        signature = self.store.state_signature()
        if signature is None or signature == self._watch_failed:
            return None
        try:
            pointer = self.store.pointer()
        except StoreError as exc:
            log.warning("watch: cannot read %s: %s", self.store.state_path, exc)
            self._watch_failed = signature
            return None
        active = self._active
        if pointer is None or (active is not None and pointer[0] == active.ref):
            return None
        name, version = split_ref(pointer[0])
        log.info("watch: ACTIVE changed to %s", pointer[0])
        try:
            return self.activate(name, version, allow_contract_change=pointer[1], action="watch")
        except (BundleError, StoreError, RegistryError) as exc:
            # Taken after the failure: recording the failed attempt rewrote the state file itself.
            self._watch_failed = self.store.state_signature()
            log.error("watch: not switching to %s: %s", pointer[0], exc)
            return None

    def start_watch(self, interval_s: float | None = None) -> None:
        if self.store is None or self._watch_thread is not None:
            return
        interval = float(interval_s if interval_s is not None else getattr(self.settings, "watch_interval_s", 0) or 0)
        if interval <= 0:
            return
        self._watch_stop.clear()

        def _loop() -> None:
            while not self._watch_stop.wait(interval):
                try:
                    self.check_pointer()
                except Exception:  # the watcher must never die silently
                    log.exception("watch: unexpected error")

        self._watch_thread = threading.Thread(target=_loop, name="oodguard-watch", daemon=True)
        self._watch_thread.start()
        log.info("watching %s every %.1fs", self.store.state_path, interval)

    def close(self) -> None:
        """Stop watching and kill running validations (shutdown must not wait for a hostile graph)."""
        self.stop_watch()
        killed = kill_children()
        if killed:
            log.warning("shutdown: stopped %d bundle validation(s) still running", killed)

    def stop_watch(self) -> None:
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=10)
            self._watch_thread = None

    # -- metrics ------------------------------------------------------------------------------------
    def _count_swap(self, result: str) -> None:
        counter = getattr(self.metrics, "model_swaps_total", None)
        if counter is not None:
            counter.labels(result=result).inc()

    def _set_model_info(self, model: LoadedModel) -> None:
        info = getattr(self.metrics, "model_info", None)
        if info is not None:
            info.info({"name": model.name, "version": model.version, "sha256": model.sha256})
        drift = getattr(self.metrics, "drift", None)
        if drift is not None:  # a new model starts a new drift test
            drift.reset(model.sha256)
