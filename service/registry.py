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
from typing import Annotated, Any, BinaryIO, Iterator

from pydantic import Field

from .bundle import BundleError, verify_bundle
from .errors import OodguardError, not_ready
from .isolate import kill_children, verify_in_child
from .loaded_model import LoadedModel, contract_diff, key_metrics
from .manifest import MANIFEST_FILE, BundleManifest
from .metrics import ServiceMetrics
from .settings import Settings
from .store import ModelStore, TarLimits, check_tree, copy_bundle, ref, safe_extract_tar, split_ref
from .watch import PointerWatcher

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelRegistry", "Registration", "SwapResult", "VersionInfo"]


@dataclass
class SwapResult:
    """What an activation / rollback did, for logs and the admin API (its response model too)."""

    action: Annotated[str, Field(description="activate | rollback | watch")]
    result: Annotated[str, Field(description="success | unchanged")]
    previous: Annotated[dict[str, Any] | None, Field(description="Summary of the version served before.")] = None
    current: Annotated[dict[str, Any] | None, Field(description="Summary of the version served now.")] = None
    timings_s: Annotated[dict[str, float], Field(description="validate and warm seconds.")] = field(default_factory=dict)
    checks: Annotated[list[str], Field(description="Checks passed before switching.")] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Registration:
    """What registering a bundle did: validated and installed, never activated (the admin API's response model too)."""

    name: str
    version: str
    sha256: Annotated[str, Field(description="sha256 of the bundle's manifest.json (pins every file).")]
    created: Annotated[bool, Field(description="False when this exact bundle was already registered.")]
    checks: Annotated[list[str], Field(description="Checks passed, in order.")]
    golden_max_abs_diff: Annotated[dict[str, float], Field(description="Per output: max |onnxruntime - golden|.")]
    contract_compatible: Annotated[bool, Field(description="Same classes / input / outputs / score as the active version.")]
    contract_changes: Annotated[dict[str, dict[str, Any]], Field(description="What differs from the active version: {old, new}.")]
    validate_s: Annotated[float, Field(description="Seconds spent validating.")]
    path: Annotated[str, Field(description="Where the bundle now lives in the models directory.")]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class VersionInfo:
    """One version the registry knows: its identity, whether it serves, and its key metrics (or why not)."""

    name: str
    version: str
    active: bool
    sha256: str | None = None
    created_at: str | None = None
    key_metrics: dict[str, Any] | None = None  # loaded_model.key_metrics; None when the manifest is unreadable
    error: str | None = None  # why the stored manifest cannot be read
    registered_at: str | None = None
    pointer: bool | None = None  # ACTIVE names it (models-dir mode only)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.key_metrics is None:
            out.update(active=self.active, error=self.error)
        else:
            out.update(sha256=self.sha256, active=self.active, created_at=self.created_at, **self.key_metrics)
        if self.pointer is not None:  # from the models directory
            out.update(registered_at=self.registered_at, pointer=self.pointer)
        return out


class ModelRegistry:
    """Loads, validates, serves and swaps bundles. One instance per service process."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self._swap_lock = threading.Lock()  # one swap at a time; held through validation (seconds)
        self._active: LoadedModel | None = None
        self.store: ModelStore | None = (
            ModelStore(settings.models_dir, keep_versions=settings.keep_versions) if settings.models_dir else None
        )
        self.watcher: PointerWatcher | None = PointerWatcher(self, self.store) if self.store is not None else None
        self.last_swap: SwapResult | None = None

    # -- serving ------------------------------------------------------------------------------------
    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @contextlib.contextmanager
    def acquire(self) -> Iterator[LoadedModel]:
        """Pin the active model for one request / batch; a swap during it does not release its session."""
        while True:
            model = self._active
            if model is None:
                raise not_ready()
            if model.pin():
                break  # else a swap retired it between the two lines: the new one is active already
        try:
            yield model
        finally:
            model.unpin()

    def _switch(self, new: LoadedModel) -> LoadedModel | None:
        old, self._active = self._active, new
        if old is not None and old is not new:
            old.retire()
        self._set_model_info(new)
        return old

    # -- loading ------------------------------------------------------------------------------------
    def _warm_batches(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.settings.max_batch}))

    def _load(
        self, bundle_dir: Path, expect: str | None = None, isolated: bool = True
    ) -> tuple[LoadedModel, dict[str, float], list[str]]:
        """Validate + warm a bundle. Raises BundleError naming the failed check; touches no shared state.

        `expect` ("name/version"): the store path it was found under, which its manifest must match.
        `isolated`: first pass every check in a child process with a time limit (bundles from the
        models directory or the admin API; the operator's own `--bundle` alone is trusted to end).
        """
        t0 = time.perf_counter()
        report = self._verify(bundle_dir, isolated)
        if expect is not None and ref(report.manifest.name, report.manifest.version) != expect:
            raise BundleError(
                "location",
                f"the manifest says {ref(report.manifest.name, report.manifest.version)} "
                f"but the bundle is stored as {expect}",
            )
        t1 = time.perf_counter()
        model = LoadedModel(bundle_dir, report.manifest, report.sha256, report.session, report.calibration,
                    report.form_calibration)
        model.warm(self._warm_batches())
        t2 = time.perf_counter()
        return model, {"validate": round(t1 - t0, 4), "warm": round(t2 - t1, 4)}, list(report.checks) + ["warm"]

    def _verify(self, bundle_dir: Path, isolated: bool = True):
        """`verify_bundle`, first (`isolated`) with the whole check + warm-up in a child process killed
        after validate_timeout_s (see isolate.py). We then serve the very session verified here, whose
        files were hashed before onnxruntime ever parsed the graph."""
        threads = self.settings.intra_op_threads  # 0 = onnxruntime default
        if isolated:
            verify_in_child(
                bundle_dir, intra_op_threads=threads, warm_batches=self._warm_batches(), timeout_s=self.settings.validate_timeout_s
            )
        return verify_bundle(bundle_dir, intra_op_threads=threads)

    def load_initial(self) -> LoadedModel:
        """Serve `--bundle`, or the models dir's ACTIVE version (seeding it from `--bundle` when empty)."""
        bundle = self.settings.bundle
        if self.store is None:
            if not bundle:
                raise OodguardError("internal", "no_model", "set a bundle (OODGUARD_BUNDLE / --bundle) or a models dir")
            model, timings, _ = self._load(Path(bundle).resolve(), isolated=False)
            self._switch(model)
            log.info("serving %s from %s (validate %.3fs, warm %.3fs)", model.ref, bundle, timings["validate"], timings["warm"])
            return model

        pointer = self.store.pointer()
        if pointer is None:
            if not bundle:
                raise OodguardError("internal", "no_model", f"{self.store.root} has no ACTIVE version and no --bundle was given")
            seeded = self.register_path(Path(bundle), trusted=True)
            self.store.set_active(seeded.name, seeded.version, action="seed")
            log.info("models dir %s was empty: seeded it with %s from %s", self.store.root, ref(seeded.name, seeded.version), bundle)
            pointer = self.store.pointer()
        elif bundle:
            log.info("models dir %s has an ACTIVE version (%s); it wins over --bundle %s", self.store.root, pointer[0], bundle)

        candidates = [pointer[0]] + list(reversed(self.store.read_state().history))
        errors = []
        for candidate in dict.fromkeys(candidates):
            try:
                model, timings, _ = self._load(self.store.version_dir(*split_ref(candidate)), expect=candidate)
            except OodguardError as exc:
                errors.append(f"{candidate}: {exc}")
                log.error("cannot serve %s: %s", candidate, exc)
                self._count_swap("failure")
                continue
            if candidate != pointer[0]:
                # Do not rewrite ACTIVE: the operator should see (and fix) what they pointed at.
                log.error("ACTIVE points at %s which failed validation; serving %s from history instead", pointer[0], candidate)
                self.watcher.skip_current()
            self._switch(model)
            log.info("serving %s (validate %.3fs, warm %.3fs)", model.ref, timings["validate"], timings["warm"])
            return model
        raise OodguardError("internal", "no_model", "no servable version: " + "; ".join(errors))

    # -- listing ------------------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Every version known (the active one marked), oldest registration first."""
        active = self._active
        if self.store is None:
            return [_describe(active.manifest, active.sha256, active=True)] if active else []
        out = []
        state = self.store.read_state()
        for name, version, vdir in self.store.list_versions():
            is_active = active is not None and active.name == name and active.version == version
            stored = self.store.read_manifest(vdir)  # parsed once per change of the file
            stored_as = {"registered_at": state.registered.get(ref(name, version)), "pointer": state.active == ref(name, version)}
            if stored.manifest is not None:
                out.append(_describe(stored.manifest, stored.sha256, active=is_active, **stored_as))
            else:
                out.append(VersionInfo(name, version, is_active, error=stored.error, **stored_as))
        return out

    # -- registering --------------------------------------------------------------------------------
    def require_store(self) -> ModelStore:
        if self.store is None:
            raise OodguardError(
                "conflict",
                "no_models_dir",
                "the service runs a single --bundle without a models directory; "
                "start it with --models-dir / OODGUARD_MODELS_DIR to upload, activate or roll back",
            )
        return self.store

    def _tar_limits(self) -> TarLimits:
        return TarLimits(max_total_bytes=self.settings.max_bundle_bytes, max_members=self.settings.max_bundle_files)

    def register_tar(self, fileobj: BinaryIO | str | Path) -> Registration:
        """Safely extract an uploaded bundle archive, validate it and install it. Does not activate."""
        store = self.require_store()
        with self._counting_rejections(), store.staging_dir() as stage:
            if isinstance(fileobj, (str, Path)):
                with open(fileobj, "rb") as fh:
                    root = safe_extract_tar(fh, stage / "x", self._tar_limits())
            else:
                root = safe_extract_tar(fileobj, stage / "x", self._tar_limits())
            return self._validate_and_install(store, root)

    def register_path(self, path: str | Path, trusted: bool = False) -> Registration:
        """Validate and install a bundle directory that lies inside the models dir (or, `trusted`, anywhere)."""
        store = self.require_store()
        src = Path(path)
        shown = str(path)[:200]
        try:
            if not trusted and not store.is_inside(src):
                raise OodguardError("bad_request", "outside_models_dir", f"{shown} is not inside the models directory {store.root}")
            if src.is_symlink() or not src.is_dir() or not (src / MANIFEST_FILE).is_file():
                # Checked before copying: the models dir itself (path "") would be copied into its own staging dir.
                raise OodguardError("bad_request", "not_a_bundle", f"{shown} is not a bundle directory (no {MANIFEST_FILE})")
            if not trusted and any(part.startswith(".") for part in src.resolve().relative_to(store.root).parts):
                raise OodguardError("bad_request", "not_a_bundle", f"{shown} is in a hidden (staging) directory of the models dir")
        except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES, ...: not a path that can hold a bundle
            raise OodguardError(
                "bad_request", "not_a_bundle", f"{shown} cannot be read as a bundle directory ({exc.strerror})"
            ) from None
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

    def _validate_and_install(self, store: ModelStore, root: Path) -> Registration:
        t0 = time.perf_counter()
        report = self._verify(root)
        name, version, dest, created = store.install(root)
        active = self._active
        contract_changes = contract_diff(active.manifest, report.manifest) if active else {}
        log.info("registered %s (%s, checks %s)", ref(name, version), "new" if created else "already present", report.checks)
        if created:
            with self._swap_lock:  # never prune a version while a swap may be loading it
                active = self._active
                try:
                    store.prune(name, protect=(active.ref,) if active else ())
                except (OSError, OodguardError) as exc:
                    # The bundle is registered: say so (201), not 500. Pruning is retried at the next registration.
                    log.error("registered %s, but pruning old versions failed: %s", ref(name, version), exc)
        return Registration(
            name=name,
            version=version,
            sha256=report.sha256,
            created=created,
            checks=report.checks,
            golden_max_abs_diff=report.golden_max_abs_diff,
            contract_compatible=not contract_changes,
            contract_changes=contract_changes,
            validate_s=round(time.perf_counter() - t0, 4),
            path=str(dest),
        )

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
                raise OodguardError("not_found", "not_found", f"version {ref(name, version)} is not in the models directory")
            if not store.is_inside(vdir):  # a symlink placed in the models dir, pointing out of it
                raise OodguardError("bad_request", "outside_models_dir", f"{ref(name, version)} resolves outside the models directory")
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
                raise OodguardError("conflict", "no_history", "there is no previous version to roll back to")
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
        except OodguardError as exc:
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

    # -- lifecycle ----------------------------------------------------------------------------------
    def start_watch(self) -> None:
        """Poll the models dir's ACTIVE pointer every watch_interval_s (0, or no models dir: never)."""
        if self.watcher is not None:
            self.watcher.start(self.settings.watch_interval_s)

    def close(self) -> None:
        """Stop watching and kill running validations (shutdown must not wait for a hostile graph)."""
        if self.watcher is not None:
            self.watcher.stop()
        killed = kill_children()
        if killed:
            log.warning("shutdown: stopped %d bundle validation(s) still running", killed)

    # -- metrics ------------------------------------------------------------------------------------
    def _count_swap(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.model_swaps_total.labels(result=result).inc()

    def _set_model_info(self, model: LoadedModel) -> None:
        if self.metrics is not None:
            self.metrics.set_model(model.name, model.version, model.sha256)


def _describe(manifest: BundleManifest, sha256: str, active: bool, **stored_as: Any) -> VersionInfo:
    return VersionInfo(
        manifest.name, manifest.version, active, sha256=sha256, created_at=manifest.created_at.isoformat(),
        key_metrics=key_metrics(manifest), **stored_as,
    )
