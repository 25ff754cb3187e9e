"""The on-disk model store: versioned bundle directories plus one atomically persisted state file.

Layout::

    <models_dir>/
        ACTIVE                  JSON: the active version, the rollback history, registrations, events
        .lock                   advisory lock serialising read-modify-write of ACTIVE across processes
        .incoming/              temp dirs for uploads / copies (renamed into place when complete)
        <name>/<version>/       one bundle each (see manifest.py); never modified once in place

`ACTIVE` is written with temp file + fsync + rename, so a reader (or a restart after a crash) sees
either the old state or the new one, never a half-written file. A bundle directory appears by
`rename` of a fully written temp dir, so a half-extracted bundle never sits at its final path.
For hand-made file deploys `ACTIVE` may also hold the single line ``name/version``.

This module knows nothing about onnxruntime or HTTP: the registry validates, and its refusals are
`OodguardError`s that say what kind of refusal they are (`errors.py` maps kinds to HTTP).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .atomic import atomic_write_text, fsync_dir
from .bundle import BundleError, manifest_sha256
from .errors import OodguardError
from .manifest import MANIFEST_FILE, NAME_RE, BundleManifest, load_manifest

log = logging.getLogger(__name__)

STATE_FILE = "ACTIVE"
_LOCK_FILE = ".lock"
_INCOMING = ".incoming"
_MAX_EVENTS = 200  # audit trail kept in the state file, newest last
_STALE_STAGING_S = 3600.0  # staging dirs older than this were left by a killed process
_MAX_CACHED_MANIFESTS = 256


@dataclass(frozen=True)
class TarLimits:
    """Bounds for extracting an uploaded bundle archive (decompressed bytes, member count)."""

    max_total_bytes: int = 2 << 30  # 2 GiB decompressed (the service's OODGUARD_MAX_BUNDLE_BYTES default)
    max_members: int = 10_000  # (OODGUARD_MAX_BUNDLE_FILES)
    max_depth: int = 16  # path components of a member (bundles are flat: report/plots/x.png is 3)
    max_path_bytes: int = 1024  # UTF-8 bytes of a member's path (each component at most NAME_MAX, 255)


@dataclass
class StoreState:
    """What `ACTIVE` holds. `history` is the rollback stack (previously active refs, newest last)."""

    active: str | None = None  # "name/version"
    allow_contract_change: bool = False  # the writer consented to a contract change for `active`
    history: list[str] = field(default_factory=list)
    registered: dict[str, str] = field(default_factory=dict)  # "name/version" -> ISO registration time
    events: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"


def ref(name: str, version: str) -> str:
    return f"{name}/{version}"


def split_ref(value: str) -> tuple[str, str]:
    name, sep, version = value.strip().partition("/")
    if not sep or not name or not version or "/" in version:
        raise OodguardError("invalid_input", "bad_pointer", f"{value!r} is not of the form name/version")
    return name, version


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ModelStore:
    """Versioned bundles under `models_dir`, the persisted active pointer and its history."""

    def __init__(self, models_dir: str | Path, keep_versions: int = 5):
        self.root = Path(models_dir).resolve()
        self.keep_versions = max(1, int(keep_versions))
        self.root.mkdir(parents=True, exist_ok=True)
        # manifest.json path -> (stat signature, StoredManifest): listing parses a manifest once per change
        self._manifests: dict[Path, tuple[tuple[int, int, int], StoredManifest]] = {}
        self._manifests_lock = threading.Lock()
        self._sweep_stale_staging()

    def _sweep_stale_staging(self, max_age_s: float = _STALE_STAGING_S) -> None:
        """Remove half-written uploads left by a killed process (never a fresh one: another process may own it).

        Runs at start-up: it must never stop the service from starting, whatever it finds (a tree
        too deep for a recursive delete once crashed it here, on every restart).
        """
        incoming = self.root / _INCOMING
        try:
            if not incoming.is_dir():
                return
            now = time.time()
            for entry in incoming.iterdir():
                try:
                    stale = now - entry.lstat().st_mtime > max_age_s
                except OSError:
                    continue
                if stale and remove_tree(entry):
                    log.info("removed stale staging dir %s", entry)
        except Exception as exc:  # noqa: BLE001 - a leftover must never keep the service down
            log.error("could not sweep stale staging dirs in %s: %s", incoming, exc)

    # -- state ----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def read_state(self) -> StoreState:
        """The persisted state; a missing file is the empty state. An unreadable file is an error, never guessed."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return StoreState()
        stripped = text.strip()
        if not stripped:
            return StoreState()
        if not stripped.startswith("{"):  # hand-written "name/version" pointer
            name, version = split_ref(stripped.splitlines()[0])
            return StoreState(active=ref(name, version))
        try:
            raw = json.loads(stripped)
            known = {k: raw[k] for k in StoreState.__dataclass_fields__ if k in raw}
            state = StoreState(**known)
        except (json.JSONDecodeError, TypeError) as exc:
            raise OodguardError("internal", "bad_state", f"{self.state_path} is not a valid state file ({exc})") from None
        if state.active is not None:
            split_ref(state.active)
        return state

    def pointer(self) -> tuple[str, bool] | None:
        """(active ref, allow_contract_change) as persisted, or None. Cheap: what watch mode polls."""
        state = self.read_state()
        return (state.active, state.allow_contract_change) if state.active else None

    def state_signature(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of the state file: changes whenever it is rewritten (atomic rename)."""
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Advisory lock: the service and `oodguard deploy --models-dir` may write the state concurrently.
        with open(self.root / _LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_state(self, state: StoreState) -> None:
        state.updated_at = _now()
        state.events = state.events[-_MAX_EVENTS:]
        atomic_write_text(self.state_path, state.to_json())  # fsyncs the file and the directory

    def set_active(self, name: str, version: str, allow_contract_change: bool = False, action: str = "activate") -> StoreState:
        """Persist `name/version` as active; the previous active goes onto the rollback history."""
        target = ref(name, version)
        if not self.version_dir(name, version).is_dir():
            raise OodguardError("not_found", "not_found", f"version {target} is not in {self.root}")
        with self._locked():
            state = self.read_state()
            previous = state.active
            if previous and previous != target:
                state.history = [h for h in state.history if h != target] + [previous]
            state.active = target
            state.allow_contract_change = allow_contract_change
            state.events.append({"at": _now(), "action": action, "from": previous, "to": target})
            self._write_state(state)
        return state

    def rollback_target(self) -> str | None:
        """The newest history entry that still exists on disk and is not the active version."""
        state = self.read_state()
        for candidate in reversed(state.history):
            if candidate != state.active and self.version_dir(*split_ref(candidate)).is_dir():
                return candidate
        return None

    def commit_rollback(self, target: str) -> StoreState:
        """Make `target` active and drop it (and anything newer) from the history stack."""
        with self._locked():
            state = self.read_state()
            previous = state.active
            if target in state.history:
                state.history = state.history[: state.history.index(target)]
            state.active = target
            state.allow_contract_change = True  # it was served before: going back is consented
            state.events.append({"at": _now(), "action": "rollback", "from": previous, "to": target})
            self._write_state(state)
        return state

    def record_event(self, action: str, **details: Any) -> None:
        with self._locked():
            state = self.read_state()
            state.events.append({"at": _now(), "action": action, **details})
            self._write_state(state)

    # -- versions -------------------------------------------------------------------------------
    def version_dir(self, name: str, version: str) -> Path:
        split_ref(ref(name, version))  # refuses separators
        # A manifest's name and version match NAME_RE (at most 64 characters): anything else (a
        # 300-character name, once ENAMETOOLONG -> 500) cannot be a stored version.
        if not all(NAME_RE.match(part) and ".." not in part for part in (name, version)):
            raise OodguardError("invalid_input", "bad_name", f"{ref(name, version)[:200]!r} is not a valid name/version")
        return self.root / name / version

    def list_versions(self) -> list[tuple[str, str, Path]]:
        """(name, version, dir) for every directory that holds a manifest.json, sorted by registration time."""
        out = []
        for name_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for vdir in sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                # A symlink pointing out of the models dir is not a stored version.
                # Only a bundle stored where its own manifest says (<name>/<version>) is a version: a drop
                # folder such as incoming/b3 holding a copy of tiny/1 must not be listed twice.
                if self.is_inside(vdir) and self.read_manifest(vdir).identity == (name_dir.name, vdir.name):
                    out.append((name_dir.name, vdir.name, vdir))
        registered = self.read_state().registered
        return sorted(out, key=lambda t: (registered.get(ref(t[0], t[1]), ""), t[0], t[1]))

    def read_manifest(self, vdir: Path) -> StoredManifest:
        """A stored version's manifest, parsed once per change of its file (inode, size, mtime).

        `GET /v1/models` and `/admin/models` list every version on every call: re-parsing each
        manifest each time cost 1.3 s per call for one 50 MB description.
        """
        path = vdir / MANIFEST_FILE
        try:
            st = path.stat()
        except OSError:
            return StoredManifest(None, None, None, f"{path}: missing manifest.json")
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._manifests_lock:
            cached = self._manifests.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        stored = _read_stored_manifest(vdir)
        with self._manifests_lock:
            if len(self._manifests) > 4 * _MAX_CACHED_MANIFESTS:  # versions come and go: drop the oldest
                for stale in list(self._manifests)[: len(self._manifests) - _MAX_CACHED_MANIFESTS]:
                    del self._manifests[stale]
            self._manifests[path] = (signature, stored)
        return stored

    def forget_manifests(self) -> None:
        """Drop the parsed manifests: the next listing reads every manifest file again."""
        with self._manifests_lock:
            self._manifests.clear()

    def registered_at(self, name: str, version: str) -> str | None:
        return self.read_state().registered.get(ref(name, version))

    # -- adding bundles -------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A fresh temp dir inside the models dir (same filesystem, so `install` is a rename); removed on exit."""
        incoming = self.root / _INCOMING
        incoming.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=incoming, prefix="stage-"))
        try:
            yield tmp
        finally:
            remove_tree(tmp)

    def install(self, staged_bundle: Path) -> tuple[str, str, Path, bool]:
        """Move a staged (already verified) bundle to `<name>/<version>`. Returns (name, version, dir, created).

        Re-installing identical content is a no-op; a different bundle under an existing version is refused.
        """
        manifest = load_manifest(staged_bundle)
        target = ref(manifest.name, manifest.version)
        dest = self.version_dir(manifest.name, manifest.version)
        with self._locked():  # two uploads of the same version must not race between check and rename
            if dest.exists():
                if manifest_sha256(dest) == manifest_sha256(staged_bundle):
                    return manifest.name, manifest.version, dest, False
                raise OodguardError("conflict", "version_exists", f"{target} already exists with different contents; bump the version")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged_bundle, dest)
            fsync_dir(dest.parent)
            state = self.read_state()
            state.registered[target] = _now()
            state.events.append({"at": _now(), "action": "register", "to": target})
            self._write_state(state)
        return manifest.name, manifest.version, dest, True

    def is_inside(self, path: str | Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root)
        except ValueError:
            return False
        return True

    def prune(self, name: str, protect: tuple[str, ...] = ()) -> list[str]:
        """Delete the oldest versions of `name` beyond `keep_versions`, never the active one nor `protect`ed refs."""
        state = self.read_state()
        keep = {state.active, *protect}
        mine = [(n, v, d) for n, v, d in self.list_versions() if n == name]
        excess = len(mine) - self.keep_versions
        removed: list[str] = []
        for n, v, d in mine:
            if excess <= 0:
                break
            if ref(n, v) in keep:
                continue
            # Rename first so a half-deleted bundle never sits at a path that looks valid.
            with self.staging_dir() as trash:
                os.rename(d, trash / "bundle")
            removed.append(ref(n, v))
            excess -= 1
        if removed:
            log.info("pruned old versions %s (keep_versions=%d)", removed, self.keep_versions)
            self.record_event("prune", removed=removed)
        return removed


# -- removing trees ----------------------------------------------------------------------------------


def remove_tree(path: str | Path) -> bool:
    """Delete a directory tree of any depth; never raises. Returns whether it is gone.

    `shutil.rmtree` recurses once per level (RecursionError on a tree 1,000 directories deep, which a
    34 KB archive holds) and deep trees outgrow PATH_MAX. Here every subdirectory met is first
    renamed to the top of the tree under a short unique name, so the paths used are at most two
    components below `path` and the work is a loop, not a recursion. Symbolic links are removed,
    never followed. Failures are logged, not raised: cleanup must not turn into the error reported.
    """
    top = Path(path)
    try:
        if top.is_symlink() or not top.is_dir():
            top.unlink(missing_ok=True)
            return True
        pending = [top]
        moved = 0
        tag = secrets.token_hex(4)  # flattened names no entry of the tree can predict
        while pending:
            current = pending[-1]
            subdirs = []
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    else:
                        os.unlink(entry.path)
            if not subdirs:
                pending.pop()
                if current != top:
                    os.rmdir(current)
                continue
            for name in subdirs:  # flatten: move each child directory up to the top level
                moved += 1
                flat = top / f".rm-{tag}-{moved}"
                os.rename(current / name, flat)
                pending.append(flat)
        os.rmdir(top)
        return True
    except FileNotFoundError:
        return not top.exists()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.error("could not remove %s: %s", top, exc)
        return False


# -- safe tar extraction ---------------------------------------------------------------------------


def safe_extract_tar(fileobj: BinaryIO, dest: Path, limits: TarLimits = TarLimits()) -> Path:
    """Extract a (gzipped) tar of one bundle into the empty dir `dest`; return the bundle root inside it.

    Refused (BundleError check "archive"): absolute paths, `..`, links of any kind, devices/fifos,
    more than `max_members` entries or `max_total_bytes` of content. Every member is checked from its
    header *before* anything is written, and extraction then uses tarfile's "data" filter as a second guard.
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError("archive", f"not a readable tar / tar.gz archive ({exc})") from None
    with tar:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for member in tar:
                members.append(member)
                if len(members) > limits.max_members:
                    raise BundleError("archive", f"more than {limits.max_members} entries")
                _check_member(member, limits)
                total += member.size
                if total > limits.max_total_bytes:
                    raise BundleError("archive", f"content exceeds {limits.max_total_bytes} bytes uncompressed")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise BundleError("archive", f"corrupt archive ({exc})") from None
        if not members:
            raise BundleError("archive", "the archive is empty")
        try:
            tar.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise BundleError("archive", f"extraction failed ({exc})") from None
    return _bundle_root(dest)


def _check_member(member: tarfile.TarInfo, limits: TarLimits) -> None:
    name = member.name
    parts = Path(name).parts
    _check_path_shape(name, parts, limits)
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or (parts and ":" in parts[0]):
        raise BundleError("archive", f"absolute path {name!r} in archive")
    if ".." in parts or ".." in name.replace("\\", "/").split("/"):
        raise BundleError("archive", f"path {name!r} escapes the bundle ('..')")
    if member.issym() or member.islnk():
        raise BundleError("archive", f"link {name!r} in archive; bundles hold regular files only")
    if not (member.isfile() or member.isdir()):
        raise BundleError("archive", f"{name!r} is not a regular file or directory (device, fifo, ...)")


def _check_path_shape(name: str, parts: tuple[str, ...], limits: TarLimits) -> None:
    # Deep or long paths: a recursive delete / copy / glob of 1,200 nested directories overflows
    # Python's stack, and long names fail with ENAMETOOLONG at whatever step meets them first.
    if len(parts) > limits.max_depth:
        raise BundleError("archive", f"path {name[:100]!r}... is {len(parts)} levels deep; at most {limits.max_depth}")
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise BundleError("archive", f"path {name[:100]!r}... is longer than {limits.max_path_bytes} bytes (or a part than 255)")


def check_tree(root: Path, limits: TarLimits = TarLimits()) -> None:
    """Refuse a bundle directory deeper, larger in entries, or with longer paths than an archive may hold.

    Iterative (any depth is walked without recursion); run before a directory is copied or hashed.
    """
    pending, seen = [root], 0
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                seen += 1
                if seen > limits.max_members:
                    raise BundleError("files", f"more than {limits.max_members} entries")
                rel = Path(entry.path).relative_to(root)
                try:
                    _check_path_shape(rel.as_posix(), rel.parts, limits)
                except BundleError as exc:
                    raise BundleError("files", exc.reason) from None
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))


def _bundle_root(dest: Path) -> Path:
    """Bundles are tarred either flat or under one top-level directory; find the one with the manifest."""
    if (dest / MANIFEST_FILE).is_file():
        return dest
    children = [p for p in dest.iterdir()]
    if len(children) == 1 and children[0].is_dir() and (children[0] / MANIFEST_FILE).is_file():
        return children[0]
    raise BundleError("archive", "no manifest.json at the top of the archive (or inside its single top-level folder)")


def copy_bundle(src: Path, dest: Path) -> Path:
    """Copy a bundle directory (regular files and dirs only) to `dest` (must not exist)."""

    def _refuse_links(directory: str, names: list[str]) -> list[str]:
        for n in names:
            if os.path.islink(os.path.join(directory, n)):
                raise BundleError("files", f"{os.path.join(directory, n)} is a symbolic link")
        return []

    shutil.copytree(src, dest, symlinks=True, ignore=_refuse_links)
    return dest


@dataclass(frozen=True)
class StoredManifest:
    """What listing needs of a stored version: its identity, its manifest (or why not), its sha256."""

    identity: tuple[str, str] | None  # (name, version) the manifest claims; None if unreadable
    manifest: BundleManifest | None
    sha256: str | None
    error: str | None = None


def _read_stored_manifest(bundle_dir: Path) -> StoredManifest:
    path = bundle_dir / MANIFEST_FILE
    try:
        raw_bytes = path.read_bytes()
        raw = json.loads(raw_bytes)
        identity = (str(raw["name"]), str(raw["version"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return StoredManifest(None, None, None, f"{path}: manifest is not readable ({exc})")
    sha256 = hashlib.sha256(raw_bytes).hexdigest()  # = manifest_sha256, from the bytes just read
    try:
        return StoredManifest(identity, load_manifest(bundle_dir), sha256)
    except ValueError as exc:
        return StoredManifest(identity, None, sha256, str(exc))
